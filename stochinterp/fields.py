"""Velocity, denoiser and score fields built from a network.

A field has the signature ``field(t, x, xi) -> array`` with ``t`` a scalar or
``[batch]``, ``x`` ``[batch, H, W, C]`` and ``xi`` the conditioning pytree of a
``CouplingSample`` (``cond``, ``mask``, ``labels``). The samplers take fields
of this form, so the exact Gaussian fields of ``stochinterp.oracle`` and a
trained network are interchangeable.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from stochinterp import samplers
from stochinterp.interpolants import Interpolant, broadcast_time

Field = Callable[[jax.Array, jax.Array, dict], jax.Array]


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

    Raises:
      ValueError: for a scale that is not a finite number (a traced scale
        passes) or a null label that is not an integer >= 0; checked here,
        before any call.
    """
    if scale is None or isinstance(scale, bool | str):
        raise ValueError(f"guidance scale must be a finite number, got {scale!r}")
    if isinstance(scale, numbers.Real) and not np.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale}")
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
      center: [batch, ...] c.
      sigma: float or array broadcasting against x.
    """
    if interpolant.has_noise:
        raise ValueError(
            "score_from_velocity needs gamma = 0; with gamma > 0 use the "
            "denoiser: score = -g / gamma"
        )

    def score(t, x, xi):
        b = velocity(t, x, xi)
        t = broadcast_time(jnp.asarray(t, x.dtype), x)
        alpha, beta = interpolant.alpha(t), interpolant.beta(t)
        alpha_dot, beta_dot = interpolant.alpha_dot(t), interpolant.beta_dot(t)
        x0_mean = (beta_dot * x - beta * b) / (alpha * beta_dot - alpha_dot * beta)
        var = alpha * jnp.square(jnp.asarray(sigma, x.dtype))
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
        gamma = interpolant.gamma(broadcast_time(jnp.asarray(t, x.dtype), x))
        return -denoiser(t, x, xi) / gamma

    return score


# Largest factor by which the noisy Euler-Maruyama steps may amplify an error
# (see check_velocity_score_steps).
MAX_SCORE_STEP_GROWTH = 2.0


def velocity_score_step_growth(
    settings: samplers.SamplerSettings, interpolant: Interpolant, sigma: float
) -> float:
    """Worst-case error growth of Euler-Maruyama with a score from the velocity.

    In a direction that the data pins down (zero variance given xi), a gamma =
    0 path has x_t ~ N(alpha c + beta m, alpha^2 sigma^2): there the velocity
    has slope alpha'/alpha and the score slope -1 / (alpha^2 sigma^2). A noisy
    step i multiplies an error by f_i = 1 + h (alpha'/alpha - eps /
    (alpha^2 sigma^2)) at t_i; as alpha -> 0 near t = 1, f_i falls below -1
    unless eps(t) vanishes fast enough. Every other direction has gentler
    slopes, so this is the worst case. Returns the product over the noisy
    steps (all but the last) of max(1, -f_i), computed in float64.
    """
    if sigma <= 0:
        return float("inf")
    times, steps = samplers.time_grid(settings, np.float64)
    t, h = times[:-2], steps[:-1]  # the last step has no noise and no score
    alpha = np.asarray(interpolant.alpha(jnp.asarray(t)), np.float64)
    alpha_dot = np.asarray(interpolant.alpha_dot(jnp.asarray(t)), np.float64)
    eps = np.asarray(
        samplers.eps_schedule(settings.eps_schedule, settings.eps_scale)(t),
        np.float64,
    )
    factor = 1.0 + h * (alpha_dot / alpha - eps / (np.square(alpha) * sigma**2))
    with np.errstate(over="ignore"):  # an overflow is an infinite growth
        return float(np.prod(np.maximum(1.0, -factor)))


def check_velocity_score_steps(
    settings: samplers.SamplerSettings, interpolant: Interpolant, sigma: float
) -> None:
    """Raises when Euler-Maruyama with ``score_from_velocity`` would blow up.

    Args:
      settings: the sampler settings (only 'euler_maruyama' with eps_scale > 0
        is checked; other settings pass).
      interpolant: the gamma = 0 path.
      sigma: the smallest noise scale of the base on the pixels that move
        (``couplings.base_noise_scale``).

    Raises:
      ValueError: for sigma = 0 (the score is singular: the base is exact
        where the data is) or when the noisy steps may amplify an error by
        more than ``MAX_SCORE_STEP_GROWTH`` (see
        :func:`velocity_score_step_growth`); the message gives the largest
        stable scale of the 'decay' schedule for the same steps.

    Passing the check means the steps do not blow up, not that they are
    accurate: a pixel that the data almost pins needs enough steps near t = 1
    ('bump' at scale 1 and 100 steps triples the spread of a pixel whose
    target standard deviation is 0.01; 1000 steps get it within 4 %).
    """
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
    growth = velocity_score_step_growth(settings, interpolant, sigma)
    if growth <= MAX_SCORE_STEP_GROWTH:
        return

    def decay_growth(scale):
        decay = dataclasses.replace(settings, eps_schedule="decay", eps_scale=scale)
        return velocity_score_step_growth(decay, interpolant, sigma)

    low, high = 0.0, settings.eps_scale if settings.eps_schedule == "decay" else 1e6
    for _ in range(60):
        middle = 0.5 * (low + high)
        low, high = (
            (middle, high)
            if decay_growth(middle) <= MAX_SCORE_STEP_GROWTH
            else (low, middle)
        )
    raise ValueError(
        f"{what} and {settings.num_steps} steps is unstable with a score from "
        f"the velocity (gamma = 0, base noise sigma = {sigma}): near t = 1 the "
        f"score term eps(t) score has slope -eps(t) / (alpha(t)^2 sigma^2), and "
        f"the explicit steps may amplify errors by up to {growth:.3g} (at most "
        f"{MAX_SCORE_STEP_GROWTH} allowed); use eps_schedule='decay' with "
        f"eps_scale <= {low:.3g}, or eps_scale=0 (the ODE)"
    )
