"""Velocity, denoiser and score fields built from a network.

A field has the signature ``field(t, x, xi) -> array`` with ``t`` a scalar or
``[batch]``, ``x`` ``[batch, H, W, C]`` and ``xi`` the conditioning pytree of a
``CouplingSample`` (``cond``, ``mask``, ``labels``). The samplers take fields
of this form, so the exact Gaussian fields of ``stochinterp.oracle`` and a
trained network are interchangeable.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from stochinterp import checks, samplers
from stochinterp.interpolants import Interpolant, broadcast_time

Field = Callable[[jax.Array, jax.Array, dict], jax.Array]


def _work_dtype(x: jax.Array):
    """The state's dtype, at least float32: time in bfloat16 is too coarse
    (0.999 rounds to 1)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _batch_times(t: jax.Array, batch: int) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    return jnp.broadcast_to(t, (batch,)) if t.ndim == 0 else t


def split_output(
    out: jax.Array, image_channels: int
) -> tuple[jax.Array, jax.Array | None]:
    """Splits a network output into velocity and (optional) denoiser parts.

    A network trained with the denoiser loss has ``2 * image_channels``
    outputs: the first half is b, the second g.
    """
    if out.shape[-1] == image_channels:
        return out, None
    if out.shape[-1] == 2 * image_channels:
        return out[..., :image_channels], out[..., image_channels:]
    raise ValueError(
        f"network output has {out.shape[-1]} channels; expected {image_channels} "
        f"(velocity) or {2 * image_channels} (velocity and denoiser)"
    )


def network_fields(
    apply_fn: Callable, variables, image_channels: int
) -> Callable[[jax.Array, jax.Array, dict], tuple[jax.Array, jax.Array | None]]:
    """Wraps a network as ``fields(t, x, xi) -> (b, g)``.

    The velocity b is multiplied by (1 - mask) when the conditioning holds a
    mask, so known pixels get exactly zero velocity. g is None for a network
    without a denoiser head.
    """

    def fields(t, x, xi):
        out = apply_fn(
            variables,
            x,
            _batch_times(t, x.shape[0]),
            cond=xi.get("cond"),
            labels=xi.get("labels"),
        )
        b, g = split_output(out.astype(jnp.float32), image_channels)
        mask = xi.get("mask")
        if mask is not None:
            b = b * (1.0 - mask)
        return b, g

    return fields


def velocity_field(apply_fn: Callable, variables, image_channels: int) -> Field:
    """The network's velocity b(t, x, xi) (masked on known pixels)."""
    fields = network_fields(apply_fn, variables, image_channels)
    return lambda t, x, xi: fields(t, x, xi)[0]


def guided(field: Field, scale: float, null_label: int) -> Field:
    """Classifier-free guidance applied inside a field.

    Returns ``f_u + scale * (f_c - f_u)`` where f_c uses the labels in ``xi``
    and f_u the null class. ``scale = 1`` gives the conditional field, 0 the
    unconditional one. One call of the guided field costs two network calls,
    made as one batch of twice the size: every ``xi`` leaf whose leading axis
    is the batch is repeated to match; other leaves (scalars, tables) pass
    unchanged.

    ``null_label`` must be the network's null class (``UNet.null_label``):
    the labels are traced inside a sampler, so a label past the network's
    class embedding is not caught there and gives NaN samples.

    Raises:
      ValueError: for a scale that is not a finite number (a traced scale
        passes) or a null label that is not an integer >= 0; checked here,
        before any call.
    """
    _check_scale(scale)
    if (
        isinstance(null_label, bool)
        or not isinstance(null_label, numbers.Integral)
        or null_label < 0
    ):
        raise ValueError(
            f"the null label of guidance must be an integer >= 0, got {null_label!r}"
        )

    def guided_field(t, x, xi):
        labels = xi.get("labels")
        if labels is None:
            raise ValueError("classifier-free guidance needs labels in xi, got None")

        def double(a):
            batched = jnp.ndim(a) >= 1 and jnp.shape(a)[0] == x.shape[0]
            return jnp.concatenate([a, a]) if batched else a

        both = jax.tree.map(double, dict(xi))
        both["labels"] = jnp.concatenate([labels, jnp.full_like(labels, null_label)])
        t2 = t if jnp.ndim(t) == 0 else jnp.concatenate([t, t])
        out = field(t2, jnp.concatenate([x, x]), both)
        conditional, unconditional = jnp.split(out, 2)
        return unconditional + scale * (conditional - unconditional)

    return guided_field


def _check_scale(scale) -> None:
    """Raises unless ``scale`` is one finite real number (a traced one passes)."""
    checks.check_real("guidance scale", scale, "that is finite", np.isfinite)


def score_from_velocity(
    velocity: Field, interpolant: Interpolant, center: jax.Array, sigma
) -> Field:
    """The score of x_t from the velocity, for gamma = 0 couplings.

    With x0 = c + sigma * zeta and gamma = 0, E[x0 | x_t = x] =
    (beta' x - beta b) / (alpha beta' - alpha' beta) and
    score = -(E[x0 | x] - c) / (alpha sigma^2). For the linear path this is
    -(x - c - t b) / ((1 - t) sigma^2). Where sigma = 0 (known pixels) the
    score is set to 0: those pixels do not move. The pixels that move need
    sigma > 0; near t = 1 the score becomes stiff, see
    :func:`check_velocity_score_steps` before running Euler-Maruyama with it.

    Args:
      velocity: the field b(t, x, xi).
      interpolant: the path (gamma must be 0).
      center: c, [batch, ...] or broadcasting against x.
      sigma: float or array broadcasting against x.

    Raises:
      ValueError: for gamma != 0, and for center and sigma that do not
        broadcast against each other (here) or against x (when called).
    """
    if interpolant.has_noise:
        raise ValueError(
            "score_from_velocity needs gamma = 0; with gamma > 0 use the "
            "denoiser: score = -g / gamma"
        )
    center_shape, sigma_shape = np.shape(center), np.shape(sigma)

    def check_shapes(x_shape=None):
        wanted = [] if x_shape is None else [x_shape]
        try:
            joint = np.broadcast_shapes(center_shape, sigma_shape, *wanted)
        except ValueError:
            joint = None
        if joint is None or (x_shape is not None and joint != x_shape):
            against = "each other" if x_shape is None else f"the state x {x_shape}"
            raise ValueError(
                f"score_from_velocity: center {center_shape} and sigma "
                f"{sigma_shape} must broadcast against {against}"
            )

    check_shapes()

    def score(t, x, xi):
        check_shapes(x.shape)
        b = velocity(t, x, xi)
        dtype = _work_dtype(x)
        t = broadcast_time(jnp.asarray(t, dtype), x)
        alpha, beta = interpolant.alpha(t), interpolant.beta(t)
        alpha_dot, beta_dot = interpolant.alpha_dot(t), interpolant.beta_dot(t)
        x = x.astype(dtype)
        x0_mean = (beta_dot * x - beta * b) / (alpha * beta_dot - alpha_dot * beta)
        var = alpha * jnp.square(jnp.asarray(sigma, dtype))
        safe = jnp.where(var > 0, var, 1.0)
        return jnp.where(var > 0, -(x0_mean - center) / safe, 0.0)

    return score


def score_from_denoiser(denoiser: Field, interpolant: Interpolant) -> Field:
    """score = -g / gamma(t) for interpolants with gamma > 0."""
    if not interpolant.has_noise:
        raise ValueError(
            "score_from_denoiser needs gamma > 0; the interpolant has gamma = 0"
        )

    def score(t, x, xi):
        gamma = interpolant.gamma(broadcast_time(jnp.asarray(t, _work_dtype(x)), x))
        return -denoiser(t, x, xi) / gamma

    return score


# Largest extra spread, in units of the base noise sigma, that Euler-Maruyama
# may leave in a pixel (see check_velocity_score_steps).
MAX_EXCESS_SPREAD = 0.1
# Data variances (in units of sigma^2) of the directions sde_excess_spread
# tries: a direction the data pins down, and nearly pinned ones.
_DATA_VARIANCES = np.concatenate([[0.0], np.logspace(-8, 0, 17)])


def sde_variance(
    settings: samplers.SamplerSettings,
    interpolant: Interpolant,
    sigma: float,
    data_variance,
    guidance_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Variance of a Gaussian pixel after Euler-Maruyama, and its exact value.

    A pixel with data variance v (given xi) and base noise sigma has, on a
    gamma = 0 path, x_t ~ N(., V) with V = alpha^2 sigma^2 + beta^2 v; the
    velocity's slope is J = (alpha alpha' sigma^2 + beta beta' v) / V and the
    score's -1 / V, which near t = 1 grows like 1 / (alpha^2 sigma^2) when v
    is small: there the explicit steps blow up unless eps(t) vanishes fast
    enough. Guidance u + w (c - u) scales the velocity's slope by up to
    k = max(1, w, 1 - w), and the score built from it (``score_from_velocity``)
    then has slope -(beta' - k beta J) / ((alpha beta' - alpha' beta) alpha
    sigma^2). The variance of the steps then follows exactly
    v_{i+1} = f_i^2 v_i + 2 eps(t_i) h_i with f_i = 1 + h_i (k J + eps(t_i) x
    score slope), from V(t_min); the last step has no noise and no score.

    Args:
      settings: 'euler_maruyama' settings.
      interpolant: a gamma = 0 path.
      sigma: base noise scale (> 0).
      data_variance: v, a float or an array of them.
      guidance_scale: w (1: no guidance).

    Returns:
      (variance after the last step, V(t_max)), float64 arrays shaped like
      ``data_variance`` (inf where the steps overflow).
    """
    if settings.method != "euler_maruyama":
        raise ValueError(
            f"sde_variance models 'euler_maruyama' steps, got method "
            f"{settings.method!r}"
        )
    _check_noise_scale(sigma, guidance_scale)
    k = max(1.0, guidance_scale, 1.0 - guidance_scale)
    times, steps = samplers.time_grid(settings, np.float64)
    t = times[:-1]

    def at(fn, when=t):
        return np.asarray(fn(jnp.asarray(when)), np.float64)

    a, a_dot = at(interpolant.alpha), at(interpolant.alpha_dot)
    b, b_dot = at(interpolant.beta), at(interpolant.beta_dot)
    eps = at(samplers.eps_schedule(settings.eps_schedule, settings.eps_scale))
    eps[-1] = 0.0  # the last step is an Euler step of the ODE
    shape = np.shape(data_variance)
    v = np.reshape(np.asarray(data_variance, np.float64), (-1, 1))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        var = np.square(a) * sigma**2 + np.square(b) * v  # [pixels, steps]
        slope = k * (a * a_dot * sigma**2 + b * b_dot * v) / var
        score_slope = -(b_dot - b * slope) / ((a * b_dot - a_dot * b) * a * sigma**2)
        square = np.square(1.0 + steps * (slope + eps * score_slope))
        # v_N = v_0 prod_j f_j^2 + sum_i 2 eps_i h_i prod_{j > i} f_j^2.
        after = np.concatenate(
            [np.cumprod(square[:, ::-1], axis=1)[:, ::-1][:, 1:], np.ones_like(v)],
            axis=1,
        )
        final = var[:, 0] * np.prod(square, axis=1) + np.sum(
            2.0 * eps * steps * after, axis=1
        )
    final = np.where(np.isnan(final), np.inf, final)
    t_max = np.array([settings.t_max])
    exact = (at(interpolant.alpha, t_max) * sigma) ** 2 + (
        at(interpolant.beta, t_max) ** 2 * v[:, 0]
    )
    return final.reshape(shape), exact.reshape(shape)


def _check_noise_scale(sigma, guidance_scale) -> None:
    """Raises unless sigma is one finite number >= 0 and the scale is finite."""
    _check_scale(guidance_scale)
    checks.check_noise_scale(
        "sigma (the smallest base noise scale on the pixels that move: "
        "couplings.base_noise_scale)",
        sigma,
    )


def sde_excess_spread(
    settings: samplers.SamplerSettings,
    interpolant: Interpolant,
    sigma: float,
    guidance_scale: float = 1.0,
) -> float:
    """Largest extra standard deviation Euler-Maruyama leaves in a pixel.

    The largest sqrt(max(0, final - exact)) of :func:`sde_variance` over data
    variances from 0 (a pixel the data pins down) to sigma^2; inf for
    sigma <= 0 or when the steps blow up.
    """
    if sigma <= 0:
        return float("inf")
    final, exact = sde_variance(
        settings, interpolant, sigma, _DATA_VARIANCES * sigma**2, guidance_scale
    )
    return float(np.max(np.sqrt(np.maximum(final - exact, 0.0))))


def check_velocity_score_steps(
    settings: samplers.SamplerSettings,
    interpolant: Interpolant,
    sigma: float,
    guidance_scale: float = 1.0,
) -> None:
    """Raises when Euler-Maruyama with ``score_from_velocity`` would go wrong.

    Args:
      settings: the sampler settings (only 'euler_maruyama' with eps_scale > 0
        is checked; other settings pass).
      interpolant: the gamma = 0 path.
      sigma: the smallest noise scale of the base on the pixels that move
        (``couplings.base_noise_scale``).
      guidance_scale: the classifier-free guidance scale w (1: none).

    Raises:
      ValueError: for sigma = 0 (the score is singular: the base is exact
        where the data is), or when the steps would leave an extra spread
        above ``MAX_EXCESS_SPREAD`` sigma in a pixel that the data (nearly)
        pins down (see :func:`sde_excess_spread`; explicit steps blow up there
        when eps(t) does not vanish fast enough near t = 1). The message gives
        the largest scales that pass for the same steps (``largest_eps_scale``),
        for the schedule asked for and for 'decay', if any.

    Settings that pass may still need more steps for accuracy near t = 1:
    'bump' at scale 1 and 100 steps triples the spread of a pixel whose
    target standard deviation is 0.01 (0.032); 1000 steps get it within 4 %.
    """
    _check_noise_scale(sigma, guidance_scale)
    if not settings.needs_score:
        return
    what = (
        f"sampler.method='euler_maruyama' with eps_schedule="
        f"{settings.eps_schedule!r}, eps_scale={settings.eps_scale}"
    )
    if sigma <= 0:
        raise ValueError(
            f"{what} needs a base with noise (sigma > 0) on the pixels that move, "
            f"got sigma={sigma}: the score of a gamma = 0 path is then singular; "
            "set eps_scale=0 (the ODE) or train with sigma > 0"
        )
    limit = MAX_EXCESS_SPREAD * sigma
    got = sde_excess_spread(settings, interpolant, sigma, guidance_scale)
    if got <= limit:
        return
    largest = {
        schedule: largest_eps_scale(
            settings, interpolant, sigma, schedule, guidance_scale
        )
        for schedule in dict.fromkeys([settings.eps_schedule, "decay"])
    }
    options = [
        f"eps_schedule={schedule!r} with eps_scale <= {scale:.3g}"
        for schedule, scale in largest.items()
        if scale > 0
    ]
    advice = (
        f"use {' or '.join(options)}, or eps_scale=0 (the ODE)"
        if options
        else "use eps_scale=0 (the ODE) or more steps"
    )
    guided = f", guidance scale {guidance_scale}" if guidance_scale != 1.0 else ""
    raise ValueError(
        f"{what} and {settings.num_steps} steps goes wrong with a score from the "
        f"velocity (gamma = 0, base noise sigma = {sigma}{guided}): near t = 1 "
        f"the score is stiff (slope about -1 / (alpha(t)^2 sigma^2)) and the "
        f"explicit steps would leave an extra spread of {_above(got, limit)} where "
        f"the data is (nearly) exact (at most {MAX_EXCESS_SPREAD} sigma = "
        f"{limit:.3g} allowed); {advice}"
    )


def largest_eps_scale(
    settings: samplers.SamplerSettings,
    interpolant: Interpolant,
    sigma: float,
    schedule: str | None = None,
    guidance_scale: float = 1.0,
) -> float:
    """The largest eps_scale that ``check_velocity_score_steps`` passes.

    For ``settings``' steps and time range with ``schedule`` (default
    ``settings.eps_schedule``), rounded down to 3 significant digits (so the
    value returned passes); 0 when no scale in (0, 1000] does.
    """
    schedule = settings.eps_schedule if schedule is None else schedule
    limit = MAX_EXCESS_SPREAD * sigma

    def passes(scale: float) -> bool:
        other = dataclasses.replace(
            settings, method="euler_maruyama", eps_schedule=schedule, eps_scale=scale
        )
        return sde_excess_spread(other, interpolant, sigma, guidance_scale) <= limit

    low, high = 0.0, 1e3
    for _ in range(80):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if passes(middle) else (low, middle)
    if low <= 0:
        return 0.0
    digits = 2 - math.floor(math.log10(low))
    low = math.floor(low * 10**digits) / 10**digits
    return low if passes(low) else 0.0


def _above(value: float, limit: float) -> str:
    """``value`` with the digits that show it above ``limit``."""
    for digits in range(3, 10):
        if f"{value:.{digits}g}" != f"{limit:.{digits}g}":
            break
    return f"{value:.{digits}g}"
