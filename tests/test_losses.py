"""Losses: per-example terms, gradients, output mask, time bins."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stochinterp import fields, interpolants, losses
from stochinterp.couplings import (
    IndependentCoupling,
    InpaintingCoupling,
    SuperResolutionCoupling,
    box_downsample,
    cond_channels,
    nearest_upsample,
)


def _affine_net(out_factor: int = 1):
    """A per-pixel affine map of [x_t, cond, t]: a tiny network."""

    def apply_fn(params, x_t, t, cond=None, labels=None):
        parts = [x_t, jnp.broadcast_to(t[:, None, None, None], x_t.shape[:3] + (1,))]
        if cond is not None:
            parts.insert(1, cond)
        return jnp.concatenate(parts, -1) @ params["w"] + params["b"]

    def init(key, in_channels, out_channels):
        key_w, key_b = jax.random.split(key)
        return {
            "w": jax.random.normal(key_w, (in_channels, out_channels * out_factor)),
            "b": jax.random.normal(key_b, (out_channels * out_factor,)),
        }

    return apply_fn, init


def _images(shape=(64, 8, 8, 3), seed=0):
    return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


def test_velocity_terms_by_hand():
    b = jnp.array([[1.0, 2.0], [0.0, -1.0]])
    dx_t = jnp.array([[3.0, 0.0], [1.0, 1.0]])
    loss, mse = losses.velocity_terms(b, dx_t)
    np.testing.assert_array_equal(loss, [1 + 4 - 6, 1 + 2])
    np.testing.assert_array_equal(mse, [4 + 4, 1 + 4])
    g, z = jnp.array([[2.0, 0.0]]), jnp.array([[1.0, 5.0]])
    np.testing.assert_array_equal(losses.denoiser_term(g, z), [4 - 4])


@pytest.mark.parametrize(
    "coupling,path",
    [
        (InpaintingCoupling(grid=4), interpolants.linear()),
        (SuperResolutionCoupling(factor=2), interpolants.trigonometric()),
        (IndependentCoupling(), interpolants.linear(gamma="sqrt")),
    ],
)
def test_loss_and_mse_have_equal_gradients(coupling, path):
    apply_fn, init = _affine_net()
    x1 = _images()
    in_channels = 3 + cond_channels(coupling, 3) + 1
    params = init(jax.random.key(1), in_channels, 3)
    loss_fn = losses.make_loss_fn(apply_fn, path, coupling, 0.01, 0.99)
    key = jax.random.key(2)

    def mean_term(p, name):
        return jnp.mean(getattr(loss_fn(p, key, x1)[1], name))

    grad_loss = jax.grad(mean_term)(params, "velocity")
    grad_mse = jax.grad(mean_term)(params, "velocity_mse")
    for name in params:
        np.testing.assert_allclose(
            grad_loss[name], grad_mse[name], rtol=2e-4, atol=1e-4
        )
        assert float(jnp.abs(grad_loss[name]).max()) > 1e-2
    # The two differ by the constant E|dx_t|^2 > 0, not by nothing.
    assert float(mean_term(params, "velocity_mse") - mean_term(params, "velocity")) > 1


def test_inpainting_velocity_is_zero_on_known_pixels():
    apply_fn, init = _affine_net()
    params = init(jax.random.key(3), 3 + 1 + 1, 3)
    x1 = _images()
    coupling = InpaintingCoupling(grid=4, p=0.5)
    sample = coupling(jax.random.key(4), x1)
    x_t, _ = losses.interpolate(interpolants.linear(), sample, x1, jnp.full(64, 0.4))
    b, _ = fields.network_fields(apply_fn, params, 3)(0.4, x_t, sample.xi)
    known = np.broadcast_to(np.asarray(sample.mask) == 1, b.shape)
    assert np.all(np.asarray(b)[known] == 0.0)
    assert np.all(np.asarray(b)[~known] != 0.0)

    # Through the loss: output on known pixels does not count at all.
    def loud_on_known(p, x_t, t, cond=None, labels=None):
        return apply_fn(p, x_t, t, cond) + 1e3 * cond  # cond is the mask

    key = jax.random.key(5)
    _, quiet = losses.make_loss_fn(apply_fn, interpolants.linear(), coupling, 0, 1)(
        params, key, x1
    )
    _, loud = losses.make_loss_fn(loud_on_known, interpolants.linear(), coupling, 0, 1)(
        params, key, x1
    )
    np.testing.assert_array_equal(quiet.velocity, loud.velocity)
    np.testing.assert_array_equal(quiet.velocity_mse, loud.velocity_mse)


@pytest.mark.parametrize(
    "path", [interpolants.trigonometric(), interpolants.linear(gamma="sqrt")]
)
def test_known_pixels_are_held_at_x1_for_every_path(path):
    x1 = _images((8, 8, 8, 2))
    sample = InpaintingCoupling(grid=4, p=0.5)(jax.random.key(6), x1)
    z = jax.random.normal(jax.random.key(7), x1.shape)
    t = jnp.linspace(0.1, 0.9, 8)
    x_t, dx_t = losses.interpolate(path, sample, x1, t, z)
    known = np.broadcast_to(np.asarray(sample.mask) == 1, x1.shape)
    np.testing.assert_array_equal(np.asarray(x_t)[known], np.asarray(x1)[known])
    assert np.all(np.asarray(dx_t)[known] == 0.0)
    free_x_t = path.x_t(t, sample.x0, x1, z)
    np.testing.assert_array_equal(np.asarray(x_t)[~known], np.asarray(free_x_t)[~known])


def test_denoiser_term_and_its_checks():
    apply_fn, init = _affine_net(out_factor=2)
    path = interpolants.linear(gamma="sqrt")
    coupling = InpaintingCoupling(grid=4)
    params = init(jax.random.key(8), 3 + 1 + 1, 3)
    loss_fn = losses.make_loss_fn(apply_fn, path, coupling, 0.01, 0.99, denoiser=True)
    total, terms = loss_fn(params, jax.random.key(9), _images())
    assert terms.denoiser.shape == (64,) and float(jnp.abs(terms.denoiser).min()) > 0
    np.testing.assert_allclose(
        total, jnp.mean(terms.velocity + terms.denoiser), rtol=1e-6
    )

    with pytest.raises(ValueError, match="gamma > 0"):
        losses.make_loss_fn(apply_fn, interpolants.linear(), coupling, 0, 1, True)
    with pytest.raises(ValueError, match="t_min=0.0"):
        losses.make_loss_fn(apply_fn, path, coupling, 0.0, 0.99)
    plain_fn, plain_init = _affine_net()
    bad = losses.make_loss_fn(plain_fn, path, coupling, 0.01, 0.99, denoiser=True)
    with pytest.raises(ValueError, match="2 \\* C output channels"):
        bad(plain_init(jax.random.key(0), 5, 3), jax.random.key(0), _images())


def test_make_loss_fn_names_arguments_of_the_wrong_kind():
    apply_fn, init = _affine_net()
    path, coupling = interpolants.linear(), InpaintingCoupling(grid=4)
    with pytest.raises(ValueError, match="apply_fn must be callable, got None"):
        losses.make_loss_fn(None, path, coupling, 0.0, 1.0)
    with pytest.raises(ValueError, match="coupling must be callable, got 'inpaint'"):
        losses.make_loss_fn(apply_fn, path, "inpaint", 0.0, 1.0)
    with pytest.raises(ValueError, match="must be an Interpolant .* got 'linear'"):
        losses.make_loss_fn(apply_fn, "linear", coupling, 0.0, 1.0)

    def as_dict(key, x1, labels=None):
        return coupling(key, x1, labels).xi

    loss_fn = losses.make_loss_fn(apply_fn, path, as_dict, 0.0, 1.0)
    params = init(jax.random.key(0), 3 + 1 + 1, 3)
    with pytest.raises(ValueError, match="must return a CouplingSample, got dict"):
        loss_fn(params, jax.random.key(1), _images())


@pytest.mark.parametrize(
    "mask, message",
    [
        (jnp.ones((64, 8, 8)), r"mask of shape \(64, 8, 8\) does not broadcast"),
        (jnp.full((64, 8, 8, 1), 0.5), r"only 0 \(to generate\) and 1 .* e.g. \[0.5\]"),
    ],
)
def test_a_user_couplings_mask_is_checked_against_the_images(mask, message):
    apply_fn, init = _affine_net()

    def masked(key, x1, labels=None):
        return InpaintingCoupling(grid=4)(key, x1).replace(mask=mask)

    loss_fn = losses.make_loss_fn(apply_fn, interpolants.linear(), masked, 0.0, 1.0)
    params = init(jax.random.key(0), 3 + 1 + 1, 3)
    with pytest.raises(ValueError, match=message):
        loss_fn(params, jax.random.key(1), _images())


def test_loss_by_time_bin_counts():
    t = jnp.array([0.01, 0.02, 0.30, 0.26, 0.99, 1.0, 0.55])
    values = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    sums, counts = losses.loss_by_time_bin(t, values, 4)
    np.testing.assert_array_equal(counts, [2, 2, 1, 2])
    np.testing.assert_array_equal(sums, [3, 7, 7, 11])

    # A sub-range: times outside go to the end bins.
    sums, counts = losses.loss_by_time_bin(t, values, 2, t_min=0.2, t_max=0.6)
    np.testing.assert_array_equal(counts, [4, 3])
    np.testing.assert_array_equal(sums, [1 + 2 + 3 + 4, 5 + 6 + 7])
    with pytest.raises(ValueError, match="num_bins.*0"):
        losses.loss_by_time_bin(t, values, 0)
    with pytest.raises(ValueError, match="t_min=0.6, t_max=0.2"):
        losses.loss_by_time_bin(t, values, 2, 0.6, 0.2)

    # A non-finite time (and its value) is not counted anywhere.
    t_nan = t.at[0].set(jnp.nan)
    sums, counts = losses.loss_by_time_bin(t_nan, values.at[0].set(jnp.nan), 4)
    np.testing.assert_array_equal(counts, [1, 2, 1, 2])
    np.testing.assert_array_equal(sums, [2, 7, 7, 11])


def test_times_and_loss_keep_float32_under_x64():
    apply_fn, init = _affine_net()
    coupling = InpaintingCoupling(grid=4)
    params = init(jax.random.key(1), 3 + cond_channels(coupling, 3) + 1, 3)
    x1, key = _images(), jax.random.key(2)
    loss_fn = losses.make_loss_fn(apply_fn, interpolants.linear(), coupling, 0, 1)
    plain = interpolants.sample_times(key, 8, 0.25, 0.5)
    _, terms32 = loss_fn(params, key, x1)
    with jax.enable_x64(True):
        wide = interpolants.sample_times(key, 8, 0.25, 0.5)
        loss, terms = loss_fn(params, key, x1)
        params64 = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        loss64, terms64 = loss_fn(params64, key, x1.astype(jnp.float64))
        times64 = interpolants.sample_times(key, 8, 0.25, 0.5, jnp.float64)
        assert float(times64.min()) >= 0.25 and float(times64.max()) < 0.5
    assert wide.dtype == plain.dtype == jnp.float32
    np.testing.assert_array_equal(wide, plain)
    assert loss.dtype == terms.t.dtype == jnp.float32
    np.testing.assert_array_equal(terms.t, terms32.t)
    assert loss64.dtype == terms64.t.dtype == times64.dtype == jnp.float64
    with pytest.raises(ValueError, match="dtype must be a floating dtype of at least"):
        interpolants.sample_times(key, 8, 0.25, 0.5, jnp.bfloat16)


def test_an_exact_velocity_gives_zero_mse_and_the_known_loss():
    # Super-resolution without noise on the linear path: x0 = U D x1 is the
    # conditioning, so (x_t - cond) / t = x1 - x0 = dx_t exactly.
    def exact(params, x_t, t, cond=None, labels=None):
        return (x_t - cond) / t[:, None, None, None]

    coupling = SuperResolutionCoupling(factor=2, sigma=0.0)
    path = interpolants.linear()
    x1 = _images()
    loss_fn = losses.make_loss_fn(exact, path, coupling, 0.2, 0.7)
    total, terms = loss_fn({}, jax.random.key(3), x1)
    step = x1 - nearest_upsample(box_downsample(x1, 2), 2)
    energy = jnp.sum(step**2, axis=(1, 2, 3))
    np.testing.assert_allclose(terms.velocity_mse, 0.0, atol=1e-4)
    np.testing.assert_allclose(terms.velocity, -energy, rtol=1e-5)
    np.testing.assert_allclose(total, -jnp.mean(energy), rtol=1e-5)
    assert float(jnp.min(energy)) > 1.0  # the target is not zero
    # The times are drawn from [t_min, t_max) and reach the network as given.
    t = np.asarray(terms.t)
    assert t.shape == (64,) and 0.2 <= t.min() and t.max() < 0.7
    assert abs(t.mean() - 0.45) < 4 * 0.5 / np.sqrt(12 * 64)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_denoiser_target_is_the_noise_on_hidden_pixels_only(p):
    def constant_denoiser(params, x_t, t, cond=None, labels=None):
        return jnp.concatenate([jnp.zeros_like(x_t), jnp.ones_like(x_t)], -1)

    coupling = InpaintingCoupling(grid=4, p=p)  # p = 0: all known; 1: all hidden
    path = interpolants.linear(gamma="sqrt")
    loss_fn = losses.make_loss_fn(
        constant_denoiser, path, coupling, 0.01, 0.99, denoiser=True
    )
    _, terms = loss_fn({}, jax.random.key(4), _images())
    # |g|^2 - 2 g . z_target with g = 1 on 8 x 8 x 3 values: 192 - 2 sum(z).
    sums = (192.0 - np.asarray(terms.denoiser)) / 2
    if p == 0.0:
        np.testing.assert_array_equal(sums, 0.0)
    else:  # sum of 192 standard normals per example: variance 192
        assert np.all(np.abs(sums) > 0)
        assert 192 * 0.4 < np.var(sums) < 192 * 1.8
