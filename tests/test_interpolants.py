"""Interpolants: exact ends, analytic derivatives, time ranges."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stochinterp import interpolants


def _cos_sin_by_hand():
    # A user writing the trigonometric pair naively: cos(pi / 2) is not 0 in
    # float32, so exact ends rely on the pinning in ``custom``.
    return interpolants.custom(
        alpha=lambda t: jnp.cos(jnp.pi * t / 2), beta=lambda t: jnp.sin(jnp.pi * t / 2)
    )


FAMILIES = {
    "linear": lambda g: interpolants.linear(gamma=g),
    "trigonometric": lambda g: interpolants.trigonometric(gamma=g, gamma_scale=2.0),
    "custom_quadratic": lambda g: interpolants.custom(
        alpha=lambda t: (1.0 - t) ** 2,
        beta=lambda t: 1.0 - (1.0 - t) ** 2,
        gamma=g,
        gamma_scale=0.5,
    ),
    "custom_cos_sin": lambda g: interpolants.custom(
        alpha=lambda t: jnp.cos(jnp.pi * t / 2),
        beta=lambda t: jnp.sin(jnp.pi * t / 2),
        gamma=g,
    ),
    "custom_user_gamma": lambda g: interpolants.custom(
        alpha=lambda t: 1.0 - t,
        beta=lambda t: t,
        gamma=(lambda t: 0.5 * t * (1.0 - t)) if g == "sqrt" else g,
    ),
}
CASES = [(name, g) for name in FAMILIES for g in ("zero", "sqrt")]


def _points(seed=0, shape=(5, 4, 4, 3)):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [3.0 * jax.random.normal(k, shape) for k in keys]


@pytest.mark.parametrize("name,gamma", CASES)
def test_ends_are_exact(name, gamma):
    path = FAMILIES[name](gamma)
    x0, x1, z = _points()
    n = x0.shape[0]
    np.testing.assert_array_equal(path.x_t(jnp.zeros(n), x0, x1, z), x0)
    np.testing.assert_array_equal(path.x_t(jnp.ones(n), x0, x1, z), x1)
    # Mixed times in one batch: each row picks its own end.
    t = jnp.array([0.0, 1.0, 0.0, 1.0, 0.0])
    want = jnp.where(t[:, None, None, None] == 0, x0, x1)
    np.testing.assert_array_equal(path.x_t(t, x0, x1, z), want)


@pytest.mark.parametrize("name,gamma", CASES)
def test_dx_t_matches_jvp_and_finite_difference(name, gamma):
    path = FAMILIES[name](gamma)
    x0, x1, z = _points(1)
    t = jnp.array([0.05, 0.3, 0.5, 0.71, 0.95])

    def path_at(s):
        return path.x_t(s, x0, x1, z)

    _, jvp = jax.jvp(path_at, (t,), (jnp.ones_like(t),))
    dx_t = path.dx_t(t, x0, x1, z)
    np.testing.assert_allclose(dx_t, jvp, rtol=1e-5, atol=1e-5)

    h = 1e-3
    finite = (path_at(t + h) - path_at(t - h)) / (2 * h)
    np.testing.assert_allclose(dx_t, finite, rtol=2e-3, atol=5e-3)


def test_a_wrong_derivative_is_caught_by_the_jvp_check():
    wrong = interpolants.custom(
        alpha=lambda t: 1.0 - t,
        beta=lambda t: t,
        alpha_dot=lambda t: jnp.zeros_like(t),  # should be -1
    )
    x0, x1, _ = _points(2)
    t = jnp.full((5,), 0.4)
    _, jvp = jax.jvp(lambda s: wrong.x_t(s, x0, x1), (t,), (jnp.ones_like(t),))
    assert not np.allclose(wrong.dx_t(t, x0, x1), jvp, rtol=1e-3, atol=1e-3)


def test_closed_forms_of_the_families():
    t = jnp.linspace(0.05, 0.95, 7)
    trig = interpolants.trigonometric()
    np.testing.assert_allclose(trig.alpha(t), jnp.cos(jnp.pi * t / 2), atol=1e-6)
    np.testing.assert_allclose(trig.alpha_dot(t), -jnp.pi / 2 * jnp.sin(jnp.pi * t / 2))
    np.testing.assert_allclose(trig.alpha(t) ** 2 + trig.beta(t) ** 2, 1.0, rtol=1e-6)
    noisy = interpolants.linear(gamma="sqrt", gamma_scale=2.0)
    np.testing.assert_allclose(noisy.gamma(t), jnp.sqrt(2.0 * t * (1 - t)), rtol=1e-6)
    np.testing.assert_allclose(
        noisy.gamma_dot(t), (1 - 2 * t) / jnp.sqrt(2.0 * t * (1 - t)), rtol=1e-5
    )
    assert noisy.has_noise and noisy.singular_ends
    assert not interpolants.linear().has_noise
    by_hand = _cos_sin_by_hand()
    assert float(by_hand.alpha(jnp.float32(1.0))) == 0.0
    np.testing.assert_allclose(by_hand.alpha(t), trig.alpha(t), atol=1e-6)
    np.testing.assert_allclose(by_hand.alpha_dot(t), trig.alpha_dot(t), atol=1e-6)


def test_noisy_path_needs_z():
    x0, x1, _ = _points()
    with pytest.raises(ValueError, match="needs a latent z"):
        interpolants.linear(gamma="sqrt").x_t(jnp.full((5,), 0.5), x0, x1)


def test_bad_paths_raise_naming_the_value():
    with pytest.raises(ValueError, match=r"alpha\(1\)=0.0.*alpha\(1\)=0.5"):
        interpolants.custom(alpha=lambda t: 1.0 - 0.5 * t, beta=lambda t: t)
    with pytest.raises(ValueError, match=r"gamma\(0\)=0.0.*gamma\(0\)=1.0"):
        interpolants.custom(
            alpha=lambda t: 1.0 - t, beta=lambda t: t, gamma=lambda t: 1.0 - t
        )
    with pytest.raises(ValueError, match="got -1.0"):
        interpolants.linear(gamma="sqrt", gamma_scale=-1.0)
    with pytest.raises(ValueError, match="'cubic'"):
        interpolants.linear(gamma="cubic")
    with pytest.raises(ValueError, match="'spline'"):
        interpolants.from_config("spline")


def test_from_config_builds_the_named_family():
    path = interpolants.from_config("trigonometric", "sqrt", 0.5)
    assert path.name == "trigonometric+sqrt"
    np.testing.assert_allclose(path.gamma(jnp.float32(0.5)), np.sqrt(0.125), rtol=1e-6)
    # The same settings give the same object (compiled programs are found again).
    assert interpolants.from_config("trigonometric", "sqrt", 0.5) is path
    assert interpolants.from_config("trigonometric", "sqrt", 0.25) is not path
    assert interpolants.linear() is interpolants.from_config("linear", "zero", 7)
    with pytest.raises(ValueError, match="gamma_scale must be a real number, got True"):
        interpolants.trigonometric("sqrt", True)  # even though 1.0 was built
    with pytest.raises(ValueError, match=r"'zero' or 'sqrt', got \['x'\]"):
        interpolants.from_config("linear", ["x"])


def test_time_range_checks():
    interpolants.check_time_range(0.0, 1.0)
    with pytest.raises(ValueError, match="t_min=0.7, t_max=0.2"):
        interpolants.check_time_range(0.7, 0.2)
    with pytest.raises(ValueError, match="t_max=1.5"):
        interpolants.check_time_range(0.0, 1.5)
    noisy = interpolants.linear(gamma="sqrt")
    interpolants.check_time_range(1e-3, 1 - 1e-3, noisy)
    with pytest.raises(ValueError, match="unbounded.*t_min=0.0"):
        interpolants.check_time_range(0.0, 0.9, noisy)
    with pytest.raises(ValueError, match="t_max=1.0"):
        interpolants.check_time_range(0.1, 1.0, noisy)
    # Distinct as Python floats, one number in float32.
    with pytest.raises(ValueError, match="same number in float32"):
        interpolants.check_time_range(0.5, 0.5 + 1e-9)
    tiny = float(np.finfo(np.float32).tiny)
    # XLA flushes float32 numbers below the smallest normal one to zero.
    with pytest.raises(ValueError, match="t_min=1e-300 is below float32's smallest"):
        interpolants.check_time_range(1e-300, 2e-300)
    with pytest.raises(ValueError, match="t_max=1e-40 is below.*use at least 1.18e-38"):
        interpolants.check_time_range(0.0, 1e-40)
    with pytest.raises(ValueError, match="same number in float32"):
        interpolants.check_time_range(tiny, tiny * (1 + 2**-22))
    interpolants.check_time_range(0.0, tiny)
    interpolants.check_time_range(0.5, 0.5 + 1e-7)  # float32 steps of 6e-8 here
    for bad in ("0", None, 1j, True, [0.0]):
        with pytest.raises(ValueError, match="t_min must be a (real number|scalar)"):
            interpolants.check_time_range(bad, 1.0)


def test_sample_times_cover_the_range():
    t = interpolants.sample_times(jax.random.key(0), 20_000, 0.2, 0.7)
    assert t.shape == (20_000,)
    assert float(t.min()) >= 0.2 and float(t.max()) < 0.7
    # Uniform: mean 0.45, sd of the mean 0.5 / sqrt(12 * 20000) = 0.001.
    assert abs(float(t.mean()) - 0.45) < 0.005
    with pytest.raises(ValueError, match="t_min=0.5, t_max=0.5"):
        interpolants.sample_times(jax.random.key(0), 4, 0.5, 0.5)


def test_broadcast_time():
    x = jnp.ones((3, 2, 2, 3))
    t = jnp.array([0.1, 0.5, 0.9])
    scaled = interpolants.linear().alpha(interpolants.broadcast_time(t, x)) * x
    np.testing.assert_allclose(scaled[:, 0, 0, 0], 1.0 - t)
    np.testing.assert_allclose(scaled[:, 1, 1, 2], 1.0 - t)
    assert interpolants.broadcast_time(0.5, x).shape == ()
    with pytest.raises(ValueError, match=r"\[3\].*\(4,\)"):
        interpolants.broadcast_time(jnp.zeros(4), x)
    with pytest.raises(ValueError, match=r"\[3\].*\(3, 2\)"):
        interpolants.linear().x_t(jnp.zeros((3, 2)), x, x)
    np.testing.assert_allclose(interpolants.linear().x_t(0.25, 0 * x, x), 0.25)


def test_x0_x1_and_z_must_share_one_shape():
    path = interpolants.linear()
    x = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match=r"x0 \(2, 4, 4, 3\) and x1 \(2, 4, 4, 1\)"):
        path.x_t(jnp.full((2,), 0.5), x, jnp.zeros((2, 4, 4, 1)))
    # One example against two, with one time for both.
    with pytest.raises(ValueError, match=r"x0 \(1, 4, 4, 3\) and x1 \(2, 4, 4, 3\)"):
        path.dx_t(0.5, jnp.zeros((1, 4, 4, 3)), x)
    noisy = interpolants.linear(gamma="sqrt")
    with pytest.raises(ValueError, match=r"z .*\(2, 4, 4, 3\), got \(2, 4, 4, 1\)"):
        noisy.x_t(0.5, x, x, jnp.zeros((2, 4, 4, 1)))
    # Shapes are static: they are checked inside jit too.
    with pytest.raises(ValueError, match=r"x1 \(2, 4, 4, 1\)"):
        jax.jit(path.x_t)(0.5, x, jnp.zeros((2, 4, 4, 1)))


@pytest.mark.parametrize("method", ["x_t", "dx_t"])
@pytest.mark.parametrize("bad", [1.5, -0.5, float("nan"), np.float32(1.5)])
def test_concrete_times_outside_the_unit_interval_raise(method, bad):
    x0, x1, z = _points()
    for path in (interpolants.linear(), interpolants.trigonometric(gamma="sqrt")):
        t = jnp.array([0.5, bad, 0.2, 0.3, 0.4])
        with pytest.raises(ValueError, match=rf"{method} needs .*t = \[{bad}\]"):
            getattr(path, method)(t, x0, x1, z)
        with pytest.raises(ValueError, match=rf"t = \[{bad}\]"):
            getattr(path, method)(bad, x0, x1, z)


def test_times_are_checked_only_when_concrete():
    x0, x1, z = _points()
    path = interpolants.linear(gamma="sqrt")
    # Traced times cannot be read: they pass (and extrapolate).
    out = jax.jit(path.x_t)(jnp.full((5,), 1.5), x0, x1, z)
    assert out.shape == x0.shape
    # The ends are valid times, except for dx_t where gamma_dot is unbounded.
    path.x_t(jnp.array([0.0, 1.0, 0.0, 1.0, 0.5]), x0, x1, z)
    interpolants.linear().dx_t(1.0, x0, x1)
    with pytest.raises(ValueError, match=r"0 < t < 1.*unbounded.*t = \[0.0, 1.0\]"):
        path.dx_t(jnp.array([0.0, 1.0, 0.0, 0.5, 0.5]), x0, x1, z)


@pytest.mark.parametrize("family", ["linear", "trigonometric", "custom"])
@pytest.mark.parametrize("scale", [float("inf"), float("nan"), -float("inf"), 0.0])
def test_sqrt_gamma_scale_must_be_finite_and_positive(family, scale):
    build = {
        "linear": interpolants.linear,
        "trigonometric": interpolants.trigonometric,
        "custom": lambda **kw: interpolants.custom(lambda t: 1 - t, lambda t: t, **kw),
    }[family]
    with pytest.raises(ValueError, match=rf"finite and > 0.*got {scale}"):
        build(gamma="sqrt", gamma_scale=scale)
    with pytest.raises(ValueError, match=rf"got {scale}"):
        interpolants.from_config("linear", "sqrt", np.float32(scale))


def test_gamma_scale_of_the_zero_form_must_still_be_a_finite_number():
    assert interpolants.linear(gamma_scale=0.0).name == "linear"
    for scale in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match=rf"finite and >= 0, got {scale}"):
            interpolants.linear(gamma_scale=scale)
    with pytest.raises(ValueError, match="real number, got '1.0'"):
        interpolants.linear(gamma="sqrt", gamma_scale="1.0")
    with pytest.raises(ValueError, match=r"scalar, got shape \(2,\)"):
        interpolants.trigonometric(gamma="sqrt", gamma_scale=jnp.ones(2))


def test_custom_needs_functions():
    with pytest.raises(ValueError, match="alpha must be a function of t, got 0.5"):
        interpolants.custom(alpha=0.5, beta=lambda t: t)
    with pytest.raises(ValueError, match="beta_dot must be .* or None, got 1.0"):
        interpolants.custom(alpha=lambda t: 1 - t, beta=lambda t: t, beta_dot=1.0)
    with pytest.raises(ValueError, match="gamma_dot is given but gamma is 'sqrt'"):
        interpolants.custom(
            alpha=lambda t: 1 - t,
            beta=lambda t: t,
            gamma="sqrt",
            gamma_dot=lambda t: t,
        )


def test_custom_names_functions_that_are_not_elementwise_jax():
    with pytest.raises(ValueError, match=r"alpha must be an elementwise .*TypeError"):
        interpolants.custom(alpha=lambda t: math.cos(t), beta=lambda t: t)
    with pytest.raises(ValueError, match=r"beta.* has shape \(\), expected \(2,\)"):
        interpolants.custom(alpha=lambda t: 1 - t, beta=lambda t: jnp.sum(t))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_custom_derivatives_keep_the_precision_of_the_family_paths(dtype):
    path = interpolants.custom(alpha=lambda t: 1 - t, beta=lambda t: t)
    x0, x1 = jnp.zeros((2, 3), dtype), jnp.ones((2, 3), dtype)
    for t in (0.25, jnp.array([0.25, 0.5], dtype)):
        ours = path.dx_t(t, x0, x1)
        theirs = interpolants.linear().dx_t(t, x0, x1)
        assert ours.dtype == theirs.dtype == dtype
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(path.alpha_dot(jnp.array([0, 1])), [-1.0, -1.0])


@pytest.mark.parametrize("method", ["x_t", "dx_t"])
@pytest.mark.parametrize("bad", ["0.5", None, 0.5j])
def test_times_that_are_not_real_numbers_are_named(method, bad):
    x = jnp.ones((1, 2))
    with pytest.raises(ValueError, match=f"needs real times t, got {bad!r}"):
        getattr(interpolants.linear(), method)(bad, x, x)


def test_paths_take_nested_lists():
    got = interpolants.linear(gamma="sqrt").x_t(
        0.5, [[1.0, 2.0]], [[3.0, 4.0]], [[1.0, 1.0]]
    )
    np.testing.assert_allclose(got, [[2.5, 3.5]])


def test_sample_times_checks_numpy_and_array_bounds():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="t_min=-1.0, t_max=2.0"):
        interpolants.sample_times(key, 4, np.float32(-1), np.float32(2))
    with pytest.raises(ValueError, match="t_min=0.5, t_max=0.25"):
        interpolants.sample_times(key, 4, jnp.float32(0.5), np.float64(0.25))
    with pytest.raises(ValueError, match=r"t_max must be a scalar, got shape \(2,\)"):
        interpolants.sample_times(key, 4, 0.0, np.ones(2))
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        interpolants.sample_times(key, 0, 0.0, 1.0)
    t = interpolants.sample_times(key, 4, np.float32(0.25), np.float32(0.5))
    assert 0.25 <= float(t.min()) and float(t.max()) < 0.5


def test_sample_times_checks_what_is_concrete_inside_jit():
    key = jax.random.key(0)
    t = jax.jit(lambda lo, hi: interpolants.sample_times(key, 4, lo, hi))(0.25, 0.5)
    assert t.shape == (4,)
    with pytest.raises(ValueError, match="t_min=-1.0"):
        jax.jit(lambda hi: interpolants.sample_times(key, 4, np.float32(-1), hi))(0.5)
