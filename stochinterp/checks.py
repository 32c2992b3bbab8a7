"""Value checks shared by the library's modules.

Each raises a ValueError that names the value and what was expected. Values
that are traced (inside ``jax.jit``, ``jax.vmap``, ...) or split over devices
of other processes cannot be read, and pass the value checks unchecked.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from stochinterp import sharding


def is_real_dtype(dtype) -> bool:
    """Integer or floating point, bfloat16 included (not bool or complex)."""
    return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)


def real_scalar(name: str, value) -> float | None:
    """A real scalar's value as a float; None when it is traced.

    Takes Python and numpy numbers and 0-d arrays alike.
    """
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    values = sharding.host_values(value)
    if values is None:
        return None
    if not is_real_dtype(values.dtype):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(values)


def check_real(name: str, value, wanted: str, ok: Callable[[float], bool]) -> None:
    """Raises unless a concrete value is a real scalar that ``ok`` accepts.

    Bools, strings, None and complex numbers are refused, with ``wanted``
    (e.g. ``"in [0, 1]"``) in the message.
    """
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    try:
        number = real_scalar(name, value)
    except ValueError:
        number = float("nan")  # not a real number: ok() refuses it below
    if number is not None and not ok(number):
        raise ValueError(f"{name} must be a real number {wanted}, got {value!r}")


def check_probability(name: str, p: float) -> None:
    """Raises unless p is a real number in [0, 1]."""
    check_real(name, p, "in [0, 1]", lambda v: 0.0 <= v <= 1.0)


def check_noise_scale(name: str, sigma: float) -> None:
    """Raises unless sigma is a finite real number >= 0."""
    check_real(name, sigma, "that is finite and >= 0", lambda v: 0.0 <= v < np.inf)


def check_positive_int(name: str, n: int) -> None:
    """Raises unless n is an integer >= 1 (not a bool or a float)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")


def as_array(name: str, x, dtype=None) -> jax.Array:
    """``x`` as a jax array: lists and NumPy arrays are converted."""
    try:
        return jnp.asarray(x, dtype)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an array of numbers, got {x!r:.80}") from None


def check_finite(name: str, value) -> None:
    """Raises unless a concrete array is finite."""
    values = sharding.host_values(value)
    if values is not None and not np.isfinite(values).all():
        bad = np.unique(values[~np.isfinite(values)]).tolist()
        raise ValueError(f"{name} must be finite, got {bad} among its entries")


def check_mask(name: str, mask, shape: tuple, against: str) -> None:
    """Raises unless ``mask`` broadcasts to ``shape`` (that of ``against``) and,
    when concrete, holds only 0 and 1 (see :func:`check_binary_mask`)."""
    try:
        fits = np.broadcast_shapes(np.shape(mask), tuple(shape)) == tuple(shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{name} of shape {np.shape(mask)} does not broadcast against "
            f"{against} of shape {tuple(shape)}"
        )
    check_binary_mask(name, mask)


def check_binary_mask(name: str, mask) -> None:
    """Raises unless a concrete mask holds only 0 (to generate) and 1 (known)."""
    values = None if mask is None else sharding.host_values(mask)
    if values is None:
        return
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        raise ValueError(
            f"{name} must hold only 0 (to generate) and 1 (known), got "
            f"{bad.size} other values, e.g. {np.unique(bad)[:5].tolist()}"
        )
