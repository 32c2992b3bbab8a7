"""Building blocks of the U-Net: norms, time features, ResNet and attention blocks.

All blocks take NHWC activations. Parameters are created in ``param_dtype``
(float32); ``dtype`` is the compute dtype. Reductions (norm statistics,
softmax) run in float32 whatever the compute dtype.

Weights are initialised as PyTorch initialises ``nn.Conv2d`` / ``nn.Linear``
(uniform in +-1/sqrt(fan_in) for kernels and biases), so that training starts
from the same distribution as the reference network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta

Dtype = Any
Initializer = Callable[..., jax.Array]

# PyTorch's default kernel init (kaiming uniform, a = sqrt(5)) is uniform in
# +-1/sqrt(fan_in): a variance scaling of 1/3 with fan_in and uniform.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def param(
    module: nn.Module,
    name: str,
    init: Initializer,
    shape: tuple[int, ...],
    dtype: Dtype,
) -> jax.Array:
    """``module.param(name, init, shape, dtype)``, made cheap to trace in apply.

    Called from a compact method. When the parameter already exists (apply,
    or a second call during init) flax checks its shape by tracing ``init``
    under ``jax.eval_shape``, about 1 ms per parameter on a CPU: a third of
    the time it takes to trace the whole U-Net. Here the name is reserved,
    the value unboxed (partitioning metadata) and its shape compared
    directly, as flax does, but ``init`` is not traced; the same errors are
    raised. Creating a parameter goes through ``module.param`` unchanged.
    """
    shape = tuple(shape)
    if not module.has_variable("params", name):
        return module.param(name, init, shape, dtype)
    module.scope.reserve(name, "params")  # a second declaration raises
    value = meta.unbox(module.get_variable("params", name))
    if jnp.shape(value) != shape:
        raise flax.errors.ScopeParamShapeError(
            name, module.scope.path_text, jnp.shape(value), shape
        )
    return value


def torch_bias_init(fan_in: int) -> Initializer:
    """Bias init of PyTorch's conv and linear layers: U(-1/sqrt(fan_in), ...)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv(nn.Module):
    """2D convolution on NHWC input, padded symmetrically, PyTorch-style init.

    Parameters ``conv/kernel`` [kernel, kernel, in, features] and
    ``conv/bias`` [features], named and initialised as ``nn.Conv`` would
    make them.

    Attributes:
      features: output channels.
      kernel: kernel side (square).
      stride: stride in both directions.
      padding: zero padding on each side of both spatial axes.
      use_bias: whether to add a bias.
      stack_rows: compute the convolution as a 1 x kernel convolution of the
        input's ``kernel`` row shifts stacked along channels (stride 1 only).
        Same parameters and function; faster for wide kernels on few input
        channels (the 7x7 stem on 3 channels: about 2x on a CPU core), where
        the direct convolution has too little work per input pixel.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    stack_rows: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, add_bias: bool = True):
        """x: [batch, height, width, in] -> [batch, height', width', features].

        With ``add_bias=False`` returns ``(output without the bias, bias)``
        instead, for a consumer that folds the bias into later work.
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.kernel == 1 and self.stride == 1 and self.padding == 0:
            if add_bias:
                return _Pointwise(self.features, self.use_bias, name="conv", **kw)(x)
            raise ValueError(
                "add_bias=False needs a kernel larger than 1x1 (or a stride or "
                f"padding); got kernel={self.kernel}, stride={self.stride}, "
                f"padding={self.padding}"
            )
        kernel, bias = _ConvWeights(
            self.features, self.kernel, self.use_bias, name="conv", **kw
        )(x.shape[-1])
        x = x.astype(self.dtype)
        padding = [(self.padding, self.padding)] * 2
        if self.stack_rows:
            if self.stride != 1:
                raise ValueError(
                    f"stack_rows=True needs stride 1; got stride={self.stride}"
                )
            if x.shape[1] + 2 * self.padding >= self.kernel:  # else no output rows
                x, kernel = _stacked_rows(x, kernel, self.padding)
                padding[0] = (0, 0)
        z = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(self.stride, self.stride),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if not add_bias:
            return z, bias
        return z if bias is None else z + bias


def _stacked_rows(x: jax.Array, kernel: jax.Array, padding: int):
    """A convolution's input and kernel rewritten as a single-row convolution.

    Output row r of a k x k convolution reads the padded input rows r ... r +
    k - 1. Stacking those k row shifts along channels (row shift i, then
    channel c) gives an input ``[b, h_out, w, k * in]`` on which the kernel,
    its rows moved into the channel axis the same way, is a 1 x k
    convolution; columns keep their padding.
    """
    size, _, in_channels, _ = kernel.shape
    rows_out = x.shape[1] + 2 * padding - size + 1
    padded = jnp.pad(x, ((0, 0), (padding, padding), (0, 0), (0, 0)))
    stacked = jnp.concatenate(
        [padded[:, i : i + rows_out] for i in range(size)], axis=-1
    )
    kernel = kernel.transpose(1, 0, 2, 3).reshape(1, size, size * in_channels, -1)
    return stacked, kernel


def _conv_params(module: nn.Module, in_channels: int, size: int):
    """Declares a square convolution's parameters in ``module``'s compact method.

    ``kernel`` [size, size, in, module.features] and, with ``module.use_bias``,
    ``bias`` [features]: the order, shapes and initial values of ``nn.Conv``.
    Returns (kernel, bias or None) in ``module.dtype``.
    """
    shape = (size, size, in_channels, module.features)
    kernel = param(module, "kernel", torch_kernel_init, shape, module.param_dtype)
    bias = None
    if module.use_bias:
        fan_in = in_channels * size * size
        bias = param(
            module,
            "bias",
            torch_bias_init(fan_in),
            (module.features,),
            module.param_dtype,
        )
        bias = bias.astype(module.dtype)
    return kernel.astype(module.dtype), bias


class _ConvWeights(nn.Module):
    """A square convolution's ``kernel`` and ``bias`` (or None), not applied."""

    features: int
    kernel: int
    use_bias: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, in_channels: int):
        return _conv_params(self, in_channels, self.kernel)


def _phase_taps(kernel: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """A 3-tap kernel axis seen from an input upsampled 2x by repetition.

    Output row 2i + 0 reads upsampled rows 2i - 1, 2i, 2i + 1, i.e. input rows
    i - 1, i, i: taps (k0, k1 + k2) on rows (i - 1, i). Output row 2i + 1
    reads input rows i, i, i + 1: taps (k0 + k1, k2) on rows (i, i + 1).
    """
    k0, k1, k2 = (jax.lax.index_in_dim(kernel, i, axis) for i in range(3))
    return (
        jnp.concatenate([k0, k1 + k2], axis),
        jnp.concatenate([k0 + k1, k2], axis),
    )


# Zero padding (before, after) of the input for the even and the odd phase.
_PHASE_PADDING = ((1, 0), (0, 1))


class UpsampleConv(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution with padding 1.

    Parameters, initial values and function of ``Conv(features, 3, padding=1)``
    applied to the upsampled input, but the upsampled input is never formed:
    each of the four output phases (even or odd row, even or odd column) is a
    2x2 convolution of the input itself, with the kernel's rows and columns
    summed in pairs (``_phase_taps``). 16 multiply-adds per input pixel and
    channel pair instead of 36.

    Attributes:
      features: output channels.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, height, width, in] -> [batch, 2 height, 2 width, features]."""
        kernel, bias = _ConvWeights(
            self.features,
            3,
            True,
            name="conv",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x.shape[-1])
        x = x.astype(self.dtype)
        b, h, w, _ = x.shape
        phases = []
        for row_phase, rows in enumerate(_phase_taps(kernel, axis=0)):
            for col_phase, taps in enumerate(_phase_taps(rows, axis=1)):
                padding = (_PHASE_PADDING[row_phase], _PHASE_PADDING[col_phase])
                phases.append(
                    jax.lax.conv_general_dilated(
                        x,
                        taps,
                        window_strides=(1, 1),
                        padding=padding,
                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                    )
                )
        # [b, h, w, row phase, col phase, f] -> [b, h, row phase, w, col phase, f].
        out = jnp.stack(phases, axis=3).reshape(b, h, w, 2, 2, self.features)
        out = out.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, self.features)
        return out + bias


class _Pointwise(nn.Module):
    """A 1x1 convolution computed as one matrix product over all positions.

    Same parameters (``kernel`` [1, 1, in, out], ``bias`` [out]), initial values
    and result as ``nn.Conv`` with a 1x1 kernel. Flattening the positions into
    one axis lets XLA's CPU backend use a plain matrix product for the output
    and both gradients; as a convolution, the kernel gradient of a 1x1 conv
    (a contraction over every position) ran about five times slower.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., features]."""
        fan_in = x.shape[-1]
        kernel, bias = _conv_params(self, fan_in, 1)
        y = x.reshape(-1, fan_in).astype(self.dtype) @ kernel[0, 0]
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.features)


class _PointwiseKernel(nn.Module):
    """The weights of ``Conv(features, 1)`` (same names and initial values)
    without applying them: (``kernel`` [in, features], ``bias`` when asked or
    None).
    """

    features: int
    fan_in: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, bias: bool = False):
        kernel, bias_or_none = _ConvWeights(
            self.features,
            1,
            bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(self.fan_in)
        return kernel[0, 0], bias_or_none


class Dense(nn.Module):
    """Linear layer with PyTorch-style init.

    Parameters ``dense/kernel`` [in, features] and ``dense/bias`` [features],
    named and initialised as ``nn.Dense`` (PyTorch's init) would make them;
    same product and sum.

    Attributes:
      features: output width.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., features]."""
        kernel, bias = _DenseWeights(self.features, self.param_dtype, name="dense")(
            x.shape[-1]
        )
        dtype = self.dtype
        return x.astype(dtype) @ kernel.astype(dtype) + bias.astype(dtype)


class _DenseWeights(nn.Module):
    """A linear layer's ``kernel`` [in, features] and ``bias`` [features]."""

    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, fan_in: int) -> tuple[jax.Array, jax.Array]:
        kernel = param(
            self,
            "kernel",
            torch_kernel_init,
            (fan_in, self.features),
            self.param_dtype,
        )
        bias = param(
            self, "bias", torch_bias_init(fan_in), (self.features,), self.param_dtype
        )
        return kernel, bias


class RMSNorm(nn.Module):
    """Channel RMS norm: ``x / |x| * sqrt(channels) * g`` over the last axis.

    ``|x|`` is floored at 1e-12 as in ``torch.nn.functional.normalize``.

    Attributes:
      dtype: output dtype.
      param_dtype: dtype of the gain ``g`` (one value per channel, init 1).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., channels] -> same shape, in ``dtype``."""
        channels = x.shape[-1]
        g = param(self, "g", nn.initializers.ones, (channels,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        sq = jnp.sum(jnp.square(x32), axis=-1, keepdims=True)
        inv = jax.lax.rsqrt(jnp.maximum(sq, 1e-24)) * math.sqrt(channels)
        return (x32 * inv * g).astype(self.dtype)


class _GroupNormAffine(nn.Module):
    """The affine parameters of a group norm: ``scale`` (init 1), ``bias`` (init 0)."""

    channels: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        """(scale, bias) in float32."""
        shape = (self.channels,)
        scale = param(self, "scale", nn.initializers.ones, shape, self.param_dtype)
        bias = param(self, "bias", nn.initializers.zeros, shape, self.param_dtype)
        return scale.astype(jnp.float32), bias.astype(jnp.float32)


class LearnedSinusoidalFeatures(nn.Module):
    """Features ``[t, sin(2 pi w t), cos(2 pi w t)]`` with learned frequencies.

    Attributes:
      dim: number of sin plus cos features (even); ``dim // 2`` frequencies
        ``w`` are learned (init N(0, 1)); the output has ``dim + 1`` features.
    """

    dim: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        """t: [batch] -> [batch, dim + 1] float32."""
        w = param(
            self,
            "weights",
            nn.initializers.normal(1.0),
            (self.dim // 2,),
            self.param_dtype,
        )
        t = t.astype(jnp.float32)[:, None]
        freqs = t * w[None, :] * (2.0 * math.pi)
        return jnp.concatenate([t, jnp.sin(freqs), jnp.cos(freqs)], axis=-1)


def sinusoidal_features(t: jax.Array, dim: int) -> jax.Array:
    """Fixed transformer-style features ``[sin(t f_i), cos(t f_i)]``.

    Frequencies ``f_i = 10000 ** (-i / (dim / 2 - 1))``, i < dim / 2. ``t`` is
    used as given (no rescaling), so for t in [0, 1] mostly the low frequencies
    vary.

    Args:
      t: [batch] times.
      dim: number of features (even, at least 4).

    Returns:
      [batch, dim] float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / (half - 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ConvBlock(nn.Module):
    """3x3 conv -> GroupNorm -> optional ``x * (scale + 1) + shift`` -> SiLU.

    Computed as ``silu(z * a + b)`` from the bias-free convolution ``z``: the
    conv bias, the norm's statistics and affine and the scale and shift are
    folded into one factor and one offset per example and channel. The
    statistics of ``z + bias`` are per-channel sums with the add fused into
    them, so ``z + bias`` is never written. Same parameters and function as
    the sequence of layers; one pass over the activations fewer.
    """

    features: int
    groups: int
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, scale_shift: tuple[jax.Array, jax.Array] | None = None
    ) -> jax.Array:
        """x: [b, h, w, c] -> [b, h, w, features].

        scale, shift: [b or 1, 1, 1, features].
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        z, bias = Conv(self.features, 3, padding=1, name="proj", **kw)(
            x, add_bias=False
        )
        b, h, w, c = z.shape
        g = self.groups
        norm_scale, norm_bias = _GroupNormAffine(
            c, name="norm", param_dtype=self.param_dtype
        )()
        z32 = z.astype(jnp.float32).reshape(b, h * w, g, c // g)
        beta = bias.astype(jnp.float32).reshape(g, c // g)
        # Per-channel moments of z + bias (the add is fused into the sums:
        # z + bias is not written), then the group moments. Adding the bias
        # before squaring keeps the variance accurate when the bias cancels
        # a large mean of z.
        m = jnp.mean(z32, axis=1) + beta
        s = jnp.mean(jnp.square(z32 + beta), axis=1)
        mean = jnp.mean(m, axis=-1, keepdims=True)
        mean_sq = jnp.mean(s, axis=-1, keepdims=True)
        var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
        # y = z * a + offset with one factor and one offset per example and
        # channel. Both end in a division by the group's standard deviation:
        # XLA does not copy a division into the loop that broadcasts its
        # result, so they are computed once. Ending in cheap products (with
        # rsqrt), they were recomputed for every pixel, in a loop XLA's CPU
        # backend did not vectorise: that loop took about 4x as long.
        sd = jnp.sqrt(var + self.epsilon)
        sd = jnp.broadcast_to(sd, (b, g, c // g)).reshape(b, c)
        gain = jnp.broadcast_to(norm_scale, (b, c))
        base = (beta - mean).reshape(b, c) * norm_scale + norm_bias * sd
        if scale_shift is not None:
            scale, shift = (
                jnp.broadcast_to(v.astype(jnp.float32), (b, 1, 1, c)).reshape(b, c)
                for v in scale_shift
            )
            gain = gain * (scale + 1)
            base = base * (scale + 1) + shift * sd
        a, offset = gain / sd, base / sd
        y = z32.reshape(b, h, w, c) * a[:, None, None, :] + offset[:, None, None, :]
        return nn.silu(y.astype(self.dtype))


class ResnetBlock(nn.Module):
    """Two conv blocks; the conditioning embedding sets scale and shift of the first.

    Attributes:
      features: output channels.
      groups: GroupNorm groups.
    """

    features: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb_act: jax.Array) -> jax.Array:
        """Applies the block.

        Args:
          x: [batch, height, width, in_channels].
          emb_act: [batch, emb_dim], the conditioning embedding after SiLU.

        Returns:
          [batch, height, width, features].
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ss = Dense(2 * self.features, name="mlp", **kw)(emb_act)
        scale, shift = jnp.split(ss[:, None, None, :], 2, axis=-1)
        h = ConvBlock(self.features, self.groups, name="block1", **kw)(
            x, (scale, shift)
        )
        h = ConvBlock(self.features, self.groups, name="block2", **kw)(h)
        if x.shape[-1] != self.features:
            x = Conv(self.features, 1, name="res_conv", **kw)(x)
        return h + x


def _normed_qkv(x: jax.Array, heads: int, dim_head: int, kw: dict):
    """Pre-RMSNorm and a bias-free 1x1 conv to queries, keys and values.

    Called inside an attention module's compact ``__call__``: the layers it
    makes (``norm``, ``to_qkv``) belong to that module.

    Returns:
      q, k, v: each [batch, height * width, heads, dim_head].
    """
    b, h, w, _ = x.shape
    y = RMSNorm(name="norm", **kw)(x)
    qkv = Conv(3 * heads * dim_head, 1, use_bias=False, name="to_qkv", **kw)(y)
    qkv = qkv.reshape(b, h * w, 3, heads, dim_head)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


class LinearAttention(nn.Module):
    """Residual linear attention: pre-RMSNorm, softmax kernels, output RMSNorm.

    q is normalised by a softmax over each head's features, k by a softmax over
    positions; ``out_n = sum_d q_nd (sum_m k_md v_m) * dim_head**-0.5``,
    followed by the 1x1 output convolution ``to_out``.

    The parameters are those of the reference layout (``to_qkv`` makes q, k
    and v from the normalised input y), but the products are grouped so that
    only two of them run over all positions besides q and k: the values enter
    through ``y^T k`` (per example, channels x heads x dim_head) and the output
    convolution through ``context @ W_out`` (per example, heads x dim_head x
    out channels), so ``out = q @ (context W_out) + bias``. Same function (by
    associativity); v and the per-head output are never formed, which saves
    the layout changes of the heads' batched products. k's softmax divides
    by a sum over positions, the same for every position, so the division is
    applied to the small product ``y^T exp(k - max)`` instead of to k itself:
    k's normalised values are never formed either, and neither is the
    reduction over positions of their gradient.

    Attributes:
      heads: number of heads.
      dim_head: features per head.
    """

    heads: int = 4
    dim_head: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, height, width, channels] -> same shape (x + attention)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        heads, d = self.heads, self.dim_head
        hidden = heads * d
        y = RMSNorm(name="norm", **kw)(x).reshape(b, h * w, c)
        w_qkv, _ = _PointwiseKernel(3 * hidden, c, name="to_qkv", **kw)()
        w_q, w_k, w_v = (w_qkv[:, i * hidden : (i + 1) * hidden] for i in range(3))
        # Projections over all positions of all examples as one 2D product:
        # with the batch axis kept, the kernels' gradients (contractions over
        # batch and positions) ran about three times slower.
        flat = y.reshape(b * h * w, c)
        q = (flat @ w_q).reshape(b, h * w, heads, d)
        k = (flat @ w_k).reshape(b, h * w, heads, d)

        q = jax.nn.softmax(q.astype(jnp.float32), axis=-1) * d**-0.5
        q = q.astype(self.dtype).reshape(b, h * w, hidden)
        # softmax over positions = exp(k - max) / sum: the sum is divided out
        # of y^T exp(k - max). The max only keeps exp in range; softmax does
        # not depend on it, so no gradient flows through it.
        k = k.astype(jnp.float32).reshape(b, h * w, hidden)
        peak = jax.lax.stop_gradient(jnp.max(k, axis=1, keepdims=True))
        e = jnp.exp(k - peak)
        # y^T e with the big operand on the right (as k^T y, XLA's CPU product
        # over positions ran about three times slower), summed in float32:
        # before the division it grows with the number of positions, past
        # float16's range on flat 128 x 128 inputs.
        y_k = jnp.einsum(
            "bnc,bnk->bck",
            y,
            e.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        y_k = (y_k / jnp.sum(e, axis=1, keepdims=True)).astype(self.dtype)
        # context_t[b, head, e, d] = (k^T v)[b, head, d, e].
        context_t = jnp.einsum(
            "bchd,che->bhed", y_k.reshape(b, c, heads, d), w_v.reshape(c, heads, d)
        )
        w_out, bias = _PointwiseKernel(c, hidden, name="to_out", **kw)(bias=True)
        mixed_t = jnp.einsum("bhed,heo->bohd", context_t, w_out.reshape(heads, d, c))
        # q @ mixed, with mixed stored transposed: the gradient of mixed (a
        # product over positions) then has the big operand on the right too.
        out = jnp.einsum("bnk,bok->bno", q, mixed_t.reshape(b, c, hidden)) + bias
        out = RMSNorm(name="out_norm", **kw)(out.reshape(b, h, w, c))
        return out + x


class Attention(nn.Module):
    """Residual full (softmax) attention over all positions, with pre-RMSNorm.

    Attributes:
      heads: number of heads.
      dim_head: features per head.
    """

    heads: int = 4
    dim_head: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, height, width, channels] -> same shape (x + attention)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        hidden = self.heads * self.dim_head
        q, k, v = _normed_qkv(x, self.heads, self.dim_head, kw)

        logits = jnp.einsum("bihd,bjhd->bhij", q, k).astype(jnp.float32)
        weights = jax.nn.softmax(logits * self.dim_head**-0.5, axis=-1)
        out = jnp.einsum("bhij,bjhd->bihd", weights.astype(self.dtype), v)

        out = Conv(c, 1, name="to_out", **kw)(out.reshape(b, h, w, hidden))
        return out + x
