"""Velocity, denoiser and score fields built from a network.

A field has the signature ``field(t, x, xi) -> array`` with ``t`` a scalar or
``[batch]``, ``x`` ``[batch, H, W, C]`` and ``xi`` the conditioning pytree of a
``CouplingSample`` (``cond``, ``mask``, ``labels``). The samplers take fields
of this form, so the exact Gaussian fields of ``stochinterp.oracle`` and a
trained network are interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

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
    """

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
    score is set to 0: those pixels do not move.

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
