"""Checks made before sampling: SDE stability, labels, guidance, finite output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_classcond, superres_photos32
from stochinterp import couplings, evaluate, fields, interpolants, pipeline, samplers
from stochinterp.oracle import GaussianOracle

Settings = samplers.SamplerSettings


def _em(schedule: str, scale: float, num_steps: int, **kw) -> Settings:
    return Settings(
        "euler_maruyama",
        num_steps=num_steps,
        eps_schedule=schedule,
        eps_scale=scale,
        **kw,
    )


@pytest.mark.parametrize(
    "scale, growth", [(1.0, 1.0), (3.0, 1.0), (5.0, 2.0), (7.0, 3.0)]
)
def test_step_growth_of_one_noisy_step_in_closed_form(scale, growth):
    # Two steps on [0, 1]: the first is noisy, at t = 0 with h = 1/2; the
    # linear path has alpha = 1, alpha' = -1 there, so with sigma = 1 the step
    # multiplies a pinned direction's error by 1 + (-1 - scale) / 2.
    settings = _em("constant", scale, 2, t_min=0.0, t_max=1.0)
    got = fields.velocity_score_step_growth(settings, interpolants.linear(), 1.0)
    assert got == pytest.approx(growth, rel=1e-12)
    # sigma = 1/2 quadruples the score's slope: 1 + (-1 - 4 scale) / 2.
    half = fields.velocity_score_step_growth(settings, interpolants.linear(), 0.5)
    assert half == pytest.approx(max(1.0, (4 * scale - 1) / 2), rel=1e-12)


def _pinned_oracle():
    """Independent N(0, I) base; the last coordinate of the data is almost fixed."""
    mean = jnp.array([0.3, -0.2, 0.1, 0.5])
    cov = jnp.diag(jnp.array([0.5, 0.3, 0.2, 1e-4]))
    return GaussianOracle.independent(mean, cov, interpolants.linear())


def _pinned_spread(settings: Settings) -> float:
    oracle = _pinned_oracle()
    velocity = lambda t, x, xi: oracle.velocity(t, x)  # noqa: E731
    score = fields.score_from_velocity(velocity, oracle.interpolant, 0.0, 1.0)
    chol = jnp.linalg.cholesky(oracle.cov(settings.t_min))
    noise = jax.random.normal(jax.random.key(0), (4000, 4))
    x0 = oracle.mean(settings.t_min) + noise @ chol.T
    x1, _ = samplers.integrate(
        velocity, x0, {}, settings, score=score, key=jax.random.key(1)
    )
    return float(jnp.std(x1[:, -1]))


def test_refused_settings_blow_up_and_accepted_ones_do_not():
    """The check separates the settings that work from those that diverge."""
    interpolant, target = interpolants.linear(), 0.01  # sd of the pinned pixel
    constant = _em("constant", 1.0, 100)
    assert fields.velocity_score_step_growth(constant, interpolant, 1.0) > 1e3
    with pytest.raises(ValueError, match="'constant'.*unstable.*eps_scale <= "):
        fields.check_velocity_score_steps(constant, interpolant, 1.0)
    assert _pinned_spread(constant) > 10 * target

    # Accepted settings are stable; with enough steps they are also accurate
    # (the check is about blowing up, not about the step's accuracy: 'bump'
    # at 100 steps passes it and triples this pixel's spread, 0.032).
    for accepted, tolerance in (
        (_em("decay", 1.0, 100), 0.15),
        (_em("bump", 1.0, 1000), 0.1),
    ):
        fields.check_velocity_score_steps(accepted, interpolant, 1.0)
        assert _pinned_spread(accepted) == pytest.approx(target, rel=tolerance)


def test_a_base_without_noise_has_no_score():
    with pytest.raises(ValueError, match="sigma > 0.*got sigma=0.0"):
        fields.check_velocity_score_steps(
            _em("decay", 1.0, 50), interpolants.linear(), 0.0
        )
    # Without the SDE there is nothing to check.
    fields.check_velocity_score_steps(_em("decay", 0.0, 50), interpolants.linear(), 0.0)
    fields.check_velocity_score_steps(Settings("heun", 10), interpolants.linear(), 0.0)


def test_unstable_sde_settings_are_refused_before_sampling():
    mesh = pipeline.sharding.make_mesh()
    config = superres_photos32.get_config()
    config.sampler.method, config.sampler.num_steps = "euler_maruyama", 100
    config.sampler.eps_schedule = "constant"
    with pytest.raises(ValueError, match="unstable") as error:
        pipeline.validate_sampling(config, mesh)
    assert pipeline.input_errors.is_input_error(error.value)
    config.sampler.eps_schedule, config.coupling.sigma = "decay", 0.0
    with pytest.raises(ValueError, match="sigma > 0"):
        pipeline.validate_sampling(config, mesh)
    config.coupling.sigma = 1.0
    pipeline.validate_sampling(config, mesh)


def _never_called(*args, **kwargs):
    raise AssertionError("the network was called before the inputs were checked")


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.array([11, 1]), r"got \[11\]"),
        (np.array([-1, 1]), r"got \[-1\]"),
        (np.array([10, 1]), r"10 is the null class.*got \[10\]"),
        (np.array([2**33 + 1, 1], np.int64), r"got \[8589934593\]"),
        (None, "needs labels"),
    ],
)
def test_sampling_checks_label_values_before_the_jitted_program(labels, message):
    coupling = couplings.ClassConditioning(couplings.IndependentCoupling(), 10, 0.1)
    with pytest.raises(ValueError, match=message):
        evaluate.sample_coupling(
            _never_called,
            {},
            np.zeros((2, 4, 4, 1), np.float32),
            labels,
            coupling,
            interpolants.linear(),
            Settings("euler", 2),
            jax.random.key(0),
            pipeline.sharding.make_mesh(),
        )


def test_non_finite_samples_are_an_error():
    def apply_fn(variables, x, t, **kwargs):
        return x * jnp.nan

    with pytest.raises(FloatingPointError, match="2 of 2 samples.*non-finite"):
        evaluate.sample_coupling(
            apply_fn,
            {},
            np.zeros((2, 4, 4, 1), np.float32),
            None,
            couplings.IndependentCoupling(),
            interpolants.linear(),
            Settings("euler", 2),
            jax.random.key(0),
            pipeline.sharding.make_mesh(),
        )


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_guidance_scale_must_be_finite(scale):
    with pytest.raises(ValueError, match=f"guidance scale must be finite, got {scale}"):
        fields.guided(lambda t, x, xi: x, scale, null_label=10)
    config = digits_classcond.get_config()
    config.sampler.guidance_scale = scale
    with pytest.raises(ValueError, match=f"guidance_scale must be finite, got {scale}"):
        pipeline.validate_sampling(config, pipeline.sharding.make_mesh())


def test_guidance_refuses_a_bad_null_label():
    with pytest.raises(ValueError, match="null label.*-1"):
        fields.guided(lambda t, x, xi: x, 2.0, null_label=-1)


def test_evaluation_of_a_coupling_other_than_inpainting_is_an_input_error():
    config = superres_photos32.get_config()
    with pytest.raises(ValueError, match="coupling.name='superres'") as error:
        pipeline.check_inpainting(config)
    assert pipeline.input_errors.is_input_error(error.value)
