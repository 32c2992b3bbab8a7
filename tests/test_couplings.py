"""Couplings: masks, super-resolution operators, class drops, configs, errors."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from stochinterp import couplings, interpolants, losses
from stochinterp.couplings import (
    ClassConditioning,
    CouplingSample,
    IndependentCoupling,
    InpaintingCoupling,
    SuperResolutionCoupling,
)


def _images(shape=(6, 16, 16, 3), seed=0):
    return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


@pytest.mark.parametrize("height,width", [(16, 16), (8, 16), (24, 8)])
def test_tile_mask_is_constant_on_equal_tiles(height, width):
    grid = 4
    shape = (50, height, width, 3)
    mask = np.asarray(couplings.tile_mask(jax.random.key(0), shape, grid))
    assert mask.shape == (50, height, width, 1)
    assert set(np.unique(mask)) == {0.0, 1.0}
    tile_h, tile_w = height // grid, width // grid
    tiles = mask[..., 0].reshape(50, grid, tile_h, grid, tile_w)
    # Constant inside each tile of H / grid x W / grid pixels ...
    np.testing.assert_array_equal(
        tiles, tiles[:, :, :1, :, :1].repeat(tile_h, 2).repeat(tile_w, 4)
    )
    # ... and free between tiles: neighbouring tiles differ somewhere.
    per_tile = tiles[:, :, 0, :, 0]
    assert (per_tile[:, :, 1:] != per_tile[:, :, :-1]).any()
    assert (per_tile[:, 1:, :] != per_tile[:, :-1, :]).any()


@pytest.mark.parametrize("p", [0.3, 0.7])
def test_hidden_fraction_is_binomial(p):
    batch, grid = 400, 8
    mask = couplings.tile_mask(jax.random.key(1), (batch, 16, 16, 1), grid, p)
    per_tile = np.asarray(mask[:, ::2, ::2, 0])  # one pixel per tile
    n = batch * grid * grid
    hidden = int((per_tile == 0).sum())
    assert abs(hidden - n * p) < 4 * np.sqrt(n * p * (1 - p))
    # Tiles are independent: per-image counts have the binomial variance.
    counts = (per_tile == 0).reshape(batch, -1).sum(axis=1)
    assert counts.var() == pytest.approx(64 * p * (1 - p), rel=0.25)


def test_tile_mask_extreme_probabilities():
    shape = (3, 8, 8, 1)
    assert float(couplings.tile_mask(jax.random.key(0), shape, 8, 0.0).min()) == 1.0
    assert float(couplings.tile_mask(jax.random.key(0), shape, 8, 1.0).max()) == 0.0


def test_inpainting_keeps_known_pixels_in_every_channel():
    x1 = _images()
    sample = jax.jit(InpaintingCoupling())(jax.random.key(2), x1)  # 8 x 8 grid, p = 0.3
    mask = np.asarray(sample.mask)
    assert mask.shape == x1.shape[:3] + (1,)
    known = np.broadcast_to(mask == 1, x1.shape)
    x0, x1 = np.asarray(sample.x0), np.asarray(x1)
    # 1 = known: x0 is x1 there, in all channels; elsewhere it is noise.
    np.testing.assert_array_equal(x0[known], x1[known])
    assert np.all(x0[~known] != x1[~known])
    assert abs(x0[~known].std() - 1.0) < 0.1
    assert 0.55 < mask.mean() < 0.85  # about 70 % known
    np.testing.assert_array_equal(sample.cond, sample.mask)
    np.testing.assert_array_equal(sample.center, mask * x1)
    np.testing.assert_array_equal(sample.sigma, 1.0 - mask)
    assert couplings.cond_channels(InpaintingCoupling(), 3) == sample.cond.shape[-1]


def test_box_down_and_nearest_up():
    x = jnp.arange(2 * 4 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 4, 2)
    down = couplings.box_downsample(x, 2)
    assert down.shape == (2, 2, 2, 2)
    np.testing.assert_allclose(down[0, 0, 0], x[0, :2, :2].mean(axis=(0, 1)))
    np.testing.assert_allclose(down[1, 1, 0], x[1, 2:, :2].mean(axis=(0, 1)))
    up = couplings.nearest_upsample(down, 2)
    np.testing.assert_array_equal(
        up[:, 2:, 2:], jnp.broadcast_to(down[:, 1:, 1:], (2, 2, 2, 2))
    )
    # U D is a projection: applying it twice changes nothing.
    again = couplings.nearest_upsample(couplings.box_downsample(up, 2), 2)
    np.testing.assert_allclose(again, up, rtol=1e-6)


def test_superres_coupling():
    x1 = _images((200, 8, 8, 3))
    coupling = SuperResolutionCoupling(factor=4)
    assert coupling.sigma == 1.0
    sample = jax.jit(coupling)(jax.random.key(3), x1)
    center = couplings.nearest_upsample(couplings.box_downsample(x1, 4), 4)
    np.testing.assert_array_equal(sample.center, center)
    np.testing.assert_array_equal(sample.cond, center)  # clean, no noise
    noise = np.asarray(sample.x0 - center)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1.0) < 0.02
    assert sample.mask is None
    exact = SuperResolutionCoupling(factor=2, sigma=0.0)(jax.random.key(3), x1)
    np.testing.assert_array_equal(exact.x0, exact.center)
    assert couplings.cond_channels(coupling, 3) == 3


def test_independent_coupling_and_its_conditioned_baselines():
    x1 = _images()
    key = jax.random.key(4)
    plain = IndependentCoupling()(key, x1)
    other = IndependentCoupling()(key, -x1)
    np.testing.assert_array_equal(plain.x0, other.x0)  # does not depend on x1
    assert plain.cond is None and plain.mask is None
    np.testing.assert_array_equal(plain.center, 0.0)

    baseline = IndependentCoupling(condition_like=InpaintingCoupling(grid=4))
    sample = baseline(key, x1)
    assert sample.mask is None  # no output mask for the baseline
    mask = sample.cond[..., :1]
    np.testing.assert_array_equal(sample.cond[..., 1:], mask * x1)
    assert couplings.cond_channels(baseline, 3) == sample.cond.shape[-1] == 4
    # Same key, same mask and noise as the coupled model: both are evaluated
    # on the same hidden pixels.
    coupled = InpaintingCoupling(grid=4)(key, x1)
    assert 0 < float(coupled.mask.mean()) < 1
    np.testing.assert_array_equal(mask, coupled.mask)
    hidden = np.asarray(coupled.mask) == 0
    np.testing.assert_array_equal(
        np.asarray(sample.x0)[np.broadcast_to(hidden, x1.shape)],
        np.asarray(coupled.x0)[np.broadcast_to(hidden, x1.shape)],
    )

    sr_baseline = IndependentCoupling(condition_like=SuperResolutionCoupling(factor=2))
    sample = sr_baseline(key, x1)
    want = couplings.nearest_upsample(couplings.box_downsample(x1, 2), 2)
    np.testing.assert_array_equal(sample.cond, want)
    assert couplings.cond_channels(sr_baseline, 3) == 3


def test_class_conditioning_drops_to_the_null_class():
    x1 = _images((4000, 4, 4, 1))
    labels = np.arange(4000) % 10
    keep = ClassConditioning(InpaintingCoupling(grid=2), num_classes=10)
    np.testing.assert_array_equal(
        jax.jit(keep)(jax.random.key(5), x1, labels).labels, labels
    )
    drop_all = ClassConditioning(InpaintingCoupling(grid=2), 10, p_uncond=1.0)
    np.testing.assert_array_equal(
        jax.jit(drop_all)(jax.random.key(5), x1, labels).labels, 10
    )

    some = ClassConditioning(SuperResolutionCoupling(factor=2), 10, p_uncond=0.2)
    sample = jax.device_get(jax.jit(some)(jax.random.key(6), x1, labels))
    dropped = sample.labels == 10
    assert abs(dropped.sum() - 800) < 4 * np.sqrt(4000 * 0.2 * 0.8)
    np.testing.assert_array_equal(sample.labels[~dropped], labels[~dropped])
    # Labels add no image channel: the network decides how they enter.
    assert sample.cond.shape[-1] == couplings.cond_channels(some, 1) == 1
    with pytest.raises(ValueError, match="needs labels"):
        keep(jax.random.key(0), x1)


def test_bad_arguments_raise_naming_the_value():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="12x16.*tile grid 8"):
        InpaintingCoupling()(key, jnp.zeros((2, 12, 16, 3)))
    with pytest.raises(ValueError, match="16x16.*factor 3"):
        SuperResolutionCoupling(factor=3)(key, jnp.zeros((2, 16, 16, 3)))
    with pytest.raises(ValueError, match="10x10.*tile grid 4"):
        IndependentCoupling(
            condition_like=InpaintingCoupling(grid=4)
        ).check_image_shape((1, 10, 10, 3))
    with pytest.raises(ValueError, match="sigma.*-0.5"):
        SuperResolutionCoupling(sigma=-0.5)
    with pytest.raises(ValueError, match="p.*1.5"):
        InpaintingCoupling(p=1.5)
    with pytest.raises(ValueError, match="p.*-0.1"):
        couplings.tile_mask(key, (1, 8, 8, 1), 8, -0.1)
    with pytest.raises(ValueError, match="p_uncond.*2.0"):
        ClassConditioning(InpaintingCoupling(), 10, p_uncond=2.0)
    with pytest.raises(ValueError, match="grid.*0"):
        InpaintingCoupling(grid=0)
    with pytest.raises(ValueError, match="factor.*2.5"):
        SuperResolutionCoupling(factor=2.5)
    with pytest.raises(ValueError, match="num_classes.*0"):
        ClassConditioning(InpaintingCoupling(), 0)


def test_bad_labels_and_data_raise_naming_the_value():
    key = jax.random.key(0)
    x1 = jnp.zeros((2, 8, 8, 3))
    classes = ClassConditioning(IndependentCoupling(), num_classes=10)
    for labels, message in [
        (np.array([10, 3]), r"\[0, num_classes = 10\).*got \[10\]"),
        (np.array([-1, 3]), r"got \[-1\]"),
        (np.array([2.7, 3.0]), "integers, got dtype float"),
        (np.array([1, 2, 3]), r"shape \(3,\).*expected shape \(2,\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            classes(key, x1, labels)
    for coupling in (
        IndependentCoupling(),
        InpaintingCoupling(grid=4),
        SuperResolutionCoupling(factor=2),
    ):
        with pytest.raises(ValueError, match="floating-point.*int32"):
            coupling(key, jnp.zeros((2, 8, 8, 3), jnp.int32))
        sample = coupling(key, x1.astype(jnp.bfloat16))
        assert sample.x0.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="sigma.*inf"):
        SuperResolutionCoupling(sigma=float("inf"))


def _config(**overrides):
    config = ml_collections.ConfigDict(
        dict(
            name="inpainting",
            grid=8,
            p=0.3,
            factor=4,
            sigma=1.0,
            baseline_condition="none",
            num_classes=0,
            p_uncond=0.0,
            class_channel=False,
        )
    )
    config.update(overrides)
    return config


def test_from_config_builds_every_coupling():
    assert couplings.from_config(_config(grid=4, p=0.5)) == InpaintingCoupling(4, 0.5)
    assert couplings.from_config(_config(name="superres", factor=2, sigma=0.5)) == (
        SuperResolutionCoupling(2, 0.5)
    )
    assert couplings.from_config(_config(name="independent")) == IndependentCoupling()
    baseline = couplings.from_config(
        _config(name="independent", baseline_condition="inpainting", p=0.4)
    )
    assert baseline == IndependentCoupling(InpaintingCoupling(8, 0.4))
    sr_baseline = couplings.from_config(
        _config(name="independent", baseline_condition="superres", factor=2)
    )
    assert sr_baseline == IndependentCoupling(SuperResolutionCoupling(2, 1.0))
    conditional = couplings.from_config(
        _config(name="superres", num_classes=10, p_uncond=0.1, class_channel=True)
    )
    assert conditional == ClassConditioning(SuperResolutionCoupling(4, 1.0), 10, 0.1)
    with pytest.raises(ValueError, match="'colour'"):
        couplings.from_config(_config(name="colour"))
    with pytest.raises(ValueError, match="'both'"):
        couplings.from_config(_config(name="independent", baseline_condition="both"))
    with pytest.raises(ValueError, match="1.2"):
        couplings.from_config(_config(p=1.2))
    # Fields the chosen coupling does not read are checked all the same.
    with pytest.raises(ValueError, match="p_uncond.*2"):
        couplings.from_config(_config(num_classes=0, p_uncond=2.0))
    with pytest.raises(ValueError, match="sigma.*nan"):
        couplings.from_config(_config(sigma=float("nan")))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(name="superres", grid=0), "coupling.grid must be .*, got 0"),
        (dict(name="superres", p=2.0), "coupling.p must be .*, got 2.0"),
        (dict(factor=-2), "coupling.factor must be .*, got -2"),
        (
            dict(name="superres", baseline_condition="bogus"),
            r"coupling.baseline_condition 'bogus' is not one of "
            r"\['inpainting', 'none', 'superres'\]",
        ),
        (
            dict(baseline_condition="superres"),
            r"coupling.baseline_condition='superres' belongs to the uncoupled "
            r"baseline \(coupling.name='independent'\); the 'inpainting' coupling",
        ),
        (
            dict(name="superres", factor=1),
            r"coupling.factor=1 would give the network x1 itself as conditioning",
        ),
        (
            dict(name="independent", baseline_condition="superres", factor=1),
            r"coupling.factor=1 would give",
        ),
        (dict(name="colour", baseline_condition="superres"), "coupling 'colour' is"),
    ],
)
def test_fields_the_coupling_does_not_read_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        couplings.from_config(_config(**overrides))


def test_a_factor_of_one_is_refused_only_where_super_resolution_reads_it():
    config = _config(factor=1)  # in-painting: the factor is not read
    assert couplings.from_config(config) == InpaintingCoupling(8, 0.3)
    # The library's coupling itself allows it (x0 = x1 + sigma zeta).
    assert SuperResolutionCoupling(1, 0.5).factor == 1


def test_base_noise_scale_of_each_coupling():
    assert couplings.base_noise_scale(InpaintingCoupling()) == 1.0
    assert couplings.base_noise_scale(IndependentCoupling()) == 1.0
    assert couplings.base_noise_scale(SuperResolutionCoupling(2, 0.25)) == 0.25
    wrapped = ClassConditioning(SuperResolutionCoupling(2, 0.0), 10)
    assert couplings.base_noise_scale(wrapped) == 0.0
    assert couplings.base_noise_scale(lambda key, x1, labels=None: None) is None


def test_nearest_upsample_needs_image_batches():
    with pytest.raises(ValueError, match=r"\[batch, h, w, C\].*\(4, 8, 3\)"):
        couplings.nearest_upsample(jnp.zeros((4, 8, 3)), 2)


def test_user_defined_coupling():
    """A colourisation coupling written outside the library, used for training."""

    def colourise(key, x1, labels=None, sigma=0.5):
        grey = jnp.mean(x1, axis=-1, keepdims=True)  # [B, H, W, 1]
        center = jnp.broadcast_to(grey, x1.shape)
        zeta = jax.random.normal(key, x1.shape, x1.dtype)
        return CouplingSample(
            x0=center + sigma * zeta,
            center=center,
            sigma=sigma,
            cond=grey,
            labels=labels,
        )

    def apply_fn(params, x_t, t, cond=None, labels=None):
        # A per-pixel affine map of [x_t, grey, t]: enough to check the wiring.
        inputs = jnp.concatenate(
            [x_t, cond, jnp.broadcast_to(t[:, None, None, None], cond.shape)], -1
        )
        return inputs @ params["w"] + params["b"]

    x1 = _images((2048, 4, 4, 3))
    loss_fn = losses.make_loss_fn(apply_fn, interpolants.linear(), colourise, 0.0, 1.0)
    zero = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}
    _, terms = jax.jit(loss_fn)(zero, jax.random.key(7), x1)
    # b = 0: the MSE is |dx_t|^2 = |x1 - grey - 0.5 zeta|^2 per example, whose
    # mean is |x1 - grey|^2 + 0.25 * 48.
    want = (
        float(jnp.mean(jnp.sum((x1 - x1.mean(-1, keepdims=True)) ** 2, (1, 2, 3))))
        + 12.0
    )
    mse = np.asarray(terms.velocity_mse)
    assert abs(mse.mean() - want) < 4 * mse.std() / np.sqrt(mse.size)
    np.testing.assert_array_equal(terms.velocity, 0.0)

    params = {"w": 0.1 * jnp.ones((5, 3)), "b": jnp.zeros(3)}
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, jax.random.key(7), x1)[0]))(params)
    assert np.all(np.isfinite(grads["w"])) and float(jnp.abs(grads["w"]).max()) > 0


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: InpaintingCoupling(p="0.3"),
            r"p must be a real number in \[0, 1\], got '0.3'",
        ),
        (lambda: InpaintingCoupling(p=None), r"p must be a real number.*got None"),
        (lambda: InpaintingCoupling(p=True), r"p must be a real number.*got True"),
        (lambda: InpaintingCoupling(p=float("nan")), r"in \[0, 1\], got nan"),
        (
            lambda: SuperResolutionCoupling(2, sigma="1"),
            "sigma must be a real number.*finite and >= 0, got '1'",
        ),
        (
            lambda: SuperResolutionCoupling(2, sigma=None),
            "sigma must be a real number.*got None",
        ),
        (
            lambda: SuperResolutionCoupling(2, sigma=1j),
            "sigma must be a real number.*got 1j",
        ),
        (
            lambda: SuperResolutionCoupling(2, jnp.array([1.0, 2.0])),
            r"sigma must be a scalar, got shape \(2,\)",
        ),
        (
            lambda: SuperResolutionCoupling(factor=True),
            "factor must be a positive integer, got True",
        ),
        (
            lambda: SuperResolutionCoupling(factor="2"),
            "factor must be a positive integer, got '2'",
        ),
        (
            lambda: InpaintingCoupling(grid=4.0),
            "grid must be a positive integer, got 4.0",
        ),
        (
            lambda: ClassConditioning(InpaintingCoupling(), num_classes=True),
            "num_classes must be a positive integer, got True",
        ),
        (
            lambda: ClassConditioning(InpaintingCoupling(), 10, p_uncond="0"),
            r"p_uncond must be a real number in \[0, 1\], got '0'",
        ),
        (
            lambda: couplings.tile_mask(jax.random.key(0), (1, 8, 8, 1), 8, None),
            "p must be a real number.*got None",
        ),
        (
            lambda: couplings.from_config(_config(sigma=None)),
            "coupling.sigma must be a real number.*got None",
        ),
    ],
)
def test_numeric_parameters_must_be_real_numbers_in_range(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_traced_mask_probability_is_not_checked():
    draw = jax.jit(lambda p: couplings.tile_mask(jax.random.key(0), (2, 4, 4, 1), 2, p))
    np.testing.assert_array_equal(draw(0.0), 1.0)
    np.testing.assert_array_equal(draw(1.0), 0.0)


def test_lists_are_taken_as_arrays():
    key = jax.random.key(3)
    x1 = [[[[0.5], [-0.5]], [[0.25], [1.0]]]]  # one 2x2 image, one channel
    from_list = InpaintingCoupling(grid=1, p=0.0)(key, x1)
    np.testing.assert_array_equal(from_list.x0, jnp.asarray(x1))
    np.testing.assert_array_equal(from_list.mask, 1.0)

    classes = ClassConditioning(InpaintingCoupling(grid=2), num_classes=3)
    sample = classes(key, jnp.zeros((2, 2, 2, 1)), [2, 0])
    np.testing.assert_array_equal(sample.labels, [2, 0])
    assert sample.labels.dtype == jnp.int32
    with pytest.raises(
        ValueError, match="class labels must be integers, got dtype <U1"
    ):
        classes(key, jnp.zeros((1, 2, 2, 1)), ["a"])
    with pytest.raises(ValueError, match="x1 must be an array of numbers, got None"):
        InpaintingCoupling()(key, None)


@pytest.mark.parametrize("shape", [(0, 8, 8, 1), (2, 0, 0, 1), (2, 8, 8, 0)])
@pytest.mark.parametrize(
    "coupling",
    [
        IndependentCoupling(),
        InpaintingCoupling(grid=4),
        SuperResolutionCoupling(factor=2),
        ClassConditioning(InpaintingCoupling(grid=4), num_classes=3),
    ],
)
def test_empty_batches_and_images_are_refused(coupling, shape):
    labels = jnp.zeros(shape[0], jnp.int32)
    with pytest.raises(
        ValueError, match=rf"x1 of shape {re.escape(str(shape))} is empty"
    ):
        coupling(jax.random.key(0), jnp.zeros(shape), labels)


def test_empty_image_shapes_are_refused():
    with pytest.raises(ValueError, match=r"H and W >= 1, got shape \(1, 0, 0, 3\)"):
        InpaintingCoupling().check_image_shape((1, 0, 0, 3))
    with pytest.raises(
        ValueError, match=r"batch, H and W >= 1, got shape \(0, 8, 8, 1\)"
    ):
        couplings.tile_mask(jax.random.key(0), (0, 8, 8, 1))


@pytest.mark.parametrize(
    "like",
    [
        ClassConditioning(InpaintingCoupling(), num_classes=10),
        IndependentCoupling(),
        "inpainting",
    ],
)
def test_independent_baseline_refuses_what_it_cannot_mirror(like):
    with pytest.raises(
        ValueError, match=rf"condition_like must be .*got {re.escape(repr(like))}"
    ):
        IndependentCoupling(condition_like=like)
