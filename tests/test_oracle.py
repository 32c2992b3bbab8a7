"""The Gaussian oracle against Monte Carlo, transport identities and training.

Each coupling runs through the library's own code (coupling, then
``losses.interpolate``) on Gaussian data shaped as 2 x 2 images, and a least
squares fit of dx_t on [x_t, 1] is compared with the oracle's exact velocity.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _gaussian import draw_images, fit_affine, gaussian, path_samples, relative_error

from stochinterp import couplings, fields, interpolants, losses
from stochinterp.oracle import (
    GaussianOracle,
    downsample_matrix,
    flat_mask,
    superres_matrix,
)

SHAPE = (2, 2, 1)  # images of d = 4 pixels
D = 4
TIMES = (0.2, 0.5, 0.8)
PATTERN = np.array([1.0, 0.0, 0.0, 1.0])  # the in-painting mask studied


def _mc_velocity_error(coupling, oracle, path, n, t, seed, wrong_target=False):
    """Relative error of a Monte Carlo affine fit of dx_t against oracle b."""
    key_data, key_path = jax.random.split(jax.random.key(seed))
    x1 = draw_images(key_data, oracle.mu1, oracle.S1, n, SHAPE)
    x_t, dx_t, _, sample = path_samples(key_path, coupling, path, x1, t)
    if wrong_target:  # the x0 term dropped: dx_t = beta' x1
        dx_t = np.asarray(path.beta_dot(jnp.float32(t)) * x1).reshape(n, -1)
    if sample.mask is not None:
        rows = np.all(np.asarray(sample.mask).reshape(n, -1) == PATTERN, axis=1)
        x_t, dx_t = x_t[rows], dx_t[rows]
    half = x_t.shape[0] // 2
    fitted = fit_affine(x_t[:half], dx_t[:half])
    test = x_t[half:]
    return relative_error(fitted(test), oracle.velocity(t, jnp.asarray(test)))


def _cases():
    """name -> (coupling, oracle, draws, times)."""
    mu1, S1 = gaussian(0, D)
    linear, trig = interpolants.linear(), interpolants.trigonometric()
    noisy = interpolants.trigonometric(gamma="sqrt", gamma_scale=2.0)
    inpainting = couplings.InpaintingCoupling(grid=2, p=0.5)
    # About 1/16 of the in-painting draws have the studied mask: 2**22 draws
    # leave 2**18 for the fit, so those cases are checked at one time each.
    return {
        "independent": (
            couplings.IndependentCoupling(),
            GaussianOracle.independent(mu1, S1, linear),
            2**19,
            TIMES,
        ),
        "independent_gamma": (
            couplings.IndependentCoupling(),
            GaussianOracle.independent(mu1, S1, noisy),
            2**19,
            TIMES,
        ),
        "inpainting": (
            inpainting,
            GaussianOracle.inpainting(mu1, S1, PATTERN, linear),
            2**22,
            (0.5,),
        ),
        "inpainting_trig": (
            inpainting,
            GaussianOracle.inpainting(mu1, S1, PATTERN, trig),
            2**22,
            (0.35,),
        ),
        "superres": (
            couplings.SuperResolutionCoupling(factor=2, sigma=1.0),
            GaussianOracle.superres(mu1, S1, SHAPE, 2, 1.0, linear),
            2**19,
            TIMES,
        ),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_velocity_matches_monte_carlo_regression(name):
    coupling, oracle, n, times = CASES[name]
    for i, t in enumerate(times):
        error = _mc_velocity_error(coupling, oracle, oracle.interpolant, n, t, i)
        assert error < 0.02, (name, t, error)


@pytest.mark.parametrize("name", ["independent", "superres", "inpainting"])
def test_wrong_target_is_caught(name):
    """Dropping the x0 term from dx_t (dx_t = beta' x1) fails the comparison."""
    coupling, oracle, _, _ = CASES[name]
    error = _mc_velocity_error(
        coupling, oracle, oracle.interpolant, 2**18, 0.5, 0, True
    )
    assert error > 0.2, error


def test_denoiser_and_score_match_monte_carlo_regression():
    coupling, oracle, n, _ = CASES["independent_gamma"]
    path = oracle.interpolant
    for i, t in enumerate(TIMES):
        key_data, key_path = jax.random.split(jax.random.key(10 + i))
        x1 = draw_images(key_data, oracle.mu1, oracle.S1, n, SHAPE)
        x_t, _, z, _ = path_samples(key_path, coupling, path, x1, t)
        half = n // 2
        fitted = fit_affine(x_t[:half], z[:half])
        test = jnp.asarray(x_t[half:])
        g = oracle.denoiser(t, test)
        assert relative_error(fitted(test), g) < 0.02, t
        # score = -g / gamma, also through fields.score_from_denoiser.
        score = fields.score_from_denoiser(
            lambda s, x, xi: oracle.denoiser(s, x), path
        )(t, test, {})
        np.testing.assert_allclose(score, oracle.score(t, test), rtol=1e-4, atol=1e-4)
        fitted_score = -fitted(test) / float(path.gamma(jnp.float32(t)))
        assert relative_error(fitted_score, oracle.score(t, test)) < 0.02, t


@pytest.mark.parametrize(
    "path",
    [
        interpolants.linear(),
        interpolants.trigonometric(),
        interpolants.linear(gamma="sqrt"),
    ],
    ids=["linear", "trigonometric", "linear_sqrt"],
)
def test_oracle_velocity_is_exactly_zero_on_known_pixels(path):
    mu1, S1 = gaussian(1, 8)
    mask = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float32)
    oracle = GaussianOracle.inpainting(mu1, S1, mask, path)
    x = 3.0 * jax.random.normal(jax.random.key(0), (16, 8))
    for t in (0.1, 0.5, 0.9):
        b = np.asarray(oracle.velocity(t, x))
        assert np.all(b[:, mask == 1] == 0.0)
        assert np.all(b[:, mask == 0] != 0.0)
        if path.has_noise:
            assert np.all(np.asarray(oracle.denoiser(t, x))[:, mask == 1] == 0.0)


def test_moments_at_the_ends_and_matrices():
    mu1, S1 = gaussian(2, 8)
    path = interpolants.trigonometric()
    oracle = GaussianOracle.superres(mu1, S1, (2, 2, 2), 2, 0.5, path)
    np.testing.assert_allclose(oracle.mean(1.0), mu1, atol=1e-6)
    np.testing.assert_allclose(oracle.cov(1.0), S1, atol=1e-6)
    x0, _ = oracle.sample_pairs(jax.random.key(0), 200_000)
    mean0, cov0 = oracle.base_moments()
    np.testing.assert_allclose(x0.mean(0), mean0, atol=0.01)
    np.testing.assert_allclose(np.cov(np.asarray(x0).T), cov0, atol=0.01)

    # The matrices act as the image operators on flat HWC vectors.
    image = jax.random.normal(jax.random.key(1), (1, 4, 4, 3))
    flat = image.reshape(-1)
    down = couplings.box_downsample(image, 2)
    np.testing.assert_allclose(
        downsample_matrix((4, 4, 3), 2) @ flat, down.reshape(-1), rtol=1e-5
    )
    up = couplings.nearest_upsample(down, 2).reshape(-1)
    P = superres_matrix((4, 4, 3), 2)
    np.testing.assert_allclose(P @ flat, up, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(P @ P, P, atol=1e-6)
    np.testing.assert_array_equal(P, P.T)
    mask = couplings.tile_mask(jax.random.key(2), (1, 4, 4, 3), 2)[0]
    np.testing.assert_array_equal(
        flat_mask(mask, 3), jnp.broadcast_to(mask, (4, 4, 3)).reshape(-1)
    )
    with pytest.raises(ValueError, match="6x6.*factor 4"):
        superres_matrix((6, 6, 1), 4)
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        GaussianOracle(mu1, jnp.eye(3), S1, mu1, S1, path)


def test_score_from_velocity_agrees_with_the_oracle():
    """fields.score_from_velocity on the exact velocity gives the exact score."""
    mu1, S1 = gaussian(3, D)
    path = interpolants.linear()
    x = 2.0 * jax.random.normal(jax.random.key(3), (32, D))
    independent = GaussianOracle.independent(mu1, S1, path)
    velocity = lambda t, x, xi: independent.velocity(t, x)  # noqa: E731
    score = fields.score_from_velocity(velocity, path, jnp.zeros_like(x), 1.0)
    for t in (0.2, 0.6):
        np.testing.assert_allclose(
            score(t, x, {}), independent.score(t, x), rtol=1e-3, atol=1e-3
        )

    # In-painting: on hidden pixels (c = 0, sigma = 1) the conditional score.
    inpaint = GaussianOracle.inpainting(mu1, S1, PATTERN, path)
    velocity = lambda t, x, xi: inpaint.velocity(t, x)  # noqa: E731
    score = fields.score_from_velocity(velocity, path, x * PATTERN, 1.0 - PATTERN)
    hidden = PATTERN == 0
    for t in (0.2, 0.6):
        got = np.asarray(score(t, x, {}))
        np.testing.assert_allclose(
            got[:, hidden], inpaint.score(t, x)[:, hidden], rtol=1e-3, atol=1e-3
        )
        np.testing.assert_array_equal(got[:, ~hidden], 0.0)

    # A base x0 = c + sigma zeta with sigma = 0.5, where sigma^2 != sigma.
    c = jax.random.normal(jax.random.key(4), (D,))
    noisy = GaussianOracle(mu1, S1, jnp.zeros((D, D)), c, 0.25 * jnp.eye(D), path)
    velocity = lambda t, x, xi: noisy.velocity(t, x)  # noqa: E731
    center = jnp.broadcast_to(c, x.shape)
    score = fields.score_from_velocity(velocity, path, center, 0.5)
    for t in (0.2, 0.6):
        np.testing.assert_allclose(
            score(t, x, {}), noisy.score(t, x), rtol=1e-3, atol=1e-3
        )


def test_conditional_oracle_matches_regression_with_the_low_resolution_input():
    """A network that also sees D x1 learns the velocity of oracle.condition."""
    mu1, S1 = gaussian(4, D)
    path = interpolants.linear()
    oracle = GaussianOracle.superres(mu1, S1, SHAPE, 2, 1.0, path)
    B = downsample_matrix(SHAPE, 2)
    n, t = 2**17, 0.5
    key_data, key_path = jax.random.split(jax.random.key(5))
    x1 = draw_images(key_data, mu1, S1, n, SHAPE)
    coupling = couplings.SuperResolutionCoupling(factor=2, sigma=1.0)
    x_t, dx_t, _, _ = path_samples(key_path, coupling, path, x1, t)
    y = np.asarray(x1.reshape(n, -1) @ B.T)
    inputs = np.concatenate([x_t, y], axis=1)
    half = n // 2
    fitted = fit_affine(inputs[:half], dx_t[:half])
    exact = jax.vmap(lambda y, x: oracle.condition(B, y).velocity(t, x[None])[0])(
        jnp.asarray(y[half:]), jnp.asarray(x_t[half:])
    )
    assert relative_error(fitted(inputs[half:]), exact) < 0.02
    # Seeing D x1 changes the field: the unconditional one is a worse fit.
    assert relative_error(oracle.velocity(t, jnp.asarray(x_t[half:])), exact) > 0.1


def _transport_cost(dx_t: np.ndarray) -> tuple[float, float]:
    """Mean of |dx_t|^2 per example and its standard error."""
    cost = np.sum(np.asarray(dx_t, np.float64) ** 2, axis=1)
    return float(cost.mean()), float(cost.std() / np.sqrt(cost.size))


def test_transport_bound_of_the_coupling():
    """int_0^1 E|dx_t|^2 dt: d sigma^2 coupled, 2 E|x1|^2 + d sigma^2 shuffled.

    t ~ U(0, 1), one per example, centred data, d = 32, sigma = 0.5, n = 40000.
    Tolerance: 4 standard errors of the sample mean (about 0.1 % and 0.2 %).
    """
    shape, sigma, n = (4, 4, 2), 0.5, 40_000
    d = 32
    _, S1 = gaussian(6, d)
    path = interpolants.linear()
    coupling = couplings.SuperResolutionCoupling(factor=1, sigma=sigma)

    @jax.jit
    def draws(key):
        keys = jax.random.split(key, 4)
        x1 = draw_images(keys[0], jnp.zeros(d), S1, n, shape)
        sample = coupling(keys[1], x1)  # x0 = x1 + sigma zeta
        t = interpolants.sample_times(keys[2], n, 0.0, 1.0)
        _, dx_coupled = losses.interpolate(path, sample, x1, t)
        shuffled = x1[jax.random.permutation(keys[3], n)]
        _, dx_shuffled = losses.interpolate(path, sample, shuffled, t)
        return [a.reshape(n, -1) for a in (dx_coupled, dx_shuffled, x1)]

    dx_coupled, dx_shuffled, x1 = draws(jax.random.key(7))
    cost, se = _transport_cost(dx_coupled)
    assert abs(cost - d * sigma**2) < 4 * se

    cost_shuffled, se_shuffled = _transport_cost(dx_shuffled)
    want = 2 * float(jnp.trace(S1)) + d * sigma**2
    assert abs(cost_shuffled - want) < 4 * se_shuffled
    assert cost_shuffled > 3 * cost  # the coupling makes the transport shorter

    # The exact velocity moves less than the bound: int E|b|^2 <= d sigma^2.
    oracle = GaussianOracle.superres(jnp.zeros(d), S1, shape, 1, sigma, path)
    grid = jnp.linspace(0.0, 1.0, 101)
    kinetic = -jax.jit(jax.vmap(oracle.min_velocity_loss))(grid)
    assert float(jnp.trapezoid(kinetic, grid)) <= d * sigma**2 + 1e-4

    # The wrong target (dx_t = beta' x1) breaks the identity by far.
    wrong_cost, _ = _transport_cost(x1)
    assert abs(wrong_cost - d * sigma**2) > 100 * se


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, t, x):
        h = jnp.concatenate([t[:, None], x], axis=-1)
        for width in (64, 64):
            h = nn.silu(nn.Dense(width)(h))
        return nn.Dense(x.shape[-1])(h)


def test_small_network_reaches_the_minimum_loss():
    """An MLP trained with velocity_terms gets within 5 % of -E|b|^2."""
    mu1 = jnp.array([1.0, -0.5])
    S1 = jnp.array([[0.3, 0.1], [0.1, 0.2]])
    path = interpolants.linear()
    oracle = GaussianOracle.independent(mu1, S1, path)
    t_min, t_max = 0.0, 1.0

    def draw(key, n):
        key_t, key_pair = jax.random.split(key)
        t = interpolants.sample_times(key_t, n, t_min, t_max)
        x0, x1 = oracle.sample_pairs(key_pair, n)
        return t, path.x_t(t, x0, x1), path.dx_t(t, x0, x1)

    model = _MLP()
    params = model.init(jax.random.key(0), jnp.zeros(1), jnp.zeros((1, 2)))
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-2, 500))
    state = optimizer.init(params)

    def loss(params, batch):
        t, x_t, dx_t = batch
        return jnp.mean(losses.velocity_terms(model.apply(params, t, x_t), dx_t)[0])

    @jax.jit
    def train(params, state, key):
        def step(carry, key):
            params, state = carry
            grads = jax.grad(loss)(params, draw(key, 512))
            updates, state = optimizer.update(grads, state)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(
            step, (params, state), jax.random.split(key, 600)
        )
        return params

    params = train(params, state, jax.random.key(1))
    t, x_t, dx_t = draw(jax.random.key(2), 100_000)
    trained = float(loss(params, (t, x_t, dx_t)))
    exact_b = jax.vmap(lambda s, x: oracle.velocity(s, x[None])[0])(t, x_t)
    at_optimum = float(jnp.mean(losses.velocity_terms(exact_b, dx_t)[0]))
    minimum = float(jnp.mean(jax.vmap(oracle.min_velocity_loss)(t)))
    assert abs(at_optimum - minimum) < 0.01 * abs(minimum)
    assert minimum <= trained < minimum + 0.05 * abs(minimum), (trained, minimum)


def test_bad_oracle_inputs_raise_naming_the_value():
    d, path = 4, interpolants.linear()
    mu1, eye, zeros = jnp.zeros(d), jnp.eye(d), jnp.zeros((d, d))
    cases = [
        (lambda: GaussianOracle(mu1, eye, zeros, jnp.ones(1), eye, path), "c must"),
        (lambda: GaussianOracle(mu1[:, None], eye, zeros, mu1, eye, path), "vector"),
        (lambda: GaussianOracle.independent(mu1, -eye, path), "semi-definite.*-1"),
        (
            lambda: GaussianOracle.independent(mu1, eye.at[0, 1].set(1.0), path),
            "symmetric",
        ),
        (lambda: GaussianOracle.inpainting(mu1, eye, jnp.full(d, 0.5), path), "0.5"),
        (
            lambda: GaussianOracle(mu1, eye, zeros, mu1, eye, path, known=jnp.ones(1)),
            r"known must have shape \(4,\)",
        ),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()
    oracle = GaussianOracle.independent(mu1, eye, path)
    with pytest.raises(ValueError, match=r"\[n, d = 4\], got shape \(2, 5\)"):
        oracle.velocity(0.5, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"t must be a scalar, got shape \(2,\)"):
        oracle.score(jnp.array([0.2, 0.5]), jnp.ones((2, d)))


@pytest.mark.parametrize(
    "name, bad",
    [("S1", np.nan), ("S1", np.inf), ("mu1", np.nan), ("mu1", -np.inf)],
)
def test_non_finite_oracle_inputs_are_named(name, bad):
    inputs = {"mu1": np.zeros(D), "S1": np.eye(D)}
    inputs[name][(0,) * inputs[name].ndim] = bad
    with pytest.raises(ValueError, match=rf"{name} must be finite, got \[{bad}\]"):
        GaussianOracle.independent(inputs["mu1"], inputs["S1"], interpolants.linear())


@pytest.mark.parametrize("t", [1.5, -0.1, float("nan")])
@pytest.mark.parametrize("method", ["mean", "cov", "velocity", "min_velocity_loss"])
def test_oracle_times_must_lie_in_the_unit_interval(method, t):
    oracle = GaussianOracle.independent(jnp.zeros(D), jnp.eye(D), interpolants.linear())
    args = (jnp.ones((2, D)),) if method == "velocity" else ()
    with pytest.raises(ValueError, match=rf"0 <= t <= 1, got t = {t}"):
        getattr(oracle, method)(t, *args)


def test_oracle_checks_no_traced_time():
    oracle = GaussianOracle.independent(jnp.ones(D), jnp.eye(D), interpolants.linear())
    np.testing.assert_allclose(jax.jit(oracle.mean)(0.25), 0.25)
    np.testing.assert_allclose(jax.jit(oracle.mean)(1.0), 1.0)


def test_oracle_takes_lists():
    path = interpolants.linear()
    from_lists = GaussianOracle.independent([1.0, 2.0], [[2.0, 0.0], [0.0, 3.0]], path)
    np.testing.assert_allclose(from_lists.mean(1.0), [1.0, 2.0])
    np.testing.assert_allclose(from_lists.cov(0.5), np.diag([0.75, 1.0]))
    with pytest.raises(ValueError, match="mu1 must be an array of numbers, got None"):
        GaussianOracle.independent(None, np.eye(2), path)


def test_bad_oracle_shapes_and_counts_raise_naming_the_value():
    mu1, S1 = gaussian(0, D)
    path = interpolants.linear()
    oracle = GaussianOracle.independent(mu1, S1, path)
    cases = [
        (
            lambda: GaussianOracle.inpainting(mu1, S1, PATTERN.reshape(SHAPE), path),
            r"mask must be a flat vector \[d\].*got shape \(2, 2, 1\)",
        ),
        (
            lambda: GaussianOracle.superres(mu1, S1, (2, 2), 2, 1.0, path),
            r"image_shape must be \(H, W, C\).*got \(2, 2\)",
        ),
        (
            lambda: GaussianOracle.superres(mu1, S1, SHAPE, 2, "1", path),
            "sigma must be a real number.*got '1'",
        ),
        (
            lambda: superres_matrix(SHAPE, 0),
            "factor must be a positive integer, got 0",
        ),
        (
            lambda: oracle.condition(jnp.ones((1, 3)), jnp.ones(1)),
            r"B must have shape \[k, d = 4\], got shape \(1, 3\)",
        ),
        (
            lambda: oracle.condition(jnp.ones((1, D)), jnp.ones(2)),
            r"y must have shape \[k\] = \(1,\).*got shape \(2,\)",
        ),
        (  # a zero row: B S1 B^T is singular
            lambda: oracle.condition(jnp.eye(2, D).at[1, 1].set(0.0), jnp.ones(2)),
            r"B S1 B\^T has condition number inf for B of shape \(2, 4\), above "
            r"8.39e\+03 for float32",
        ),
        (  # two rows 1e-3 apart: invertible, but not in float32
            lambda: oracle.condition(
                jnp.eye(2, D).at[1, 0].set(1.0).at[1, 1].set(1e-3), jnp.ones(2)
            ),
            r"B S1 B\^T has condition number [0-9.]+e\+0[6-7] for B of shape "
            r"\(2, 4\), above 8.39e\+03 for float32: B must have full row rank",
        ),
        (
            lambda: oracle.sample_pairs(jax.random.key(0), -1),
            "n must be a positive integer, got -1",
        ),
        (
            lambda: oracle.sample_pairs(jax.random.key(0), 2.5),
            "n must be a positive integer, got 2.5",
        ),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()
