"""The paper's U-Net (class-conditional, 2023 ``denoising-diffusion-pytorch`` form).

Layout, from input to output (NHWC throughout):

- input: ``x_t``, then image conditioning ``cond`` (and, in ``class_channel``
  mode, a constant channel holding the class index) concatenated on channels;
- time features (learned sinusoidal ``[t, sin, cos]`` or fixed sinusoidal)
  -> Dense -> GELU -> Dense to ``4 dim``; with classes, an embedding of width
  ``dim`` -> Dense -> GELU -> Dense to ``4 dim`` is concatenated to it
  (each block's linear map of ``[time; class]`` thereby adds a learned class
  term to its time term);
- 7x7 stem conv to ``dim``;
- per encoder level: 2 ResNet blocks, residual linear attention, then a 4x4
  stride-2 conv (a 3x3 conv at the last level) to the next width;
- middle: ResNet block, residual full attention, ResNet block;
- per decoder level: skip concat + ResNet block (twice), residual linear
  attention, nearest x2 upsample + 3x3 conv (a 3x3 conv at the last level);
- skip concat with the stem output, ResNet block, 1x1 conv to ``out_channels``.

Time is used as given: the network never rescales ``t``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from stochinterp import sharding
from stochinterp.models.layers import (
    Attention,
    Conv,
    Dense,
    Dtype,
    LearnedSinusoidalFeatures,
    LinearAttention,
    ResnetBlock,
    UpsampleConv,
    sinusoidal_features,
)

_COMPUTE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class UNet(nn.Module):
    """Conditional U-Net ``(x_t, t, cond, labels) -> [batch, h, w, out_channels]``.

    Example:
      >>> model = UNet(dim=32, dim_mults=(1, 2, 2), out_channels=3)
      >>> x = jnp.zeros((2, 32, 32, 3)); t = jnp.full((2,), 0.5)
      >>> variables = model.init(jax.random.key(0), x, t)
      >>> model.apply(variables, x, t).shape
      (2, 32, 32, 3)

    Attributes:
      dim: base width; level ``i`` has ``dim * dim_mults[i]`` channels, the time
        and class embeddings have ``4 dim``.
      dim_mults: width multipliers, one per resolution level; image sides must
        be divisible by ``2 ** (len(dim_mults) - 1)``.
      out_channels: output channels (independent of the input channels, which
        are read from the input: x_t channels + cond channels [+ 1]).
      resnet_block_groups: GroupNorm groups; must divide every width.
      learned_sinusoidal: learned sinusoidal time features (default) or fixed
        sinusoidal features of width ``dim``.
      learned_sinusoidal_dim: number of learned sin plus cos features (even);
        ``learned_sinusoidal_dim // 2`` frequencies. 32 (16 frequencies) is the
        paper's setting and gives its parameter counts.
      attn_heads, attn_dim_head: linear attention at every level.
      linear_attention: keep the linear attention of every level (the
        paper's network). False drops it: at small widths it costs about half
        of a training step on a CPU, so the CPU main job runs without it.
      full_attn_heads, full_attn_dim_head: full attention in the middle.
      num_classes: number of classes, or None for an unconditional model.
      class_null: one extra embedding row, index ``num_classes``, for the null
        class of classifier-free guidance.
      class_channel: feed the class index as a constant input channel instead
        of an embedding (no class embedding is created).
      dtype: compute dtype (float32, or bfloat16 for mixed precision). Params
        are always float32 and the output is float32.
    """

    dim: int
    dim_mults: Sequence[int] = (1, 2, 4, 8)
    out_channels: int = 3
    resnet_block_groups: int = 8
    learned_sinusoidal: bool = True
    learned_sinusoidal_dim: int = 32
    attn_heads: int = 4
    attn_dim_head: int = 32
    linear_attention: bool = True
    full_attn_heads: int = 4
    full_attn_dim_head: int = 64
    num_classes: int | None = None
    class_null: bool = False
    class_channel: bool = False
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        _check_config(self)
        super().__post_init__()

    @property
    def downsample_factor(self) -> int:
        """Image sides must be multiples of this."""
        return 2 ** (len(self.dim_mults) - 1)

    @property
    def null_label(self) -> int:
        """The label of the null class, for ``fields.guided``.

        Raises:
          ValueError: for a model without a null class (``class_null`` False):
            guidance needs one, and an index past the embedding's rows gives
            NaN outputs under ``jax.jit``, where labels are not checked.
        """
        if self.num_classes is None or not self.class_null:
            raise ValueError(
                "classifier-free guidance needs a model with a null class "
                f"(num_classes set and class_null=True), got num_classes="
                f"{self.num_classes}, class_null={self.class_null}"
            )
        return self.num_classes

    @property
    def uses_labels(self) -> bool:
        """Whether the model must be called with labels."""
        return self.num_classes is not None

    @nn.compact
    def __call__(
        self,
        x_t: jax.Array,
        t: jax.Array,
        cond: jax.Array | None = None,
        labels: jax.Array | None = None,
    ) -> jax.Array:
        """Evaluates the network.

        Args:
          x_t: [batch, height, width, channels] float.
          t: [batch] (or a scalar, broadcast over the batch) float times in
            [0, 1], unscaled.
          cond: [batch, height, width, k] image conditioning, or None.
          labels: [batch] int class labels in [0, num_classes) (index
            ``num_classes`` is the null class when ``class_null``), or None.

        Returns:
          [batch, height, width, out_channels] float32.
        """
        t = self._check_inputs(x_t, t, cond, labels)
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)

        x = self._input_stack(x_t, cond, labels)
        emb_act = nn.silu(self._embedding(t, labels))

        x = Conv(self.dim, 7, padding=3, stack_rows=True, name="stem", **kw)(x)
        stem = x
        widths = [self.dim] + [self.dim * m for m in self.dim_mults]
        levels = len(self.dim_mults)
        skips = []
        for i in range(levels):
            w_in, w_out = widths[i], widths[i + 1]
            x = self._block(w_in, f"down{i}_block1")(x, emb_act)
            skips.append(x)
            x = self._block(w_in, f"down{i}_block2")(x, emb_act)
            if self.linear_attention:
                x = self._linear_attn(f"down{i}_attn")(x)
            skips.append(x)
            if i < levels - 1:
                x = Conv(w_out, 4, stride=2, padding=1, name=f"down{i}_down", **kw)(x)
            else:
                x = Conv(w_out, 3, padding=1, name=f"down{i}_down", **kw)(x)

        x = self._block(widths[-1], "mid_block1")(x, emb_act)
        x = Attention(
            self.full_attn_heads, self.full_attn_dim_head, name="mid_attn", **kw
        )(x)
        x = self._block(widths[-1], "mid_block2")(x, emb_act)

        for j, i in enumerate(reversed(range(levels))):
            w_in, w_out = widths[i], widths[i + 1]
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = self._block(w_out, f"up{j}_block1")(x, emb_act)
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = self._block(w_out, f"up{j}_block2")(x, emb_act)
            if self.linear_attention:
                x = self._linear_attn(f"up{j}_attn")(x)
            if i > 0:  # nearest 2x upsampling, then the 3x3 conv
                x = UpsampleConv(w_in, name=f"up{j}_up", **kw)(x)
            else:
                x = Conv(w_in, 3, padding=1, name=f"up{j}_up", **kw)(x)

        x = jnp.concatenate([x, stem], axis=-1)
        x = self._block(self.dim, "final_block")(x, emb_act)
        x = Conv(self.out_channels, 1, name="final_conv", **kw)(x)
        return x.astype(jnp.float32)

    def _block(self, features: int, name: str) -> ResnetBlock:
        return ResnetBlock(
            features,
            self.resnet_block_groups,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name=name,
        )

    def _linear_attn(self, name: str) -> LinearAttention:
        return LinearAttention(
            self.attn_heads,
            self.attn_dim_head,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name=name,
        )

    def _input_stack(
        self, x_t: jax.Array, cond: jax.Array | None, labels: jax.Array | None
    ) -> jax.Array:
        """Concatenates x_t, cond and the class channel; casts to ``dtype``."""
        parts = [x_t.astype(jnp.float32)]
        if cond is not None:
            parts.append(cond.astype(jnp.float32))
        if self.class_channel:
            channel = labels.astype(jnp.float32)[:, None, None, None]
            parts.append(jnp.broadcast_to(channel, x_t.shape[:3] + (1,)))
        return jnp.concatenate(parts, axis=-1).astype(self.dtype)

    def _embedding(self, t: jax.Array, labels: jax.Array | None) -> jax.Array:
        """Time (and class) embedding: [batch] -> [batch, 4 dim or 8 dim]."""
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        emb_dim = 4 * self.dim
        if self.learned_sinusoidal:
            feats = LearnedSinusoidalFeatures(
                self.learned_sinusoidal_dim, name="time_features"
            )(t)
        else:
            feats = sinusoidal_features(t, self.dim)
        h = Dense(emb_dim, name="time_mlp1", **kw)(feats.astype(self.dtype))
        h = Dense(emb_dim, name="time_mlp2", **kw)(nn.gelu(h, approximate=False))
        if self.num_classes is None or self.class_channel:
            return h

        rows = self.num_classes + int(self.class_null)
        c = nn.Embed(
            rows,
            self.dim,
            embedding_init=nn.initializers.normal(1.0),
            param_dtype=jnp.float32,
            dtype=self.dtype,
            name="class_embed",
        )(labels)
        c = Dense(emb_dim, name="class_mlp1", **kw)(c)
        c = Dense(emb_dim, name="class_mlp2", **kw)(nn.gelu(c, approximate=False))
        return jnp.concatenate([h, c], axis=-1)

    def _check_inputs(
        self,
        x_t: jax.Array,
        t: jax.Array,
        cond: jax.Array | None,
        labels: jax.Array | None,
    ) -> jax.Array:
        """Raises ValueError on inconsistent inputs; returns t as [batch]."""
        if x_t.ndim != 4:
            raise ValueError(
                f"x_t must be [batch, height, width, channels], got shape {x_t.shape}"
            )
        b, h, w, _ = x_t.shape
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(
                f"image sides {h}x{w} must be divisible by 2**(len(dim_mults)-1)"
                f" = {f} for dim_mults={tuple(self.dim_mults)}"
            )
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (b,))
        if t.shape != (b,):
            raise ValueError(f"t must have shape [batch] = ({b},), got {t.shape}")
        if cond is not None and (cond.ndim != 4 or cond.shape[:3] != (b, h, w)):
            raise ValueError(
                f"cond must be [batch, height, width, k] = ({b}, {h}, {w}, k), "
                f"got shape {cond.shape}"
            )
        _check_labels(self, labels, b)
        self._check_in_channels(x_t, cond)
        return t

    def _check_in_channels(self, x_t: jax.Array, cond: jax.Array | None) -> None:
        """Compares the input channels with those the stem was built for."""
        if not self.has_variable("params", "stem"):
            return
        expected = self.variables["params"]["stem"]["conv"]["kernel"].shape[2]
        got = x_t.shape[-1] + (0 if cond is None else cond.shape[-1])
        got += int(self.class_channel)
        if got != expected:
            raise ValueError(
                f"the parameters expect {expected} input channels (x_t + cond"
                f"{' + class channel' if self.class_channel else ''}), got {got}:"
                f" x_t {x_t.shape}, cond {None if cond is None else cond.shape}"
            )


def _positive_int(value) -> bool:
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and value > 0
    )


def _check_config(model: UNet) -> None:
    """Raises ValueError for an inconsistent UNet configuration."""
    mults = tuple(model.dim_mults)
    if not (_positive_int(model.dim) and mults and all(map(_positive_int, mults))):
        raise ValueError(
            f"dim ({model.dim!r}) and dim_mults ({mults!r}) must be positive "
            "integers, with at least one multiplier"
        )
    g = model.resnet_block_groups
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"resnet_block_groups must be a positive integer, got {g!r}")
    bad = [model.dim * m for m in (1, *mults) if (model.dim * m) % g]
    if bad:
        raise ValueError(
            f"resnet_block_groups={g} must divide every width; widths {bad} "
            f"(dim={model.dim} x dim_mults={mults}) are not multiples of it"
        )
    if model.out_channels <= 0:
        raise ValueError(f"out_channels must be positive, got {model.out_channels}")
    heads = {
        "attn_heads": model.attn_heads,
        "attn_dim_head": model.attn_dim_head,
        "full_attn_heads": model.full_attn_heads,
        "full_attn_dim_head": model.full_attn_dim_head,
    }
    for name, value in heads.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if model.learned_sinusoidal and (
        model.learned_sinusoidal_dim <= 0 or model.learned_sinusoidal_dim % 2
    ):
        raise ValueError(
            "learned_sinusoidal_dim must be a positive even number, got "
            f"{model.learned_sinusoidal_dim}"
        )
    if not model.learned_sinusoidal and (model.dim < 4 or model.dim % 2):
        raise ValueError(
            f"fixed sinusoidal features need an even dim >= 4, got {model.dim}"
        )
    if model.num_classes is not None and model.num_classes <= 0:
        raise ValueError(
            f"num_classes must be positive or None, got {model.num_classes}"
        )
    if model.num_classes is None and (model.class_null or model.class_channel):
        raise ValueError("class_null and class_channel need num_classes to be set")
    if jnp.dtype(model.dtype) not in [jnp.dtype(d) for d in _COMPUTE_DTYPES]:
        raise ValueError(
            f"dtype must be float32, bfloat16 or float16, got {model.dtype}"
        )


def _check_labels(model: UNet, labels: jax.Array | None, batch: int) -> None:
    """Raises ValueError for labels that do not fit the model."""
    if model.num_classes is None:
        if labels is not None:
            raise ValueError(
                "labels were given but the model has no classes (num_classes=None)"
            )
        return
    if labels is None:
        raise ValueError(
            f"the model is class-conditional (num_classes={model.num_classes}); "
            "labels of shape [batch] are required"
        )
    if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be integers of shape [batch] = ({batch},), got "
            f"{labels.dtype} {labels.shape}"
        )
    values = sharding.host_values(labels)
    if values is None:
        return  # traced: values are not known here
    top = model.num_classes + int(model.class_null)
    if values.size and (values.min() < 0 or values.max() >= top):
        raise ValueError(
            f"labels must lie in [0, {top}) (num_classes={model.num_classes}, "
            f"class_null={model.class_null}), got values in "
            f"[{values.min()}, {values.max()}]"
        )


def count_params(
    model: UNet,
    input_shape: Sequence[int],
    cond_channels: int = 0,
    with_labels: bool = False,
) -> int:
    """Number of parameters of ``model``, found with ``jax.eval_shape`` (no memory).

    Args:
      model: the network.
      input_shape: shape of x_t, ``(height, width, channels)`` or
        ``(batch, height, width, channels)``; the count does not depend on the
        spatial size.
      cond_channels: channels of the image conditioning (0 = no cond).
      with_labels: pass labels (needed when the model has classes).

    Returns:
      The total number of parameter entries.
    """
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise ValueError(
            f"input_shape must be (height, width, channels) or with a leading "
            f"batch axis, got {input_shape}"
        )
    b, h, w, _ = shape
    x_t = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct((b,), jnp.float32)
    cond = jax.ShapeDtypeStruct((b, h, w, cond_channels), jnp.float32)
    labels = jax.ShapeDtypeStruct((b,), jnp.int32)

    def init(x_t, t, cond, labels):
        return model.init(jax.random.key(0), x_t, t, cond=cond, labels=labels)

    variables = jax.eval_shape(
        init, x_t, t, cond if cond_channels else None, labels if with_labels else None
    )
    return sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"]))
