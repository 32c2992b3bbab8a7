"""Tests of the U-Net: exact parameter counts, conditioning modes, errors."""

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stochinterp.models import UNet, count_params, layers

PAPER = dict(dim=256, dim_mults=(1, 1, 2, 3, 4), out_channels=3)
SMALL = dict(dim=32, dim_mults=(1, 2, 2), out_channels=3)
TINY = dict(dim=16, dim_mults=(1, 2), out_channels=3)


@pytest.mark.parametrize(
    "config, in_channels, num_classes, expected",
    [
        (PAPER, 6, 1000, 269_650_195),
        (PAPER, 3, None, 243_402_259),
        (SMALL, 3, None, 1_477_075),
        (SMALL, 4, 10, 1_688_115),
    ],
)
def test_parameter_counts_match_the_paper(config, in_channels, num_classes, expected):
    model = UNet(**config, num_classes=num_classes)
    count = count_params(
        model, (32, 32, 3), in_channels - 3, with_labels=num_classes is not None
    )
    assert count == expected


def test_parameter_counts_of_the_variants():
    base = count_params(UNet(**SMALL, num_classes=10), (32, 32, 3), 1, True)
    null = count_params(
        UNet(**SMALL, num_classes=10, class_null=True), (32, 32, 3), 1, True
    )
    assert null - base == 32  # one embedding row of width dim

    plain = count_params(UNet(**SMALL), (32, 32, 3))
    channel = count_params(
        UNet(**SMALL, num_classes=10, class_channel=True), (32, 32, 3), 0, True
    )
    assert channel - plain == 7 * 7 * 32  # one more stem input channel

    fixed = count_params(UNet(**SMALL, learned_sinusoidal=False), (32, 32, 3))
    # 16 learned frequencies and a 33-wide first time layer become a 32-wide one
    assert plain - fixed == 16 + (33 - 32) * 128

    no_linear = count_params(UNet(**SMALL, linear_attention=False), (32, 32, 3))
    # Each linear attention on c channels: 2 RMSNorm gains (2c), to_qkv
    # (c x 384), to_out (128 x c + c). Six of them, on 32, 32, 64 (down) and
    # 64, 64, 32 (up) channels.
    assert plain - no_linear == (2 + 384 + 128 + 1) * (32 + 32 + 64 + 64 + 64 + 32)


def test_layer_shapes_follow_the_reference_layout():
    model = UNet(**SMALL, num_classes=10)
    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    labels = jax.ShapeDtypeStruct((1,), jnp.int32)
    params = jax.eval_shape(
        lambda x, t, y: model.init(jax.random.key(0), x, t, labels=y), x, t, labels
    )["params"]
    assert params["stem"]["conv"]["kernel"].shape == (7, 7, 4, 32)
    assert params["time_features"]["weights"].shape == (16,)
    assert params["time_mlp1"]["dense"]["kernel"].shape == (33, 128)
    assert params["class_embed"]["embedding"].shape == (10, 32)
    assert params["down0_block1"]["mlp"]["dense"]["kernel"].shape == (256, 64)
    assert params["down0_down"]["conv"]["kernel"].shape == (4, 4, 32, 32)
    assert params["down1_down"]["conv"]["kernel"].shape == (4, 4, 32, 64)
    assert params["down2_down"]["conv"]["kernel"].shape == (3, 3, 64, 64)
    assert params["down1_attn"]["to_qkv"]["conv"]["kernel"].shape == (1, 1, 32, 384)
    assert params["mid_attn"]["to_qkv"]["conv"]["kernel"].shape == (1, 1, 64, 768)
    assert params["up0_block1"]["res_conv"]["conv"]["kernel"].shape == (1, 1, 128, 64)
    assert params["up2_up"]["conv"]["kernel"].shape == (3, 3, 32, 32)
    assert params["final_block"]["block1"]["proj"]["conv"]["kernel"].shape == (
        3,
        3,
        64,
        32,
    )
    assert params["final_conv"]["conv"]["kernel"].shape == (1, 1, 32, 3)


def _inputs(batch=2, side=16, channels=3, seed=0):
    kx, kt = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch, side, side, channels))
    t = jax.random.uniform(kt, (batch,))
    return x, t


@pytest.mark.parametrize(
    "mode, kwargs",
    [
        ("none", {}),
        ("cond", {}),
        ("labels", {"num_classes": 5}),
        ("labels_null", {"num_classes": 5, "class_null": True}),
        ("class_channel", {"num_classes": 5, "class_channel": True}),
    ],
)
def test_output_shape_and_dtype_per_mode(mode, kwargs):
    model = UNet(**{**TINY, "out_channels": 2}, **kwargs)
    x, t = _inputs()
    cond = jnp.ones((2, 16, 16, 4)) if mode == "cond" else None
    labels = None
    if "num_classes" in kwargs:
        last = 5 if mode == "labels_null" else 4  # 5 is the null class
        labels = jnp.array([0, last], jnp.int32)
    variables = model.init(jax.random.key(1), x, t, cond=cond, labels=labels)
    y = model.apply(variables, x, t, cond=cond, labels=labels)
    assert y.shape == (2, 16, 16, 2)
    assert y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
    if labels is not None:
        # The label must reach the output.
        y_other = model.apply(variables, x, t, cond=cond, labels=labels[::-1])
        assert float(jnp.max(jnp.abs(y - y_other))) > 1e-4


def test_output_depends_on_time_and_cond():
    model = UNet(**TINY)
    x, t = _inputs()
    cond = jnp.zeros((2, 16, 16, 1))
    variables = model.init(jax.random.key(1), x, t, cond=cond)
    y = model.apply(variables, x, t, cond=cond)
    assert float(jnp.max(jnp.abs(y - model.apply(variables, x, t + 0.3, cond)))) > 1e-4
    assert float(jnp.max(jnp.abs(y - model.apply(variables, x, t, cond + 1)))) > 1e-4
    # A scalar time is broadcast over the batch.
    y_scalar = model.apply(variables, x, 0.25, cond)
    y_vector = model.apply(variables, x, jnp.full((2,), 0.25), cond)
    np.testing.assert_allclose(y_scalar, y_vector, rtol=0, atol=0)


def test_bfloat16_keeps_float32_params_and_output():
    x, t = _inputs()
    labels = jnp.array([1, 3], jnp.int32)
    model32 = UNet(**TINY, num_classes=5)
    model16 = UNet(**TINY, num_classes=5, dtype=jnp.bfloat16)
    variables = model16.init(jax.random.key(2), x, t, labels=labels)
    dtypes = {p.dtype for p in jax.tree.leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    y16 = model16.apply(variables, x, t, labels=labels)
    y32 = model32.apply(variables, x, t, labels=labels)
    assert y16.dtype == jnp.float32
    # Same function up to bf16 rounding (8 bits of mantissa), but not identical.
    scale = float(jnp.max(jnp.abs(y32)))
    err = float(jnp.max(jnp.abs(y16 - y32)))
    assert 0 < err < 0.1 * scale


def test_output_does_not_depend_on_the_batch():
    model = UNet(**TINY, num_classes=5)
    x, t = _inputs(batch=4, seed=3)
    labels = jnp.array([0, 1, 2, 3], jnp.int32)
    variables = model.init(jax.random.key(4), x, t, labels=labels)
    apply = jax.jit(model.apply)
    y = apply(variables, x, t, labels=labels)
    for i in range(4):
        yi = apply(variables, x[i : i + 1], t[i : i + 1], labels=labels[i : i + 1])
        np.testing.assert_allclose(yi[0], y[i], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def class_model():
    model = UNet(**TINY, num_classes=5)
    x, t = _inputs()
    labels = jnp.array([0, 1], jnp.int32)
    return model, model.init(jax.random.key(0), x, t, labels=labels)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(labels=None), "labels of shape"),
        (dict(labels=jnp.array([0, 5], jnp.int32)), r"\[0, 5\)"),
        (dict(labels=jnp.array([-1, 0], jnp.int32)), r"\[0, 5\)"),
        (dict(labels=jnp.array([0.0, 1.0])), "integers"),
        (dict(labels=jnp.array([0, 1, 2], jnp.int32)), "integers of shape"),
        (dict(x_t=jnp.zeros((2, 15, 16, 3))), "divisible by"),
        (dict(x_t=jnp.zeros((16, 16, 3))), "x_t must be"),
        (dict(t=jnp.zeros((3,))), "t must have shape"),
        (dict(cond=jnp.zeros((2, 8, 8, 1))), "cond must be"),
        (dict(cond=jnp.zeros((2, 16, 16, 1))), "expect 3 input channels"),
    ],
)
def test_bad_inputs_raise(class_model, change, message):
    model, variables = class_model
    x, t = _inputs()
    args = dict(x_t=x, t=t, cond=None, labels=jnp.array([0, 1], jnp.int32))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        model.apply(variables, **args)


def test_labels_for_a_model_without_classes_raise():
    model = UNet(**TINY)
    x, t = _inputs()
    with pytest.raises(ValueError, match="no classes"):
        model.init(jax.random.key(0), x, t, labels=jnp.array([0, 1], jnp.int32))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=20), "must divide every width"),
        (dict(dim_mults=()), "at least one multiplier"),
        (dict(dim_mults=(True, 2)), r"dim_mults \(\(True, 2\)\) must be positive"),
        (dict(dim_mults=(1, "a")), r"dim_mults \(\(1, 'a'\)\) must be positive"),
        (dict(dim_mults=(1, 2.0)), r"dim_mults \(\(1, 2.0\)\) must be positive"),
        (dict(dim=8.0), r"dim \(8.0\) and dim_mults .* must be positive"),
        (dict(class_null=True), "need num_classes"),
        (dict(class_channel=True), "need num_classes"),
        (dict(num_classes=0), "num_classes must be positive"),
        (dict(learned_sinusoidal_dim=15), "positive even"),
        (dict(dtype=jnp.int32), "dtype must be"),
        (dict(attn_heads=0), "attn_heads must be a positive integer, got 0"),
        (dict(full_attn_dim_head=2.5), "full_attn_dim_head .* got 2.5"),
        (dict(resnet_block_groups=0), "resnet_block_groups must be a positive .* 0"),
    ],
)
def test_bad_configs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(**{**TINY, **kwargs})


class _FlaxConv(nn.Module):
    """flax's own convolution with the init of ``layers.Conv``."""

    features: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        pad = (self.padding, self.padding)
        return nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=self.stride,
            padding=(pad, pad),
            use_bias=self.use_bias,
            kernel_init=layers.torch_kernel_init,
            bias_init=layers.torch_bias_init(x.shape[-1] * self.kernel**2),
            name="conv",
        )(x)


@pytest.mark.parametrize(
    "kernel, stride, padding, use_bias",
    [
        (1, 1, 0, True),
        (1, 1, 0, False),
        (3, 1, 1, True),
        (4, 2, 1, True),
        (7, 1, 3, False),
    ],
)
def test_conv_equals_flax_convolution(kernel, stride, padding, use_bias):
    """Same parameters (names, shapes, initial values) and output as nn.Conv;
    1x1 convs run as one matrix product."""
    x = jax.random.normal(jax.random.key(0), (3, 6, 8, 5))
    ours = layers.Conv(10, kernel, stride, padding, use_bias=use_bias)
    reference = _FlaxConv(10, kernel, stride, padding, use_bias)
    params = ours.init(jax.random.key(1), x)["params"]
    ref_params = reference.init(jax.random.key(1), x)["params"]

    assert sorted(params["conv"]) == (["bias", "kernel"] if use_bias else ["kernel"])
    assert params["conv"]["kernel"].shape == (kernel, kernel, 5, 10)
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    got = np.asarray(ours.apply({"params": params}, x))
    assert got.shape == (3, 6 // stride, 8 // stride, 10)
    np.testing.assert_allclose(
        got, np.asarray(reference.apply({"params": params}, x)), rtol=1e-5, atol=1e-5
    )


def test_dense_equals_flax_dense():
    """Same parameter names, shapes and initial values as nn.Dense with
    PyTorch's init, and the same output bit for bit."""
    x = jax.random.normal(jax.random.key(0), (4, 7))

    class Reference(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(
                5,
                kernel_init=layers.torch_kernel_init,
                bias_init=layers.torch_bias_init(x.shape[-1]),
                name="dense",
            )(x)

    params = layers.Dense(5).init(jax.random.key(1), x)["params"]
    ref_params = Reference().init(jax.random.key(1), x)["params"]
    assert jax.tree.map(jnp.shape, params) == {
        "dense": {"kernel": (7, 5), "bias": (5,)}
    }
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    np.testing.assert_array_equal(
        layers.Dense(5).apply({"params": params}, x),
        Reference().apply({"params": params}, x),
    )


@pytest.mark.parametrize(
    "path, shape",
    [
        (("time_mlp1", "dense", "kernel"), (33, 32)),
        (("down0_block1", "block1", "norm", "scale"), (17,)),
        (("down0_attn", "norm", "g"), (15,)),
        (("stem", "conv", "bias"), (3,)),
    ],
)
def test_a_parameter_of_the_wrong_shape_is_named_in_the_error(path, shape):
    model = UNet(**TINY)
    x, t = jnp.zeros((2, 8, 8, 3)), jnp.zeros(2)
    params = model.init(jax.random.key(0), x, t)["params"]
    node = params
    for key in path[:-1]:
        node = node[key]
    expected = node[path[-1]].shape
    node[path[-1]] = jnp.zeros(shape)
    with pytest.raises(Exception, match=path[-1]) as error:
        model.apply({"params": params}, x, t)
    assert isinstance(error.value, flax.errors.ScopeParamShapeError)
    assert str(shape) in str(error.value) and str(expected) in str(error.value)
    assert "/".join(path[:-1]) in str(error.value)


def test_parameters_with_partitioning_metadata_are_unboxed():
    """Parameters boxed as flax does for sharding give the unboxed result."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    for layer in (layers.Dense(4), layers.Conv(4, 3, padding=1), layers.RMSNorm()):
        variables = layer.init(jax.random.key(1), x)
        boxed = jax.tree.map(
            lambda a: nn.Partitioned(a, names=(None,) * a.ndim), variables
        )
        np.testing.assert_array_equal(layer.apply(boxed, x), layer.apply(variables, x))


@pytest.mark.parametrize("apply", [False, True])
def test_a_parameter_declared_twice_raises(apply):
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = layers.param(self, "w", nn.initializers.ones, (3,), jnp.float32)
            v = layers.param(self, "w", nn.initializers.ones, (3,), jnp.float32)
            return x * w * v

    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match='Duplicate use of scope name: "w"'):
        if apply:
            Twice().apply({"params": {"w": jnp.ones(3)}}, x)
        else:
            Twice().init(jax.random.key(0), x)


def test_a_layer_called_twice_shares_its_parameters():
    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = layers.Dense(3)
            return dense(jnp.tanh(dense(x)))

    x = jax.random.normal(jax.random.key(0), (2, 3))
    params = Shared().init(jax.random.key(1), x)["params"]
    assert jax.tree.map(jnp.shape, params) == {
        "Dense_0": {"dense": {"kernel": (3, 3), "bias": (3,)}}
    }
    w, b = params["Dense_0"]["dense"]["kernel"], params["Dense_0"]["dense"]["bias"]
    np.testing.assert_allclose(
        Shared().apply({"params": params}, x),
        jnp.tanh(x @ w + b) @ w + b,
        rtol=1e-6,
    )


def test_apply_does_not_run_the_initialisers(monkeypatch):
    """An existing parameter is returned as it is: no initialiser is called
    (flax would trace each one to check the shape), only at init."""
    model = UNet(**TINY)
    x, t = jnp.zeros((2, 8, 8, 3)), jnp.zeros(2)
    variables = model.init(jax.random.key(0), x, t)
    calls = []
    real = jax.random.uniform

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    # jax.random.uniform (the biases) and the module the kernels' variance
    # scaling draws from.
    monkeypatch.setattr(jax.random, "uniform", counted)
    monkeypatch.setattr(jax._src.random, "uniform", counted)
    model.apply(variables, x, t)
    assert calls == []
    model.init(jax.random.key(0), x, t)
    # Every kernel and bias of the conv and dense layers draws from uniform.
    assert len(calls) == sum(
        1
        for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]
        if path[-1].key in ("kernel", "bias") and path[-2].key in ("conv", "dense")
    )


@pytest.mark.parametrize(
    "kernel, padding, height, width, channels",
    [(7, 3, 6, 8, 3), (7, 0, 9, 8, 4), (3, 1, 5, 4, 2), (5, 2, 2, 1, 3)],
)
def test_conv_with_stacked_rows_equals_the_direct_convolution(
    kernel, padding, height, width, channels
):
    """Same parameters and, in float64, the same output and gradients as the
    direct convolution; the kernel's rows taken in the wrong order fail it."""
    x = jax.random.normal(jax.random.key(0), (2, height, width, channels))
    stacked = layers.Conv(6, kernel, padding=padding, stack_rows=True)
    direct = layers.Conv(6, kernel, padding=padding)
    params = stacked.init(jax.random.key(1), x)["params"]
    jax.tree.map(
        np.testing.assert_array_equal,
        params,
        direct.init(jax.random.key(1), x)["params"],
    )
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)
        kw = dict(padding=padding, dtype=jnp.float64, param_dtype=jnp.float64)
        ours = layers.Conv(6, kernel, stack_rows=True, **kw)
        reference = layers.Conv(6, kernel, **kw)
        got = ours.apply({"params": p64}, x64)
        expected = reference.apply({"params": p64}, x64)
        size = (height + 2 * padding - kernel + 1, width + 2 * padding - kernel + 1)
        assert got.shape == expected.shape == (2, *size, 6)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)

        cotangent = jax.random.normal(jax.random.key(3), got.shape, jnp.float64)
        grads = jax.vjp(lambda p, x: ours.apply({"params": p}, x), p64, x64)[1](
            cotangent
        )
        ref_grads = jax.vjp(lambda p, x: reference.apply({"params": p}, x), p64, x64)[
            1
        ](cotangent)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12),
            grads,
            ref_grads,
        )

        flipped = dict(p64["conv"], kernel=p64["conv"]["kernel"][::-1])
        assert np.abs(ours.apply({"params": {"conv": flipped}}, x64) - got).max() > 1e-3


@pytest.mark.parametrize("height, kernel, padding", [(2, 4, 0), (5, 7, 0), (2, 7, 1)])
def test_conv_with_stacked_rows_and_a_kernel_taller_than_the_input(
    height, kernel, padding
):
    """No output rows, as the direct convolution gives."""
    x = jnp.ones((1, height, 9, 1))
    conv = layers.Conv(2, kernel, padding=padding, stack_rows=True)
    params = conv.init(jax.random.key(0), x)
    width = 9 + 2 * padding - kernel + 1
    assert conv.apply(params, x).shape == (1, 0, width, 2)


def test_conv_with_stacked_rows_rejects_a_stride():
    x = jnp.zeros((1, 8, 8, 3))
    expected = "stack_rows=True needs stride 1; got stride=2"
    with pytest.raises(ValueError, match=expected):
        layers.Conv(4, 3, stride=2, padding=1, stack_rows=True).init(
            jax.random.key(0), x
        )


def _conv_block_reference(x, params, groups, scale_shift=None):
    """conv + bias -> GroupNorm (eps 1e-5) -> affine -> scale/shift -> SiLU."""
    features = params["norm"]["scale"].shape[0]
    conv = _FlaxConv(features, 3, 1, 1).apply({"params": params["proj"]}, x)
    b, h, w, _ = x.shape
    z = np.asarray(conv, np.float64).reshape(b, h * w, groups, features // groups)
    mean = z.mean(axis=(1, 3), keepdims=True)
    var = ((z - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    norm = ((z - mean) / np.sqrt(var + 1e-5)).reshape(b, h, w, features)
    y = norm * np.asarray(params["norm"]["scale"]) + np.asarray(params["norm"]["bias"])
    if scale_shift is not None:
        scale, shift = (np.asarray(v, np.float64) for v in scale_shift)
        y = y * (scale + 1) + shift
    return y / (1 + np.exp(-y))


@pytest.mark.parametrize("scale_shift_batch", [None, 2, 1])
def test_conv_block_equals_conv_group_norm_silu(scale_shift_batch):
    """The folded block equals the layers written out in float64, with a
    bias large against the conv output; scale and shift may broadcast over
    the batch."""
    groups, features = 4, 8
    x = jax.random.normal(jax.random.key(0), (2, 6, 5, 3))
    block = layers.ConvBlock(features, groups)
    params = block.init(jax.random.key(1), x)["params"]
    assert sorted(params) == ["norm", "proj"]
    params = jax.tree.map(
        lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape), params
    )
    params["proj"]["conv"]["bias"] = params["proj"]["conv"]["bias"] + 5.0
    scale_shift = None
    if scale_shift_batch is not None:
        keys = jax.random.split(jax.random.key(3), 2)
        shape = (scale_shift_batch, 1, 1, features)
        scale_shift = tuple(jax.random.normal(k, shape) for k in keys)

    got = block.apply({"params": params}, x, scale_shift)
    expected = _conv_block_reference(x, params, groups, scale_shift)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_conv_block_stays_accurate_when_the_bias_cancels_a_large_mean():
    """Channels of one group with conv means +100 and -100, cancelled by the
    bias: the normalised output is O(1) and must stay accurate (statistics
    of z and z**2 taken apart would lose about 1e-3 here)."""
    offset = 100.0
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)).at[..., 0].add(offset)
    block = layers.ConvBlock(2, 1)
    params = block.init(jax.random.key(1), x)["params"]
    kernel = np.zeros((3, 3, 3, 2), np.float32)  # centre taps only: no border
    kernel[1, 1, 0] = [1.0, -1.0]  # channel 0 carries +offset, channel 1 -offset
    kernel[1, 1, 1, 0] = kernel[1, 1, 2, 1] = 0.5
    params["proj"]["conv"] = {
        "kernel": jnp.asarray(kernel),
        "bias": jnp.asarray([-offset, offset]),
    }

    got = block.apply({"params": params}, x)
    expected = _conv_block_reference(x, params, 1)
    assert np.abs(expected).max() < 5.0
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=2e-4)


@pytest.mark.parametrize("height, width", [(4, 4), (3, 5), (1, 1)])
def test_upsample_conv_equals_conv_of_the_repeated_input(height, width):
    """Same parameters as Conv(3, padding 1) and, in float64, the same output
    and gradients as that conv applied to the input repeated 2x2; a shifted
    tap (kernel rows paired the wrong way) fails it."""
    x = jax.random.normal(jax.random.key(0), (2, height, width, 5))
    ours = layers.UpsampleConv(7)
    params = ours.init(jax.random.key(1), x)["params"]
    ref_params = _FlaxConv(7, 3, 1, 1).init(jax.random.key(1), x)["params"]
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2)), params)

    def reference(p, x):
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _FlaxConv(7, 3, 1, 1).apply({"params": p}, up)

    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)
        model = layers.UpsampleConv(7, dtype=jnp.float64, param_dtype=jnp.float64)
        got = model.apply({"params": p64}, x64)
        expected = reference(p64, x64)
        assert got.shape == expected.shape == (2, 2 * height, 2 * width, 7)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)

        cotangent = jax.random.normal(jax.random.key(3), got.shape, jnp.float64)
        grads = jax.vjp(lambda p, x: model.apply({"params": p}, x), p64, x64)[1](
            cotangent
        )
        ref_grads = jax.vjp(reference, p64, x64)[1](cotangent)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12),
            grads,
            ref_grads,
        )

        shifted = dict(p64["conv"], kernel=jnp.roll(p64["conv"]["kernel"], 1, 0))
        assert np.abs(reference({"conv": shifted}, x64) - got).max() > 1e-3


def _rms_norm(x, g):
    return x / np.sqrt(np.sum(x**2, axis=-1, keepdims=True)) * np.sqrt(x.shape[-1]) * g


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_linear_attention_equals_the_reference_formula_per_head():
    """q, k, v from the normalised input; per head out = q (k^T v) / sqrt(d)."""
    heads, d = 3, 4
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 7))
    module = layers.LinearAttention(heads=heads, dim_head=d)
    params = module.init(jax.random.key(1), x)["params"]
    # Non-trivial norm scales and output bias, so that every parameter shows.
    params = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params
    )
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xs = np.asarray(x, np.float64).reshape(2, 30, 7)

    y = _rms_norm(xs, p["norm"]["g"])
    qkv = y @ p["to_qkv"]["conv"]["kernel"][0, 0]  # [b, n, 3 * heads * d]
    hidden = heads * d
    out = np.zeros((2, 30, hidden))
    for h in range(heads):
        cut = slice(h * d, (h + 1) * d)
        q = qkv[..., :hidden][..., cut]
        k = qkv[..., hidden : 2 * hidden][..., cut]
        v = qkv[..., 2 * hidden :][..., cut]
        q = _softmax(q, axis=-1) / np.sqrt(d)
        k = _softmax(k, axis=1)  # over positions
        context = np.einsum("bnd,bne->bde", k, v)
        out[..., cut] = np.einsum("bnd,bde->bne", q, context)
    out = out @ p["to_out"]["conv"]["kernel"][0, 0] + p["to_out"]["conv"]["bias"]
    expected = _rms_norm(out, p["out_norm"]["g"]) + xs

    got = module.apply({"params": params}, x)
    np.testing.assert_allclose(
        np.asarray(got).reshape(2, 30, 7), expected, rtol=2e-5, atol=2e-5
    )


def test_linear_attention_gradients_equal_the_reference_formula():
    """Gradients of the regrouped layer equal those of the per-head formula.

    The layer divides k's softmax sum out of a small product and keeps the
    max subtraction out of differentiation; the formula below takes the
    softmax as written, so a gradient lost or added on the way shows here.
    """
    heads, d = 2, 4
    x = jax.random.normal(jax.random.key(3), (2, 4, 5, 6)) * 3.0
    module = layers.LinearAttention(heads=heads, dim_head=d)
    params = module.init(jax.random.key(4), x)["params"]
    params = jax.tree.map(
        lambda p: p + 0.3 * jax.random.normal(jax.random.key(5), p.shape), params
    )
    weights = jax.random.normal(jax.random.key(6), x.shape)

    def reference(p, x):
        b, hh, ww, c = x.shape
        y = x * jax.lax.rsqrt(jnp.sum(x**2, -1, keepdims=True)) * np.sqrt(c)
        y = (y * p["norm"]["g"]).reshape(b, hh * ww, c)
        qkv = y @ p["to_qkv"]["conv"]["kernel"][0, 0]
        hidden = heads * d
        outs = []
        for h in range(heads):
            q = qkv[..., h * d : (h + 1) * d]
            k = qkv[..., hidden + h * d : hidden + (h + 1) * d]
            v = qkv[..., 2 * hidden + h * d : 2 * hidden + (h + 1) * d]
            q = jax.nn.softmax(q, axis=-1) / np.sqrt(d)
            k = jax.nn.softmax(k, axis=1)
            outs.append(jnp.einsum("bnd,bde->bne", q, jnp.einsum("bnd,bne->bde", k, v)))
        out = jnp.concatenate(outs, -1) @ p["to_out"]["conv"]["kernel"][0, 0]
        out = out + p["to_out"]["conv"]["bias"]
        out = out * jax.lax.rsqrt(jnp.sum(out**2, -1, keepdims=True)) * np.sqrt(c)
        return (out * p["out_norm"]["g"]).reshape(x.shape) + x

    def loss(apply):
        return lambda p, x: jnp.sum(jnp.sin(apply(p, x)) * weights)

    # Compiled: run op by op, the per-head reference and its gradient take
    # several times longer than compiling them.
    ours = loss(lambda p, x: module.apply({"params": p}, x))
    got = jax.jit(jax.grad(ours, (0, 1)))(params, x)
    want = jax.jit(jax.grad(loss(reference), (0, 1)))(params, x)
    flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want) == 6
    for g, w in zip(flat_got, flat_want, strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 1e-3
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * scale)


def test_linear_attention_float16_stays_finite_on_a_flat_image():
    """exp(k - max) is 1 at every position of a flat input: summed over 128 x
    128 positions before the softmax's division, the product with y would pass
    float16's largest value (65504)."""
    x = jnp.zeros((1, 128, 128, 16)).at[..., 0].set(1.0)
    params = layers.LinearAttention().init(jax.random.key(0), x)
    want = layers.LinearAttention().apply(params, x)
    got = layers.LinearAttention(dtype=jnp.float16).apply(params, x)
    assert bool(jnp.isfinite(got).all())
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2)


def test_learned_sinusoidal_features_equal_t_sin_cos_of_two_pi_w_t():
    """Output ``[t, sin(2 pi w t), cos(2 pi w t)]`` with hand-set frequencies;
    at w t = 1/4 the sine is 1 and the cosine 0 (pi instead of 2 pi fails)."""
    w = np.array([0.25, 1.0], np.float32)
    t = np.array([0.0, 1.0, 0.125, -0.7, 2.5], np.float32)
    module = layers.LearnedSinusoidalFeatures(dim=4)
    params = module.init(jax.random.key(0), jnp.asarray(t))["params"]
    assert jax.tree.map(jnp.shape, params) == {"weights": (2,)}

    got = np.asarray(module.apply({"params": {"weights": jnp.asarray(w)}}, t))
    angle = 2 * np.pi * np.asarray(t, np.float64)[:, None] * np.asarray(w, np.float64)
    expected = np.concatenate(
        [np.asarray(t, np.float64)[:, None], np.sin(angle), np.cos(angle)], axis=-1
    )
    assert got.shape == (5, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
    # t = 1 with w = 1/4: a quarter turn.
    np.testing.assert_allclose(got[1], [1.0, 1.0, 0.0, 0.0, 1.0], rtol=0, atol=1e-6)


def _full_attention_reference(x, p, heads, d, scale):
    """Pre-RMSNorm, q/k/v, per head softmax(q k^T * scale) v, to_out, residual."""
    b, hh, ww, c = x.shape
    xs = np.asarray(x, np.float64).reshape(b, hh * ww, c)
    y = _rms_norm(xs, p["norm"]["g"])
    qkv = y @ p["to_qkv"]["conv"]["kernel"][0, 0]  # [b, n, 3 * heads * d]
    hidden = heads * d
    out = np.zeros((b, hh * ww, hidden))
    for h in range(heads):
        cut = slice(h * d, (h + 1) * d)
        q = qkv[..., :hidden][..., cut]
        k = qkv[..., hidden : 2 * hidden][..., cut]
        v = qkv[..., 2 * hidden :][..., cut]
        weights = _softmax(np.einsum("bid,bjd->bij", q, k) * scale, axis=-1)
        out[..., cut] = np.einsum("bij,bjd->bid", weights, v)
    out = out @ p["to_out"]["conv"]["kernel"][0, 0] + p["to_out"]["conv"]["bias"]
    return (out + xs).reshape(b, hh, ww, c)


def test_full_attention_equals_the_reference_formula_per_head():
    """Per head out = softmax(q k^T / sqrt(d)) v from the normalised input,
    then the 1x1 output conv and the residual; a scale of 1/d fails it."""
    heads, d = 3, 8
    x = jax.random.normal(jax.random.key(0), (2, 4, 5, 7))
    module = layers.Attention(heads=heads, dim_head=d)
    params = module.init(jax.random.key(1), x)["params"]
    assert jax.tree.map(jnp.shape, params) == {
        "norm": {"g": (7,)},
        "to_qkv": {"conv": {"kernel": (1, 1, 7, 3 * heads * d)}},
        "to_out": {"conv": {"kernel": (1, 1, heads * d, 7), "bias": (7,)}},
    }
    # Non-trivial norm gains and output bias, so that every parameter shows.
    params = jax.tree.map(
        lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params
    )
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    got = np.asarray(module.apply({"params": params}, x))
    expected = _full_attention_reference(x, p, heads, d, d**-0.5)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    wrong_scale = _full_attention_reference(x, p, heads, d, 1.0 / d)
    assert np.abs(wrong_scale - expected).max() > 1e-2


def test_unet_resnet_blocks_use_the_default_eight_groups():
    """resnet_block_groups defaults to 8, every conv block of the U-Net gets
    it, and the first block's output is its conv normalised over 8 groups of
    2 of its 16 channels (4 groups give another output)."""
    model = UNet(**TINY)
    assert model.resnet_block_groups == 8
    x, t = _inputs()
    variables = model.init(jax.random.key(0), x, t)

    calls = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, layers.ConvBlock):
            assert context.method_name == "__call__"
            calls.append((context.module.scope.path, context.module.groups, args, out))
        return out

    with nn.intercept_methods(record):
        model.apply(variables, x, t)
    # 11 ResNet blocks (4 down, 2 middle, 4 up, 1 final) of 2 conv blocks.
    assert len(calls) == 22
    assert {groups for _, groups, _, _ in calls} == {8}

    path, _, (block_x, scale_shift), out = calls[0]
    assert path == ("down0_block1", "block1")
    assert block_x.shape == (2, 16, 16, 16)
    params = variables["params"]["down0_block1"]["block1"]
    expected = _conv_block_reference(block_x, params, 8, scale_shift)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)
    four_groups = _conv_block_reference(block_x, params, 4, scale_shift)
    assert np.abs(four_groups - expected).max() > 1e-2
