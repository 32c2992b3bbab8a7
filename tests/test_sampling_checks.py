"""Checks made before sampling: SDE stability, labels, guidance, finite output."""

import dataclasses
import math
import re

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


def _oracle_variances(settings, data_variances, n=20_000):
    """Per-pixel variance of Euler-Maruyama samples of N(0, diag(v)) from N(0, I)."""
    d = len(data_variances)
    oracle = GaussianOracle.independent(
        jnp.zeros(d), jnp.diag(jnp.asarray(data_variances)), interpolants.linear()
    )
    velocity = lambda t, x, xi: oracle.velocity(t, x)  # noqa: E731
    score = fields.score_from_velocity(velocity, oracle.interpolant, 0.0, 1.0)
    chol = jnp.linalg.cholesky(oracle.cov(settings.t_min))
    x0 = jax.random.normal(jax.random.key(0), (n, d)) @ chol.T
    x1, _ = samplers.integrate(
        velocity, x0, {}, settings, score=score, key=jax.random.key(1)
    )
    return np.var(np.asarray(x1, np.float64), axis=0, ddof=1)


@pytest.mark.parametrize(
    "settings",
    [
        _em("constant", 1.0, 10),
        _em("constant", 0.5, 25),
        _em("bump", 1.0, 100),
        _em("decay", 2.0, 50),
    ],
    ids=lambda s: f"{s.eps_schedule}-{s.eps_scale}-{s.num_steps}",
)
def test_sde_variance_predicts_the_sampler_on_gaussian_pixels(settings):
    """The check's linear model is the sampler's exact variance recursion."""
    data_variances = np.array([1e-10, 1e-4, 1e-2, 0.3])
    predicted, _ = fields.sde_variance(
        settings, interpolants.linear(), 1.0, data_variances
    )
    sampled = _oracle_variances(settings, data_variances)
    # Standard error of a sample variance: var * sqrt(2 / (n - 1)), 1 % here.
    np.testing.assert_allclose(sampled, predicted, rtol=0.05)


def test_refused_settings_blow_up_and_accepted_ones_do_not():
    interpolant = interpolants.linear()
    constant = _em("constant", 1.0, 100)
    assert fields.sde_excess_spread(constant, interpolant, 1.0) > 100
    with pytest.raises(ValueError, match="'constant'.*goes wrong.*eps_scale <= "):
        fields.check_velocity_score_steps(constant, interpolant, 1.0)
    # A pixel the data pins to sd 0.01 comes out at about 500.
    assert np.sqrt(_oracle_variances(constant, np.array([1e-4]), 4000))[0] > 100
    for accepted in (_em("decay", 1.0, 100), _em("bump", 1.0, 1000)):
        fields.check_velocity_score_steps(accepted, interpolant, 1.0)
        sd = np.sqrt(_oracle_variances(accepted, np.array([1e-4]), 4000))[0]
        assert sd == pytest.approx(0.01, rel=0.1)


def test_the_suggested_decay_scale_passes():
    interpolant, suggested = interpolants.linear(), 0
    for schedule in ("constant", "bump", "decay"):
        for scale in (0.3, 1.0, 3.0, 10.0):
            for steps in (2, 10, 100):
                for sigma in (0.1, 1.0):
                    settings = _em(schedule, scale, steps)
                    try:
                        fields.check_velocity_score_steps(settings, interpolant, sigma)
                    except ValueError as error:
                        found = re.findall(
                            r"eps_schedule='(\w+)' with eps_scale <= ([0-9.e+-]+)",
                            str(error),
                        )
                        names = [name for name, _ in found]
                        assert names in ([], ["decay"], [schedule, "decay"]), names
                        for name, value in found:
                            suggested += 1
                            fixed = _em(name, float(value), steps)
                            fields.check_velocity_score_steps(fixed, interpolant, sigma)
    assert suggested > 20


@pytest.mark.parametrize("t_min, t_max", [(0.0, 1.0), (1e-3, 1 - 1e-3)])
def test_the_largest_scale_passes_and_the_next_3_digit_one_does_not(t_min, t_max):
    interpolant = interpolants.linear()
    for schedule in ("bump", "decay"):
        settings = Settings(
            "euler_maruyama", 20, t_min=t_min, t_max=t_max, eps_schedule=schedule
        )
        largest = fields.largest_eps_scale(settings, interpolant, 1.0)
        assert 0.5 < largest < 5.0
        step = 10 ** (math.floor(math.log10(largest)) - 2)  # one in the 3rd digit
        fields.check_velocity_score_steps(
            dataclasses.replace(settings, eps_scale=largest), interpolant, 1.0
        )
        with pytest.raises(ValueError) as raised:
            fields.check_velocity_score_steps(
                dataclasses.replace(settings, eps_scale=largest + step),
                interpolant,
                1.0,
            )
        message = str(raised.value)
        # The spread shown is above the limit shown, and the own schedule's
        # largest scale comes first.
        shown = float(re.search(r"extra spread of ([0-9.e+-]+) ", message).group(1))
        assert shown > 0.1
        assert f"eps_schedule={schedule!r} with eps_scale <= {largest:.3g}" in message


def test_guidance_makes_the_score_stiffer():
    """Guidance w scales the slope near t = 1; the check accounts for it."""
    conditional = GaussianOracle.independent(
        jnp.array([0.5]), jnp.array([[1e-4]]), interpolants.linear()
    )
    unconditional = GaussianOracle.independent(
        jnp.zeros(1), jnp.eye(1), interpolants.linear()
    )
    settings = _em("bump", 1.0, 100)
    fields.check_velocity_score_steps(settings, interpolants.linear(), 1.0, 1.0)
    with pytest.raises(ValueError, match="guidance scale 4.0"):
        fields.check_velocity_score_steps(settings, interpolants.linear(), 1.0, 4.0)

    def guided(t, x, xi):
        u, c = unconditional.velocity(t, x), conditional.velocity(t, x)
        return u + 4.0 * (c - u)

    score = fields.score_from_velocity(guided, interpolants.linear(), 0.0, 1.0)
    x0 = jax.random.normal(jax.random.key(0), (4000, 1))
    x1, _ = samplers.integrate(
        guided, x0, {}, settings, score=score, key=jax.random.key(1)
    )
    assert float(jnp.std(x1)) > 10.0  # what the refusal prevents


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
    with pytest.raises(ValueError, match="goes wrong") as error:
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

    with pytest.raises(FloatingPointError, match="2 of 2 samples.*non-finite") as e:
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
    assert str(e.value).endswith("try more steps or another sampler")
    assert pipeline.input_errors.is_input_error(e.value)


def test_a_sampler_that_runs_out_of_steps_is_an_input_error():
    with pytest.raises(RuntimeError, match="raise max_steps") as e:
        evaluate.sample_coupling(
            lambda variables, x, t, **kwargs: -x,
            {},
            np.ones((2, 4, 4, 1), np.float32),
            None,
            couplings.IndependentCoupling(),
            interpolants.linear(),
            Settings("dopri5", max_steps=2),
            jax.random.key(0),
            pipeline.sharding.make_mesh(),
        )
    assert pipeline.input_errors.is_input_error(e.value)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_guidance_scale_must_be_finite(scale):
    with pytest.raises(ValueError, match=f"real number that is finite, got {scale}"):
        fields.guided(lambda t, x, xi: x, scale, null_label=10)


@pytest.mark.parametrize(
    "scale", [float("nan"), float("inf"), -float("inf"), 1e6, 100.5, -101.0]
)
def test_a_config_guidance_scale_past_100_is_refused(scale):
    config = digits_classcond.get_config()
    config.sampler.guidance_scale = scale
    expected = f"sampler.guidance_scale must be a number in [-100, 100], got {scale} "
    with pytest.raises(ValueError) as raised:
        pipeline.validate_sampling(config, pipeline.sharding.make_mesh())
    assert str(raised.value).startswith(expected)
    for edge in (100.0, -100.0):  # the ends are taken
        config.sampler.guidance_scale = edge
        pipeline.validate_sampling(config, pipeline.sharding.make_mesh())


@pytest.mark.parametrize(
    "scale, shown",
    [
        (jnp.array(jnp.nan), r"a real number that is finite, got Array\(nan"),
        (np.array(np.inf), r"a real number that is finite, got array\(inf\)"),
        (1j, "a real number that is finite, got 1j"),
        ([1.0, 2.0], r"a scalar, got shape \(2,\)"),
        (jnp.ones(2), r"a scalar, got shape \(2,\)"),
        ("2", "a real number that is finite, got '2'"),
        (None, "a real number that is finite, got None"),
        (True, "a real number that is finite, got True"),
    ],
)
def test_guidance_scale_must_be_one_real_number_whatever_its_type(scale, shown):
    with pytest.raises(ValueError, match=f"guidance scale must be {shown}"):
        fields.guided(lambda t, x, xi: x, scale, null_label=10)


def test_guidance_takes_array_scales_and_traced_ones():
    field = lambda t, x, xi: x * (1.0 + xi["labels"][:, None])  # noqa: E731
    x, xi = jnp.ones((2, 3)), {"labels": jnp.array([1, 2])}
    # Null label 0 gives x; label k gives (1 + k) x; scale w: (1 + w k) x.
    expected = np.array([[4.0] * 3, [7.0] * 3])
    for scale in (3, np.float32(3.0), jnp.array(3.0)):
        got = fields.guided(field, scale, null_label=0)(0.5, x, xi)
        np.testing.assert_array_equal(got, expected)
    traced = jax.jit(lambda w: fields.guided(field, w, null_label=0)(0.5, x, xi))
    np.testing.assert_array_equal(traced(3.0), expected)


def test_the_null_label_comes_from_a_model_with_a_null_class():
    from stochinterp.models import UNet

    assert UNet(dim=8, num_classes=3, class_null=True).null_label == 3
    for model in (UNet(dim=8, num_classes=3), UNet(dim=8)):
        with pytest.raises(ValueError, match="needs a model with a null class"):
            _ = model.null_label


def test_guidance_refuses_a_bad_null_label():
    with pytest.raises(ValueError, match="null label.*-1"):
        fields.guided(lambda t, x, xi: x, 2.0, null_label=-1)


def test_evaluation_of_a_coupling_other_than_inpainting_is_an_input_error():
    config = superres_photos32.get_config()
    with pytest.raises(ValueError, match="coupling.name='superres'") as error:
        pipeline.check_inpainting(config)
    assert pipeline.input_errors.is_input_error(error.value)


class _ShiftedBase:
    """A coupling of one's own, changed in place between two samplings."""

    def __init__(self, shift):
        self.shift = shift

    def __call__(self, key, x1, labels=None):
        x0 = jnp.full_like(x1, self.shift)
        return couplings.CouplingSample(
            x0=x0, center=x0, sigma=0.0, cond=None, labels=labels
        )


def _standing_still(variables, x, t, **kwargs):
    return jnp.zeros_like(x)  # x stays x0


def _sample_with(coupling, interpolant=None):
    samples, _, _ = evaluate.sample_coupling(
        _standing_still,
        {},
        np.zeros((2, 4, 4, 1), np.float32),
        None,
        coupling,
        interpolant or interpolants.linear(),
        Settings("euler", 2),
        jax.random.key(0),
        pipeline.sharding.make_mesh(),
    )
    return samples


def test_a_coupling_changed_in_place_is_sampled_as_it_is_now():
    coupling = _ShiftedBase(0.5)
    np.testing.assert_array_equal(_sample_with(coupling), 0.5)
    coupling.shift = 0.25
    np.testing.assert_array_equal(_sample_with(coupling), 0.25)


def test_frozen_couplings_share_one_program_and_equal_ones_find_it():
    before = evaluate._kept_program.cache_info()
    independent = couplings.IndependentCoupling()
    first = _sample_with(independent)
    again = _sample_with(couplings.IndependentCoupling())  # equal, not the same
    after = evaluate._kept_program.cache_info()
    assert after.misses - before.misses == 1 and after.hits - before.hits == 1
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize(
    "sigma, shown",
    [(float("nan"), "nan"), (float("inf"), "inf"), (-1.0, "-1.0"), (True, "True")],
)
def test_sde_checks_name_a_bad_noise_scale(sigma, shown):
    settings = _em("decay", 1.0, 20)
    with pytest.raises(
        ValueError,
        match=rf"sigma \(the smallest base noise scale .*\) must be a real number "
        rf"that is finite and >= 0, got {shown}",
    ):
        fields.check_velocity_score_steps(settings, interpolants.linear(), sigma)
    with pytest.raises(
        ValueError, match=r"sigma .* must be a scalar, got shape \(3,\)"
    ):
        fields.check_velocity_score_steps(settings, interpolants.linear(), jnp.ones(3))
    with pytest.raises(ValueError, match="guidance scale must be a real number that"):
        fields.check_velocity_score_steps(
            settings, interpolants.linear(), 1.0, float("nan")
        )


def test_sde_variance_models_euler_maruyama_only():
    with pytest.raises(ValueError, match="'euler_maruyama' steps, got method 'heun'"):
        fields.sde_variance(
            Settings("heun", num_steps=5), interpolants.linear(), 1.0, 0.0
        )


def test_score_from_velocity_names_shapes_that_do_not_broadcast():
    zero = lambda t, x, xi: jnp.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match=r"center \(3, 2\) and sigma \(2, 2\)"):
        fields.score_from_velocity(
            zero, interpolants.linear(), jnp.zeros((3, 2)), jnp.ones((2, 2))
        )
    score = fields.score_from_velocity(
        zero, interpolants.linear(), jnp.zeros((3, 2)), 1.0
    )
    with pytest.raises(ValueError, match=r"against the state x \(4, 2\)"):
        score(0.5, jnp.ones((4, 2)), None)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_scores_take_time_in_float32_for_half_precision_states(dtype):
    # Linear path, b = 0, c = 0, sigma = 1: score = -x / (1 - t). At t = 0.999
    # bfloat16 would round t to 1 (and the score to 0).
    zero = lambda t, x, xi: jnp.zeros_like(x, jnp.float32)  # noqa: E731
    score = fields.score_from_velocity(zero, interpolants.linear(), 0.0, 1.0)
    got = score(0.999, jnp.ones((1, 2), dtype), None)
    np.testing.assert_allclose(got, -1.0 / (1.0 - np.float32(0.999)), rtol=1e-6)
    noisy = interpolants.linear(gamma="sqrt")
    denoised = fields.score_from_denoiser(lambda t, x, xi: jnp.ones_like(x), noisy)
    got = denoised(0.999, jnp.ones((1, 2), dtype), None)
    gamma = np.sqrt(np.float32(0.999) * (1 - np.float32(0.999)))
    np.testing.assert_allclose(got, -1.0 / gamma, rtol=1e-3)
