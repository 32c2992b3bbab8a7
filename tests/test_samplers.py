"""Samplers against exact Gaussian answers, exact call counts and masks."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stochinterp import fields, interpolants, samplers, sharding
from stochinterp.oracle import GaussianOracle

Settings = samplers.SamplerSettings
T_MIN, T_MAX = 1e-3, 1.0 - 1e-3


def _gaussian(d: int, seed: int) -> tuple[jax.Array, jax.Array]:
    factor = jax.random.normal(jax.random.key(seed), (d, d)) / np.sqrt(d)
    return jnp.linspace(-1.0, 1.0, d), factor @ factor.T + 0.3 * jnp.eye(d)


def _oracle(kind: str, interpolant=None, d: int = 6) -> GaussianOracle:
    interpolant = interpolant or interpolants.linear()
    mu1, S1 = _gaussian(d, seed=d)
    if kind == "independent":
        return GaussianOracle.independent(mu1, S1, interpolant)
    if kind == "inpainting":
        mask = jnp.arange(d) % 3 == 0
        return GaussianOracle.inpainting(mu1, S1, mask, interpolant)
    mu1, S1 = _gaussian(8, seed=8)
    return GaussianOracle.superres(mu1, S1, (2, 4, 1), 2, 0.7, interpolant)


def _velocity(oracle):
    return lambda t, x, xi: oracle.velocity(t, x)


def _moment_points(oracle, t):
    """The mean and the mean plus each Cholesky column of x_t: [d + 1, d]."""
    mean = oracle.mean(t)
    chol = jnp.linalg.cholesky(oracle.cov(t))
    return jnp.concatenate([mean[None], mean[None] + chol.T])


def _moment_error(oracle, points):
    """Error of the pushed-forward mean and covariance at T_MAX.

    The Gaussian velocity is affine in x, so every sampler here maps all
    points by one affine map: the images of ``_moment_points`` give the exact
    mean and covariance of the sampler's output distribution.
    """
    mean = points[0]
    diffs = points[1:] - mean
    cov = diffs.T @ diffs
    return float(
        jnp.linalg.norm(mean - oracle.mean(T_MAX))
        + jnp.linalg.norm(cov - oracle.cov(T_MAX))
    )


def _counting(field, log):
    """Wraps a field so that every executed call appends its time to ``log``."""

    def counted(t, x, xi):
        jax.debug.callback(lambda t: log.append(float(t)), t)
        return field(t, x, xi)

    return counted


def _run_counted(run):
    log = []
    out = run(log)
    jax.block_until_ready(out)
    jax.effects_barrier()
    return out, log


# ---------------------------------------------------------------- ODE orders


@pytest.mark.parametrize("kind", ["independent", "inpainting"])
@pytest.mark.parametrize(
    "method, steps, order",
    [("euler", (16, 32, 64, 128), 1.0), ("heun", (8, 16, 32, 64), 2.0)],
)
def test_fixed_step_order(kind, method, steps, order):
    oracle = _oracle(kind)
    points = _moment_points(oracle, T_MIN)
    errors = []
    for n in steps:
        settings = Settings(method, num_steps=n, t_min=T_MIN, t_max=T_MAX)
        x1, _ = samplers.integrate(_velocity(oracle), points, {}, settings)
        errors.append(_moment_error(oracle, x1))
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope + order) < 0.15, (errors, slope)


def test_dopri5_meets_tolerance_against_fine_reference():
    oracle = _oracle("superres")
    x0 = jax.random.normal(jax.random.key(3), (16, oracle.dim))
    fine = Settings("heun", num_steps=4000, t_min=T_MIN, t_max=T_MAX)
    with jax.enable_x64(True):
        oracle64 = dataclasses.replace(oracle)  # recast to float64
        reference, _ = samplers.integrate(
            _velocity(oracle64), x0.astype(jnp.float64), {}, fine
        )
        reference = np.asarray(reference)
    previous_error = np.inf
    for tol in (1e-3, 1e-4, 1e-5):
        settings = Settings(rtol=tol, atol=tol, t_min=T_MIN, t_max=T_MAX)
        x1, info = samplers.integrate(_velocity(oracle), x0, {}, settings)
        difference = np.asarray(x1, np.float64) - reference
        scaled = difference / (tol + tol * np.abs(reference))
        error = np.sqrt(np.mean(np.square(scaled)))
        assert error < 5.0, (tol, error)
        absolute = np.abs(difference).max()
        assert absolute < previous_error
        previous_error = absolute
        steps = int(info.accepted_steps + info.rejected_steps)
        assert int(info.nfe) == 2 + 6 * steps
        assert bool(info.success) and float(info.t_final) == np.float32(T_MAX)


# ---------------------------------------------------------- Euler-Maruyama

EM_SAMPLES = 10_000
EM_STEPS = 1000  # weak error of the step well below 3 standard errors


def _sde_problem(base: str, score_factor: float = 1.0):
    """(oracle, velocity, score, x_start, mask, eps_schedule) for an SDE test.

    'gaussian': independent Gaussian base with gamma = sqrt(t (1 - t)), score
    from the exact denoiser. 'coupled': in-painting coupling with gamma = 0,
    score from the velocity; the centre of x0 is its known part.
    """
    if base == "gaussian":
        interpolant = interpolants.linear(gamma="sqrt")
        oracle = _oracle("independent", interpolant, d=4)
        velocity = _velocity(oracle)

        def denoiser(t, x, xi):
            # The oracle's g = gamma S_t^{-1} (x - mu_t), with S_t^{-1} formed
            # once per call: a solve with 10k right-hand sides is slow on CPU.
            precision = jnp.linalg.inv(oracle.cov(t))
            return oracle.interpolant.gamma(t) * (x - oracle.mean(t)) @ precision

        score = fields.score_from_denoiser(denoiser, interpolant)
        mask, schedule = None, "constant"
    else:
        oracle = _oracle("inpainting", d=4)
        velocity = _velocity(oracle)
        mask = jnp.diag(oracle.A)
    chol = jnp.linalg.cholesky(oracle.cov(T_MIN))
    noise = jax.random.normal(jax.random.key(11), (EM_SAMPLES, oracle.dim))
    x_start = oracle.mean(T_MIN) + noise @ chol.T
    if base != "gaussian":
        score = fields.score_from_velocity(
            velocity, oracle.interpolant, x_start * mask, 1.0 - mask
        )
        schedule = "decay"
    scaled_score = lambda t, x, xi: score_factor * score(t, x, xi)  # noqa: E731
    return oracle, velocity, scaled_score, x_start, mask, schedule


def _moment_z_scores(oracle, x1) -> np.ndarray:
    """|z| of every coordinate's sample mean and variance against the target."""
    n = x1.shape[0]
    mean, var = oracle.mean(T_MAX), jnp.diag(oracle.cov(T_MAX))
    z_mean = (x1.mean(0) - mean) / jnp.sqrt(var / n)
    z_var = (x1.var(0, ddof=1) - var) / (var * np.sqrt(2.0 / (n - 1)))
    return np.abs(np.concatenate([z_mean, z_var]))


def _em_z_scores(base, eps_scale, score_factor=1.0):
    oracle, velocity, score, x_start, mask, schedule = _sde_problem(base, score_factor)
    settings = Settings(
        "euler_maruyama",
        num_steps=EM_STEPS,
        t_min=T_MIN,
        t_max=T_MAX,
        eps_schedule=schedule,
        eps_scale=eps_scale,
    )
    x1, info = samplers.integrate(
        velocity, x_start, {}, settings, score=score, key=jax.random.key(5), mask=mask
    )
    return _moment_z_scores(oracle, x1)


@pytest.mark.parametrize("base", ["gaussian", "coupled"])
@pytest.mark.parametrize("eps_scale", [0.0, 0.5, 1.0, 2.0])
def test_euler_maruyama_keeps_target_moments(base, eps_scale):
    z = _em_z_scores(base, eps_scale)
    assert z.max() < 3.0, z


@pytest.mark.parametrize("base", ["gaussian", "coupled"])
@pytest.mark.parametrize("broken", ["score", "noise"])
def test_moment_check_rejects_misscaled_sde(base, broken):
    # Doubling eps while halving the score doubles the noise variance only.
    if broken == "score":
        z = _em_z_scores(base, 1.0, score_factor=2.0)
    else:
        z = _em_z_scores(base, 2.0, score_factor=0.5)
    assert z.max() > 3.0, z


# ------------------------------------------------------------ model calls


def _toy_velocity(t, x, xi):
    return jnp.sin(x) + t


def _toy_score(t, x, xi):
    return -x


@pytest.mark.parametrize("num_steps", [1, 3, 8])
@pytest.mark.parametrize("method", ["euler", "heun", "euler_maruyama"])
def test_fixed_step_calls_counted_exactly(method, num_steps):
    settings = Settings(method, num_steps=num_steps, eps_schedule="bump")
    x0 = jnp.ones((3, 2))

    def run(log):
        velocity = _counting(_toy_velocity, log)
        score = fields.score_from_velocity(
            velocity, interpolants.linear(), jnp.zeros_like(x0), 1.0
        )
        return samplers.make_sampler(velocity, settings, score=score)(
            x0, {}, key=jax.random.key(0)
        )

    (_, info), log = _run_counted(run)
    expected = {"euler": num_steps, "heun": 2 * num_steps - 1}
    assert int(info.nfe) == len(log) == expected.get(method, 2 * num_steps)
    assert int(info.nfe_score) == (num_steps if method == "euler_maruyama" else 0)
    assert int(info.accepted_steps) == num_steps and int(info.rejected_steps) == 0
    # The grid t_i = t_min + i (t_max - t_min) / N; t_max is never evaluated.
    t_min, t_max = settings.t_min, settings.t_max
    grid = t_min + np.arange(num_steps) * (t_max - t_min) / num_steps
    np.testing.assert_allclose(sorted(set(np.float32(log))), grid, rtol=0, atol=1e-6)
    assert float(info.t_final) == np.float32(settings.t_max)


def test_euler_grid_by_hand():
    settings = Settings("euler", num_steps=4, t_min=0.1, t_max=0.9)
    (_, info), log = _run_counted(
        lambda log: samplers.make_sampler(_counting(_toy_velocity, log), settings)(
            jnp.ones((2, 3)), {}
        )
    )
    np.testing.assert_allclose(log, [0.1, 0.3, 0.5, 0.7], rtol=0, atol=1e-7)
    assert float(info.t_final) == np.float32(0.9)


def test_euler_maruyama_counts_velocity_and_score_separately():
    settings = Settings("euler_maruyama", num_steps=5, eps_scale=0.3)
    velocity_log, score_log = [], []
    velocity = _counting(_toy_velocity, velocity_log)
    score = _counting(_toy_score, score_log)
    _, info = samplers.make_sampler(velocity, settings, score=score)(
        jnp.ones((2, 3)), {}, key=jax.random.key(1)
    )
    jax.block_until_ready(info)
    jax.effects_barrier()
    assert len(velocity_log) == 5 and len(score_log) == int(info.nfe_score) == 5
    assert int(info.nfe) == 10
    assert max(score_log) < settings.t_max  # never the score at t_max


def test_euler_maruyama_with_zero_eps_is_euler_and_needs_no_score():
    x0 = jax.random.normal(jax.random.key(2), (4, 3))
    em = Settings("euler_maruyama", num_steps=7, eps_scale=0.0)
    x_em, info = samplers.integrate(_toy_velocity, x0, {}, em)
    x_euler, _ = samplers.integrate(
        _toy_velocity, x0, {}, Settings("euler", num_steps=7)
    )
    np.testing.assert_array_equal(x_em, x_euler)
    assert int(info.nfe) == 7 and int(info.nfe_score) == 0


@pytest.mark.parametrize(
    "overrides", [{}, {"rtol": 1e-3, "atol": 1e-6}, {"first_step": 0.05}]
)
def test_dopri5_calls_counted_exactly(overrides):
    settings = Settings(**overrides)

    def run(log):
        velocity = _counting(lambda t, x, xi: -3.0 * x * jnp.cos(4.0 * t), log)
        return samplers.make_sampler(velocity, settings)(jnp.ones((2, 2)), {})

    (x1, info), log = _run_counted(run)
    attempts = int(info.accepted_steps + info.rejected_steps)
    start = 1 if "first_step" in overrides else 2
    assert int(info.nfe) == len(log) == start + 6 * attempts
    assert min(log) == np.float32(settings.t_min)
    assert max(log) == np.float32(settings.t_max) == float(info.t_final)
    assert bool(info.success)
    # dx/dt = -3 cos(4t) x has the closed form x = exp(-3/4 (sin 4t - sin 4t0)).
    exact = np.exp(-0.75 * (np.sin(4 * settings.t_max) - np.sin(4 * settings.t_min)))
    # A local-error controller does not bound the global error by rtol; with
    # four or so steps on this problem it stays within a few tens of rtol.
    np.testing.assert_allclose(x1, exact, rtol=50 * settings.rtol)


@pytest.mark.parametrize("t_min, t_max", [(0.1, 0.7), (0.3, 0.45), (0.0, 0.9)])
def test_dopri5_never_evaluates_past_t_max(t_min, t_max):
    # The probe at t_min + h0 with h0 = t_max - t_min (a near-constant
    # field) rounded one float32 ulp past t_max in the first two cases.
    settings = Settings(t_min=t_min, t_max=t_max)

    def run(log):
        velocity = _counting(lambda t, x, xi: 1e-7 * x, log)
        return samplers.integrate(velocity, jnp.ones((1, 2)), {}, settings)

    (_, info), log = _run_counted(run)
    assert bool(info.success) and float(info.t_final) == np.float32(t_max)
    assert min(log) == np.float32(t_min) and max(log) == np.float32(t_max)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dopri5_keeps_a_narrow_state_in_float32_under_x64(dtype):
    with jax.enable_x64(True):
        x0 = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3).astype(dtype)
        settings = Settings(rtol=1e-6, atol=1e-6, t_min=0.1, t_max=0.9)
        x1, info = samplers.integrate(lambda t, x, xi: -x, x0, {}, settings)
        assert x1.dtype == dtype and info.t_final.dtype == jnp.float32
        assert bool(info.success)
        exact = np.asarray(x0, np.float64) * np.exp(-0.8)
        # Within a few tens of the tolerance (a local-error controller), or
        # the rounding of the state's dtype.
        tolerance = max(20 * settings.rtol, 2 * float(jnp.finfo(dtype).eps))
        np.testing.assert_allclose(
            np.asarray(x1, np.float64), exact, rtol=0, atol=tolerance
        )


def test_dopri5_rejects_steps_and_reports_running_out():
    stiff = lambda t, x, xi: -50.0 * (x - jnp.sin(10.0 * t))  # noqa: E731
    settings = Settings(rtol=1e-6, atol=1e-6, first_step=0.5)
    _, info = samplers.integrate(stiff, jnp.zeros((1, 1)), {}, settings)
    assert int(info.rejected_steps) > 0 and bool(info.success)
    samplers.check_info(info)

    short = Settings(rtol=1e-6, atol=1e-6, max_steps=5)
    _, info = samplers.integrate(stiff, jnp.zeros((1, 1)), {}, short)
    assert not bool(info.success)
    assert int(info.accepted_steps + info.rejected_steps) == 5
    assert float(info.t_final) < short.t_max
    assert int(info.nfe) == 2 + 6 * 5
    with pytest.raises(RuntimeError, match="max_steps"):
        samplers.check_info(info)


@pytest.mark.parametrize("first_step", [0.5, 0.998])
def test_dopri5_recovers_from_a_non_finite_stage(first_step):
    # dx/dt = -10 x from x = 1; the field is NaN wherever |x| > 1.5, which the
    # exact solution (at most 1) never reaches but the stage points of a step
    # of 0.5 or more do. The NaN error must reject and shrink the step, and
    # the NaN stages left from the rejected attempt must not reach the next.
    def blows_up(t, x, xi):
        return jnp.where(jnp.abs(x) > 1.5, jnp.nan, -10.0 * x)

    settings = Settings(rtol=1e-6, atol=1e-6, first_step=first_step)
    x1, info = samplers.integrate(blows_up, jnp.ones((1, 1)), {}, settings)
    assert int(info.rejected_steps) >= 2 and bool(info.success)
    exact = np.exp(-10.0 * (settings.t_max - settings.t_min))
    np.testing.assert_allclose(x1, exact, rtol=0, atol=settings.atol)


def test_dopri5_automatic_first_step_survives_a_non_finite_probe():
    # The first-step guess for x0 = (1, 1e-4) is about 0.5, and the probe
    # point x0 + h0 k0 has a negative second entry, where the field is NaN;
    # the exact solution stays positive. The step must start from the guess.
    def field(t, x, xi):
        return jnp.where(x < 0, jnp.nan, jnp.array([0.0, -100.0]) * x)

    settings = Settings()
    x1, info = samplers.integrate(field, jnp.array([[1.0, 1e-4]]), {}, settings)
    assert bool(info.success) and float(info.t_final) == np.float32(settings.t_max)
    decay = np.exp(-100.0 * (settings.t_max - settings.t_min))
    np.testing.assert_allclose(x1, [[1.0, 1e-4 * decay]], rtol=0, atol=settings.atol)


@pytest.mark.parametrize("speed", [1e15, 1e20])
def test_dopri5_automatic_first_step_with_norms_beyond_float32(speed):
    # |k| / atol overflows float32 in the first-step norms; a step of 0 would
    # never move t.
    settings = Settings()
    field = lambda t, x, xi: jnp.full_like(x, speed)  # noqa: E731
    x1, info = samplers.integrate(field, jnp.zeros((4, 4)), {}, settings)
    assert bool(info.success) and float(info.t_final) == np.float32(settings.t_max)
    expected = speed * (np.float32(settings.t_max) - np.float32(settings.t_min))
    np.testing.assert_allclose(x1, np.full((4, 4), expected), rtol=1e-5)


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "settings",
    [
        Settings("euler", num_steps=5),
        Settings("heun", num_steps=5),
        Settings(rtol=1e-4, atol=1e-4),
        Settings("euler_maruyama", num_steps=5, eps_schedule="constant"),
    ],
    ids=lambda s: s.method,
)
def test_inpainting_keeps_known_pixels_bit_identical(settings):
    from stochinterp.couplings import tile_mask

    x0 = jax.random.normal(jax.random.key(4), (2, 8, 8, 3))
    mask = tile_mask(jax.random.key(5), x0.shape, grid=4, p=0.5)
    xi = {"cond": mask, "mask": mask, "labels": None}
    x1, _ = samplers.integrate(
        _toy_velocity,
        x0,
        xi,
        settings,
        score=_toy_score,
        key=jax.random.key(6),
        mask=mask,
    )
    known = jnp.broadcast_to(mask, x0.shape) == 1.0
    assert 0 < int(known.sum()) < known.size
    np.testing.assert_array_equal(x1[known], x0[known])
    assert bool(jnp.all(x1[~known] != x0[~known]))


@pytest.mark.parametrize("method", ["euler", "heun", "dopri5", "euler_maruyama"])
def test_known_pixels_keep_their_bits_negative_zero_included(method):
    # x + 0 is +0.0 for x = -0.0: the known pixels are x0's own values.
    x0 = jnp.array([[-0.0, 0.5, -0.0, -1.5]])
    mask = jnp.array([[1.0, 0.0, 1.0, 1.0]])
    steps = None if method == "dopri5" else 4
    settings = Settings(method=method, num_steps=steps)
    x1, _ = samplers.integrate(
        lambda t, x, xi: x + 1.0,
        x0,
        {},
        settings,
        score=lambda t, x, xi: -x,
        key=jax.random.key(0),
        mask=mask,
    )
    bits = lambda a: np.asarray(a).view(np.uint32)  # noqa: E731
    np.testing.assert_array_equal(bits(x1)[:, [0, 2, 3]], bits(x0)[:, [0, 2, 3]])
    assert float(x1[0, 1]) != 0.5


# ------------------------------------------------------------- sharding


@pytest.mark.parametrize(
    "settings",
    [
        Settings("heun", num_steps=6),
        Settings(rtol=1e-5, atol=1e-5),
        Settings("euler_maruyama", num_steps=6),
    ],
    ids=lambda s: s.method,
)
def test_sharded_sampling_equals_single_device(settings):
    assert jax.device_count() == 2
    mesh = sharding.make_mesh()
    x0 = jax.random.normal(jax.random.key(7), (8, 4, 4, 2))
    mask = (jnp.arange(8)[:, None, None, None] % 2) * jnp.ones((8, 4, 4, 1))
    cond = jnp.cos(x0)
    xi = {"cond": cond, "mask": mask, "labels": None}

    def velocity(t, x, xi):
        return jnp.tanh(x * xi["cond"]) - t * x

    key = jax.random.key(8)
    args = dict(score=_toy_score)
    single = samplers.make_sampler(velocity, settings, **args)
    sharded = samplers.make_sampler(velocity, settings, mesh=mesh, **args)
    x_single, info_single = single(x0, xi, key=key, mask=mask)
    x_sharded, info_sharded = sharded(x0, xi, key=key, mask=mask)
    assert x_sharded.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 4)
    assert len(x_sharded.addressable_shards) == 2
    np.testing.assert_allclose(x_sharded, x_single, rtol=1e-5, atol=1e-6)
    assert int(info_sharded.nfe) == int(info_single.nfe)


# ------------------------------------------------------------- guidance


def test_guided_field_samples_closed_form_and_counts_one_call_per_step():
    # Per-class velocity means[label] - x; the null class has mean zero, so the
    # guided field is scale * means[label] - x, solved in closed form.
    num_classes, scale = 3, 2.5
    means = jnp.concatenate([jnp.eye(num_classes), jnp.zeros((1, num_classes))])
    shapes = []

    def network(t, x, xi):
        jax.debug.callback(lambda n: shapes.append(int(n)), x.shape[0])
        assert jnp.shape(xi["gain"]) == ()  # a leaf without a batch axis
        return xi["gain"] * means[xi["labels"]] - x

    velocity = fields.guided(network, scale, null_label=num_classes)
    settings = Settings(rtol=1e-6, atol=1e-6)
    labels = jnp.array([0, 2, 1, 1])
    x0 = jax.random.normal(jax.random.key(9), (4, num_classes))
    xi = {"cond": None, "mask": None, "labels": labels, "gain": jnp.float32(1.0)}
    x1, info = samplers.make_sampler(velocity, settings)(x0, xi)
    jax.block_until_ready(x1)
    jax.effects_barrier()

    target = scale * means[labels]
    decay = np.exp(-(settings.t_max - settings.t_min))
    np.testing.assert_allclose(x1, target + (x0 - target) * decay, atol=2e-5)
    assert len(shapes) == int(info.nfe) and set(shapes) == {2 * x0.shape[0]}


# ------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "rk4", "num_steps": 4}, "rk4"),
        ({"method": "euler", "t_min": 0.5, "t_max": 0.5, "num_steps": 4}, "0.5"),
        ({"method": "euler", "t_min": 0.0, "t_max": 1.5, "num_steps": 4}, "1.5"),
        ({"method": "euler", "num_steps": 0}, "num_steps"),
        ({"method": "heun"}, "None"),
        ({"method": "heun", "num_steps": 2.5}, "2.5"),
        ({"method": "dopri5", "num_steps": 10}, "num_steps=10"),
        ({"rtol": -1e-5}, "rtol=-1e-05"),
        ({"rtol": 1e-5, "atol": 0.0}, "atol=0.0"),
        ({"max_steps": 0}, "max_steps"),
        ({"first_step": 2.0}, "first_step"),
        ({"min_factor": 2.0}, "min_factor"),
        ({"method": "euler_maruyama", "num_steps": 4, "eps_scale": -1.0}, "-1.0"),
        ({"method": "euler_maruyama", "num_steps": 4, "eps_schedule": "x"}, "'x'"),
        ({"rtol": float("nan")}, "rtol=nan"),
        ({"atol": float("inf")}, "atol=inf"),
        ({"max_steps": 2.5}, "max_steps.*2.5"),
        ({"max_factor": float("inf")}, "max_factor=inf"),
        ({"safety": float("nan")}, "safety"),
        ({"method": "euler", "num_steps": 10**12}, "1000000000000"),
        ({"method": "euler_maruyama", "num_steps": 4, "eps_scale": np.inf}, "inf"),
    ],
)
def test_contradictory_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Settings(**kwargs)


def test_missing_inputs_raise_before_work():
    em = Settings("euler_maruyama", num_steps=4)
    x0 = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="score"):
        samplers.integrate(_toy_velocity, x0, {}, em, key=jax.random.key(0))
    with pytest.raises(ValueError, match="score"):
        samplers.make_sampler(_toy_velocity, em)
    with pytest.raises(ValueError, match="PRNG key"):
        samplers.integrate(_toy_velocity, x0, {}, em, score=_toy_score)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        samplers.integrate(_toy_velocity, x0, {}, Settings(), mask=jnp.ones(4))


KEY = jax.random.key(0)


@pytest.mark.parametrize("method", ["euler", "heun", "dopri5", "euler_maruyama"])
def test_field_of_the_wrong_shape_raises_while_tracing(method):
    steps = None if method == "dopri5" else 3
    settings = Settings(method=method, num_steps=steps)
    x0 = jnp.ones((4, 3))
    one_channel = lambda t, x, xi: jnp.ones((4, 1))  # noqa: E731
    with pytest.raises(ValueError, match=r"velocity field returned shape \(4, 1\)"):
        samplers.integrate(one_channel, x0, {}, settings, score=_toy_score, key=KEY)
    if method == "euler_maruyama":
        with pytest.raises(ValueError, match=r"score field returned shape \(3,\)"):
            samplers.integrate(
                _toy_velocity, x0, {}, settings, score=lambda t, x, xi: x[0], key=KEY
            )


@pytest.mark.parametrize(
    "returned, name",
    [(lambda x: (x,), "tuple"), (lambda x: None, "NoneType"), (lambda x: 1.0, "float")],
)
def test_field_returning_no_array_is_named(returned, name):
    x0 = jnp.ones((4, 3))
    message = f"velocity field returned a {name}; it must return an array"
    for settings in (Settings(), Settings("euler", num_steps=2)):
        with pytest.raises(ValueError, match=message):
            samplers.integrate(lambda t, x, xi: returned(x), x0, {}, settings)


@pytest.mark.parametrize("method", ["euler", "dopri5"])
def test_nested_lists_give_the_result_of_arrays(method):
    """x0 and mask as Python lists, as NumPy would take them."""
    settings = Settings(method, num_steps=None if method == "dopri5" else 4)
    x0 = [[[0.5], [-1.0]], [[0.25], [2.0]]]
    mask = [[[1.0], [0.0]]]
    got, _ = samplers.integrate(_toy_velocity, x0, {}, settings, mask=mask)
    want, _ = samplers.integrate(
        _toy_velocity, jnp.asarray(x0), {}, settings, mask=jnp.asarray(mask)
    )
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[:, 0], jnp.asarray(x0)[:, 0])
    sharded = samplers.make_sampler(_toy_velocity, settings, mesh=sharding.make_mesh())
    got, _ = sharded(x0, {}, mask=mask)
    np.testing.assert_array_equal(got, want)


def test_settings_must_be_sampler_settings():
    for call in (
        lambda s: samplers.integrate(_toy_velocity, jnp.ones((2, 1)), {}, s),
        lambda s: samplers.make_sampler(_toy_velocity, s),
    ):
        with pytest.raises(ValueError, match="must be a SamplerSettings, got dict"):
            call({"method": "euler", "num_steps": 2})


@pytest.mark.parametrize(
    "x0, message",
    [
        (jnp.ones((2, 3), jnp.int32), "floating-point.*int32"),
        (jnp.ones((0, 3)), r"\(0, 3\) is empty"),
    ],
)
def test_bad_base_sample_raises(x0, message):
    for settings in (Settings(), Settings("euler", num_steps=2)):
        with pytest.raises(ValueError, match=message):
            samplers.integrate(_toy_velocity, x0, {}, settings)


@pytest.mark.parametrize(
    "key, got",
    [
        (0, "int of dtype None and shape ()"),
        (1.5, "float of dtype None and shape ()"),
        (jnp.zeros(3, jnp.uint32), "dtype uint32 and shape (3,)"),
        (jax.random.split(jax.random.key(0), 2), "dtype key<fry> and shape (2,)"),
    ],
)
def test_a_bad_key_raises_before_sampling(key, got):
    settings = Settings("euler_maruyama", num_steps=2)
    message = re.escape("key must be one PRNG key (jax.random.key(seed)), got ")
    with pytest.raises(ValueError, match=message + ".*" + re.escape(got)):
        samplers.integrate(
            _toy_velocity, jnp.ones((2, 3)), {}, settings, score=_toy_score, key=key
        )
    # Both kinds of one key are taken.
    for good in (jax.random.key(0), jax.random.PRNGKey(0)):
        samplers.integrate(
            _toy_velocity, jnp.ones((2, 3)), {}, settings, score=_toy_score, key=good
        )


@pytest.mark.parametrize(
    "field, value",
    [
        ("rtol", None),
        ("atol", "1e-5"),
        ("eps_scale", 1j),
        ("eps_scale", True),
        ("t_min", np.array(0.1)),
        ("first_step", "0.1"),
    ],
)
def test_a_setting_that_is_not_a_real_number_is_refused(field, value):
    message = f"{field} must be a real number, got {value!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings(**{field: value})


def test_mask_must_be_binary():
    x0 = jnp.ones((2, 3))
    for value in (0.5, 2.0, -1.0, np.nan):
        mask = jnp.zeros((2, 3)).at[0, 0].set(value)
        with pytest.raises(ValueError, match="only 0 .* and 1"):
            samplers.integrate(_toy_velocity, x0, {}, Settings(), mask=mask)
        sample = samplers.make_sampler(_toy_velocity, Settings("euler", num_steps=2))
        with pytest.raises(ValueError, match="only 0 .* and 1"):
            sample(x0, {}, mask=mask)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("method", ["euler", "heun", "dopri5", "euler_maruyama"])
def test_low_precision_state_is_integrated_in_float32(method, dtype):
    """b = -x from t=0 to 1: the float32 run, rounded once to x0's dtype."""
    steps = None if method == "dopri5" else 8
    settings = Settings(method=method, num_steps=steps, t_min=0.0, t_max=1.0)
    x0 = jax.random.normal(KEY, (4, 3)).astype(dtype)
    decay = lambda t, x, xi: -x  # noqa: E731
    run = lambda x: samplers.integrate(  # noqa: E731
        decay, x, {}, settings, score=_toy_score, key=KEY
    )[0]
    x1 = run(x0)
    assert x1.dtype == dtype
    np.testing.assert_array_equal(x1, run(x0.astype(jnp.float32)).astype(dtype))


def test_float64_state_integrates_in_float64():
    """Dopri5 at rtol = atol = 1e-12 on b = -x meets its tolerance in float64."""
    with jax.enable_x64(True):
        settings = Settings(rtol=1e-12, atol=1e-12, t_min=0.1, t_max=0.9)
        x0 = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float64).reshape(2, 3)
        x1, info = samplers.integrate(lambda t, x, xi: -x, x0, {}, settings)
        assert x1.dtype == jnp.float64 and info.t_final.dtype == jnp.float64
        assert float(info.t_final) == 0.9 and bool(info.success)
        np.testing.assert_allclose(x1, x0 * np.exp(-0.8), rtol=0, atol=1e-10)


def test_settings_from_config_and_static_jit():
    from ml_collections import config_dict

    config = config_dict.ConfigDict(
        {
            "method": "heun",
            "num_steps": config_dict.placeholder(int),
            "t_min": 0.0,
            "t_max": 1.0,
            "guidance_scale": 1.0,  # read elsewhere; ignored here
        }
    )
    config.num_steps = 4
    settings = Settings.from_config(config)
    assert settings == Settings("heun", num_steps=4, t_min=0.0, t_max=1.0)
    assert hash(settings) == hash(Settings("heun", num_steps=4, t_min=0.0, t_max=1.0))

    jitted = jax.jit(samplers.integrate, static_argnums=(0, 3))
    x0 = jnp.zeros((2, 2))
    x1, info = jitted(lambda t, x, xi: jnp.ones_like(x), x0, {}, settings)
    np.testing.assert_allclose(x1, 1.0, rtol=1e-6)
    assert int(info.nfe) == 7


@pytest.mark.parametrize("method", ["euler", "heun", "dopri5", "euler_maruyama"])
def test_known_pixels_survive_a_non_finite_field(method):
    """A NaN update (e.g. a score divided by gamma = 0) never reaches known pixels."""
    x0 = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    mask = jnp.zeros((2, 4, 4, 1)).at[:, :2].set(1.0)
    nan_field = lambda t, x, xi: jnp.full_like(x, jnp.nan)  # noqa: E731
    steps = None if method == "dopri5" else 3
    settings = Settings(
        method=method, num_steps=steps, t_min=0.1, t_max=0.9, max_steps=4
    )
    x1, info = samplers.integrate(
        nan_field, x0, {}, settings, score=nan_field, key=jax.random.key(1), mask=mask
    )
    np.testing.assert_array_equal(x1[:, :2], x0[:, :2])
    if method == "dopri5":  # every step is rejected, and said so
        assert not bool(info.success) and int(info.accepted_steps) == 0
    else:
        assert np.isnan(np.asarray(x1[:, 2:])).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_x0_is_refused_before_any_call(bad):
    calls = []

    def field(t, x, xi):
        calls.append(1)
        return -x

    x0 = np.zeros((2, 3, 3, 1), np.float32)
    x0[1, 2, 0, 0] = bad
    settings = Settings(method="heun", num_steps=2)
    with pytest.raises(ValueError, match=r"1 NaN or infinite values .*\(1, 2, 0, 0\)"):
        samplers.integrate(field, jnp.asarray(x0), {}, settings)
    with pytest.raises(ValueError, match=r"x0 must be finite"):
        samplers.make_sampler(field, settings)(jnp.asarray(x0), {})
    # A scalar is named for its shape first, NaN or not.
    with pytest.raises(ValueError, match=r"x0 must be \[batch, \.\.\.\]"):
        samplers.make_sampler(field, settings)(jnp.asarray(bad), {})
    assert calls == []


def test_dopri5_ignores_a_nan_known_pixel_inside_jit():
    """Inside jit x0 cannot be checked: a NaN known entry stays as it is, and
    the step-size control, which skips known entries, still reaches t_max
    with the same steps as a finite value there."""
    x0 = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    mask = jnp.zeros_like(x0).at[:, 0, 0].set(1.0)
    settings = Settings(method="dopri5", t_min=0.0, t_max=1.0)
    field = lambda t, x, xi: -x * (1.0 + t)  # noqa: E731  entrywise
    run = jax.jit(lambda x: samplers.integrate(field, x, {}, settings, mask=mask))
    x1, info = run(x0.at[1, 0, 0, 0].set(jnp.nan))
    ref, ref_info = run(x0)
    assert bool(info.success) and float(info.t_final) == 1.0
    assert int(info.accepted_steps) == int(ref_info.accepted_steps) > 0
    assert int(info.rejected_steps) == int(ref_info.rejected_steps)
    assert np.isnan(float(x1[1, 0, 0, 0]))
    unknown = np.asarray(mask) == 0
    np.testing.assert_array_equal(np.asarray(x1)[unknown], np.asarray(ref)[unknown])
    np.testing.assert_allclose(
        np.asarray(ref)[unknown], (np.asarray(x0) * np.exp(-1.5))[unknown], atol=1e-4
    )


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_non_finite_after_the_cast_to_float32_is_refused():
    x0 = np.zeros((2, 3), np.float64)
    x0[0, 1] = 1e39  # finite in float64, inf as float32 (x64 off)
    settings = Settings(method="euler", num_steps=2)
    with pytest.raises(ValueError, match=r"1 NaN or infinite values as float32"):
        samplers.integrate(lambda t, x, xi: -x, x0, {}, settings)


def test_dopri5_tolerance_does_not_loosen_with_known_entries():
    """The norms average over the entries that move: one moving entry among
    9,999 known ones takes the same steps to the same value as alone."""
    field = lambda t, x, xi: 5.0 * jnp.cos(10.0 * t) * x  # noqa: E731
    settings = Settings(method="dopri5", t_min=0.0, t_max=1.0, rtol=1e-6, atol=1e-6)
    alone, alone_info = samplers.integrate(field, jnp.ones((1, 1)), {}, settings)
    x0 = jnp.full((1, 10_000), 3.0).at[0, 0].set(1.0)
    mask = jnp.ones_like(x0).at[0, 0].set(0.0)
    x1, info = samplers.integrate(field, x0, {}, settings, mask=mask)
    assert int(info.accepted_steps) == int(alone_info.accepted_steps) > 5
    assert int(info.rejected_steps) == int(alone_info.rejected_steps)
    np.testing.assert_allclose(float(x1[0, 0]), float(alone[0, 0]), rtol=1e-6)
    exact = np.exp(0.5 * np.sin(10.0))
    assert abs(float(x1[0, 0]) - exact) < 1e-5
    np.testing.assert_array_equal(x1[0, 1:], x0[0, 1:])


@pytest.mark.parametrize("method", ["euler", "heun", "dopri5", "euler_maruyama"])
def test_image_state_gives_the_bits_of_the_same_state_flat(method):
    """The integrators see [batch, features]: an image state, its [batch, 1]
    broadcast mask and the field's image-shaped call give exactly the result of
    the same problem posed flat."""
    from stochinterp.couplings import tile_mask

    if method == "dopri5":
        settings = Settings(method, rtol=1e-4, atol=1e-4)
    else:
        settings = Settings(method, num_steps=6, eps_schedule="constant")
    x0 = jax.random.normal(jax.random.key(7), (3, 4, 4, 3))
    mask = tile_mask(jax.random.key(8), x0.shape, grid=2, p=0.5)
    seen = []

    def image_field(t, x, xi):
        seen.append(x.shape)
        return jnp.sin(3.0 * t) * x - 0.5 * jnp.roll(x, 1, axis=-1)

    def flat_field(t, x, xi):
        return image_field(t, x.reshape(x0.shape), xi).reshape(x.shape)

    kw = dict(key=jax.random.key(9))
    score = lambda t, x, xi: -x  # noqa: E731
    image, image_info = samplers.integrate(
        image_field, x0, {}, settings, score=score, mask=mask, **kw
    )
    flat_mask = jnp.broadcast_to(mask, x0.shape).reshape(3, -1)
    flat, flat_info = samplers.integrate(
        flat_field, x0.reshape(3, -1), {}, settings, score=score, mask=flat_mask, **kw
    )
    assert image.shape == x0.shape and set(seen) == {x0.shape}
    np.testing.assert_array_equal(image.reshape(3, -1), flat)
    assert int(image_info.nfe) == int(flat_info.nfe) > 5


@pytest.mark.parametrize("mask", [False, 0, np.float32(0.0)])
def test_dopri5_scalar_mask_equals_the_same_mask_in_full(mask):
    """A scalar mask broadcasts like any other: the steps and the result are
    those of the full array of the same value (Python's ~False is -1, which
    once made the error norm count one entry instead of twelve)."""
    field = lambda t, x, xi: 5.0 * jnp.cos(10.0 * t) * x  # noqa: E731
    settings = Settings(method="dopri5", t_min=0.0, t_max=1.0, rtol=1e-6, atol=1e-6)
    x0 = jnp.linspace(0.5, 2.0, 12).reshape(2, 6)
    full = jnp.zeros_like(x0)
    expected, expected_info = samplers.integrate(field, x0, {}, settings, mask=full)
    got, got_info = samplers.integrate(field, x0, {}, settings, mask=mask)
    assert int(got_info.nfe) == int(expected_info.nfe) > 20
    np.testing.assert_array_equal(got, expected)
