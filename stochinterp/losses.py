"""Square losses of the velocity (and denoiser) regression.

Reduction: each term is summed over the pixels of an example and averaged
over the batch. The velocity loss E[|b|^2 - 2 dx_t . b] equals E|b - dx_t|^2
minus E|dx_t|^2, a constant of the model, so both have the same gradients;
its minimum is -E|b*(t, x_t)|^2 < 0. The mean squared error |b - dx_t|^2 is
reported beside it as a quantity that goes to a positive floor.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from stochinterp import checks
from stochinterp import interpolants as interp_lib
from stochinterp.couplings import Coupling, CouplingSample
from stochinterp.fields import network_fields


@flax.struct.dataclass
class LossTerms:
    """Per-example loss terms, each of shape [batch].

    Attributes:
      velocity: |b|^2 - 2 dx_t . b (the velocity loss).
      velocity_mse: |b - dx_t|^2.
      denoiser: |g|^2 - 2 z . g, or zeros when there is no denoiser.
      t: the time drawn for each example.
    """

    velocity: jax.Array
    velocity_mse: jax.Array
    denoiser: jax.Array
    t: jax.Array

    @property
    def total(self) -> jax.Array:
        """The per-example training objective, [batch]."""
        return self.velocity + self.denoiser


def _per_example_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def velocity_terms(b: jax.Array, dx_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(|b|^2 - 2 dx_t . b, |b - dx_t|^2) per example, each [batch]."""
    loss = _per_example_sum(jnp.square(b) - 2.0 * dx_t * b)
    mse = _per_example_sum(jnp.square(b - dx_t))
    return loss, mse


def denoiser_term(g: jax.Array, z: jax.Array) -> jax.Array:
    """|g|^2 - 2 z . g per example, [batch]; its minimiser is E[z | x_t]."""
    return _per_example_sum(jnp.square(g) - 2.0 * z * g)


def interpolate(
    interpolant: interp_lib.Interpolant,
    sample: CouplingSample,
    x1: jax.Array,
    t: jax.Array,
    z: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The training pair (x_t, dx_t) for one coupling draw.

    Where the sample has a mask, known pixels are held at x1 and their target
    is exactly 0, whatever the path: x_t = mask * x1 + (1 - mask) * I_t and
    dx_t = (1 - mask) * dI_t. This is what the samplers do (they never move
    known pixels), and for the linear path with gamma = 0 it only removes
    rounding; for other paths it keeps training states equal to sampling
    states on known pixels.

    Args:
      interpolant: the path.
      sample: the coupling draw (x0 [batch, ...], optional mask).
      x1: [batch, ...] data.
      t: [batch] times.
      z: [batch, ...] standard normal latent, needed when gamma != 0.

    Returns:
      (x_t, dx_t), each [batch, ...].
    """
    x_t = interpolant.x_t(t, sample.x0, x1, z)
    dx_t = interpolant.dx_t(t, sample.x0, x1, z)
    if sample.mask is not None:
        free = 1.0 - sample.mask
        x_t = sample.mask * x1 + free * x_t
        dx_t = free * dx_t
    return x_t, dx_t


def make_loss_fn(
    apply_fn: Callable,
    interpolant: interp_lib.Interpolant,
    coupling: Coupling,
    t_min: float,
    t_max: float,
    denoiser: bool = False,
) -> Callable:
    """Returns ``loss_fn(params, key, x1, labels) -> (scalar, LossTerms)``.

    Draws the coupling, one time per example from U(t_min, t_max), the latent
    z when gamma > 0, forms (x_t, dx_t) with ``interpolate``, evaluates the
    network through ``fields.network_fields`` (which multiplies b by
    (1 - mask)) and returns the batch mean of the per-example objective.
    With a mask, the denoiser target is (1 - mask) z: on known pixels z does
    not enter x_t, so g is trained towards 0 there.

    Args:
      apply_fn: network ``apply(variables, x_t, t, cond=..., labels=...)``.
      interpolant: the path.
      coupling: the coupling that draws x0 and the conditioning.
      t_min, t_max: the time range of training.
      denoiser: also train a denoiser head (network output has 2C channels);
        needs gamma > 0.

    Raises:
      ValueError: for arguments of the wrong kind, a bad time range or a
        denoiser with gamma = 0 (here), and for a coupling that does not
        return a ``CouplingSample`` (when the loss is called).
    """
    for name, value in (("apply_fn", apply_fn), ("coupling", coupling)):
        if not callable(value):
            raise ValueError(f"{name} must be callable, got {value!r}")
    if not isinstance(interpolant, interp_lib.Interpolant):
        raise ValueError(
            f"interpolant must be an Interpolant (e.g. interpolants.linear()), got "
            f"{interpolant!r}"
        )
    interp_lib.check_time_range(t_min, t_max, interpolant)
    if denoiser and not interpolant.has_noise:
        raise ValueError(
            "a denoiser loss needs gamma > 0; the interpolant has gamma = 0"
        )

    def loss_fn(params, key, x1, labels=None):
        key_couple, key_t, key_z = jax.random.split(key, 3)
        sample: CouplingSample = coupling(key_couple, x1, labels)
        _check_sample(sample, x1)
        time_dtype = jnp.promote_types(x1.dtype, jnp.float32)
        t = interp_lib.sample_times(key_t, x1.shape[0], t_min, t_max, time_dtype)
        z = None
        if interpolant.has_noise:
            z = jax.random.normal(key_z, x1.shape, x1.dtype)
        x_t, dx_t = interpolate(interpolant, sample, x1, t, z)

        b, g = network_fields(apply_fn, params, x1.shape[-1])(t, x_t, sample.xi)
        velocity, mse = velocity_terms(b, dx_t)
        den = jnp.zeros_like(velocity)
        if denoiser:
            if g is None:
                raise ValueError(
                    "denoiser=True needs a network with 2 * C output channels "
                    f"(velocity and denoiser); it gave {b.shape[-1]}"
                )
            z_target = z if sample.mask is None else z * (1.0 - sample.mask)
            den = denoiser_term(g, z_target)
        terms = LossTerms(velocity=velocity, velocity_mse=mse, denoiser=den, t=t)
        return jnp.mean(terms.total), terms

    return loss_fn


def _check_sample(sample, x1) -> None:
    """Raises unless a coupling gave a CouplingSample whose mask fits x1."""
    if not isinstance(sample, CouplingSample):
        raise ValueError(
            f"the coupling must return a CouplingSample, got {type(sample).__name__}"
        )
    if sample.mask is not None:
        checks.check_mask("the coupling's mask", sample.mask, x1.shape, "the images")


def loss_by_time_bin(
    t: jax.Array,
    values: jax.Array,
    num_bins: int,
    t_min: float = 0.0,
    t_max: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Sums and counts of per-example values in equal time bins.

    Bin k holds t in [t_min + k w, t_min + (k + 1) w) with
    w = (t_max - t_min) / num_bins; t = t_max goes to the last bin, times
    outside the range to the nearest end bin, and non-finite times nowhere
    (they are not counted).

    Args:
      t: [batch] times.
      values: [batch] per-example values (e.g. ``LossTerms.velocity_mse``).
      num_bins: number of equal bins over [t_min, t_max].
      t_min, t_max: the binned range.

    Returns:
      (sums [num_bins], counts [num_bins]); sums / counts is the mean per bin.
      Sums and counts add up across steps, so a logger can accumulate them.

    Raises:
      ValueError: if num_bins < 1 or the time range is not valid.
    """
    if (
        isinstance(num_bins, bool)
        or not isinstance(num_bins, numbers.Integral)
        or num_bins < 1
    ):
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    interp_lib.check_time_range(t_min, t_max)
    index = jnp.floor((t - t_min) / (t_max - t_min) * num_bins).astype(jnp.int32)
    index = jnp.clip(index, 0, num_bins - 1)
    one_hot = jax.nn.one_hot(index, num_bins, dtype=values.dtype)
    finite = jnp.isfinite(t)
    one_hot = jnp.where(finite[:, None], one_hot, 0.0)
    return one_hot.T @ jnp.where(finite, values, 0.0), one_hot.sum(axis=0)
