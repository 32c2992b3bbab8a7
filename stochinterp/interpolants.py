"""Interpolant paths x_t = alpha(t) x0 + beta(t) x1 + gamma(t) z.

Time runs from the base sample (t = 0, x_t = x0) to the data (t = 1,
x_t = x1). Every family comes with analytic time derivatives, so the
regression target dx_t is exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from stochinterp import sharding
from stochinterp.checks import is_real_dtype, real_scalar

ScalarFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Interpolant:
    """The coefficient functions of an interpolant and their derivatives.

    Each function maps time ``t`` (any shape) to an array of the same shape.
    Boundary conditions: alpha(0) = beta(1) = 1, alpha(1) = beta(0) = 0,
    gamma(0) = gamma(1) = 0. The families built here meet them exactly in
    floating point, so ``x_t(0) == x0`` and ``x_t(1) == x1`` bit for bit.

    Attributes:
      alpha, beta, gamma: the coefficient functions.
      alpha_dot, beta_dot, gamma_dot: their time derivatives.
      name: a label for logs.
      has_noise: whether gamma is nonzero (then x_t needs a latent z).
      singular_ends: whether gamma_dot is unbounded at t = 0 and t = 1 (the
        square-root family); t must then stay inside (0, 1).

    ``x_t`` and ``dx_t`` check shapes always and times when their values are
    concrete (not traced inside ``jax.jit``): t in [0, 1], and in (0, 1) for
    ``dx_t`` of a path with singular ends.

    Example:

        path = interpolants.linear()
        x_t = path.x_t(t, x0, x1)      # t [batch], x0 and x1 [batch, H, W, C]
        dx_t = path.dx_t(t, x0, x1)    # the regression target
    """

    alpha: ScalarFn
    beta: ScalarFn
    alpha_dot: ScalarFn
    beta_dot: ScalarFn
    gamma: ScalarFn
    gamma_dot: ScalarFn
    name: str = "custom"
    has_noise: bool = False
    singular_ends: bool = False

    def x_t(
        self, t: jax.Array, x0: jax.Array, x1: jax.Array, z: jax.Array | None = None
    ) -> jax.Array:
        """The interpolant at time t.

        Args:
          t: [batch] times in [0, 1] (or one scalar time for the whole batch).
          x0: [batch, ...] base samples.
          x1: [batch, ...] data, the shape of x0.
          z: [batch, ...] standard normal latent, the shape of x0; required
            when gamma != 0.

        Returns:
          [batch, ...] the point x_t on the path.

        Raises:
          ValueError: for shapes that differ, or concrete times outside [0, 1].
        """
        self._check_inputs("x_t", t, x0, x1, z, open_ends=False)
        return self._combine(t, x0, x1, z, self.alpha, self.beta, self.gamma)

    def dx_t(
        self, t: jax.Array, x0: jax.Array, x1: jax.Array, z: jax.Array | None = None
    ) -> jax.Array:
        """The time derivative of x_t: the velocity regression target.

        Shapes and checks as in ``x_t``; with singular ends (gamma_dot
        unbounded at t = 0 and t = 1) concrete times must lie in (0, 1).
        """
        self._check_inputs("dx_t", t, x0, x1, z, open_ends=self.singular_ends)
        return self._combine(
            t, x0, x1, z, self.alpha_dot, self.beta_dot, self.gamma_dot
        )

    def _check_inputs(self, method, t, x0, x1, z, open_ends: bool) -> None:
        """Checks shapes and concrete times: in [0, 1], or (0, 1) with open_ends.

        The shape of t is checked by ``broadcast_time``.
        """
        shape = np.shape(x0)
        if np.shape(x1) != shape:
            raise ValueError(
                f"x0 and x1 must have the same shape [batch, ...], got x0 {shape} "
                f"and x1 {np.shape(x1)}"
            )
        if self.has_noise and z is None:
            raise ValueError(
                f"interpolant {self.name!r} has gamma != 0 and needs a latent z"
            )
        if self.has_noise and np.shape(z) != shape:
            raise ValueError(f"z must have the shape of x0 {shape}, got {np.shape(z)}")

        values = sharding.host_values(t)
        if values is None:
            return
        if not is_real_dtype(values.dtype):
            raise ValueError(
                f"interpolant {self.name!r}: {method} needs real times t, got {t!r}"
            )
        if open_ends:
            inside, wanted = (values > 0) & (values < 1), "0 < t < 1"
        else:
            inside, wanted = (values >= 0) & (values <= 1), "0 <= t <= 1"
        if not inside.all():
            why = " (gamma_dot is unbounded at the ends)" if open_ends else ""
            raise ValueError(
                f"interpolant {self.name!r}: {method} needs {wanted}{why}, got "
                f"t = {np.unique(values[~inside])[:5].tolist()}"
            )

    def _combine(self, t, x0, x1, z, a, b, g):
        x0, x1 = jnp.asarray(x0), jnp.asarray(x1)  # NumPy arrays and lists too
        t = broadcast_time(t, x0)
        out = a(t) * x0 + b(t) * x1
        if self.has_noise:
            out = out + g(t) * jnp.asarray(z)
        return out


def _expand(t: jax.Array, ndim: int) -> jax.Array:
    t = jnp.asarray(t)
    return jnp.reshape(t, t.shape + (1,) * (ndim - t.ndim))


def broadcast_time(t: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes times to broadcast against a batch.

    Args:
      t: a scalar or [batch] times.
      x: [batch, ...] array.

    Returns:
      t with trailing unit axes, [] or [batch, 1, ..., 1], so that
      ``alpha(broadcast_time(t, x)) * x`` scales each example by its own time.
    """
    if np.ndim(x) == 0:
        raise ValueError("x must be a [batch, ...] array, got a scalar")
    t = jnp.asarray(t)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
        raise ValueError(
            f"times must be a scalar or [batch] = [{x.shape[0]}], got shape {t.shape}"
        )
    return t if t.ndim == 0 else _expand(t, x.ndim)


def _zero(t):
    return jnp.zeros_like(t)


def _sqrt_gamma(a: float) -> tuple[ScalarFn, ScalarFn]:
    """gamma = sqrt(a t (1 - t)) and its derivative a (1 - 2t) / (2 gamma)."""

    def gamma(t):
        return jnp.sqrt(a * t * (1.0 - t))

    def gamma_dot(t):
        return a * (1.0 - 2.0 * t) / (2.0 * jnp.sqrt(a * t * (1.0 - t)))

    return gamma, gamma_dot


def _gamma_pair(gamma: str, gamma_scale: float) -> tuple[ScalarFn, ScalarFn]:
    """gamma and gamma_dot of a named form; gamma_scale must be finite and >= 0.

    The square-root form needs gamma_scale > 0 (at 0 its gamma_dot is 0 / 0).
    """
    if not isinstance(gamma, str) or gamma not in ("zero", "sqrt"):
        raise ValueError(f"gamma must be 'zero' or 'sqrt', got {gamma!r}")
    scale = real_scalar("gamma_scale", gamma_scale)
    if scale is None:
        raise ValueError("gamma_scale must be a concrete number, got a traced value")
    if gamma == "zero":
        if not 0.0 <= scale < np.inf:
            raise ValueError(f"gamma_scale must be finite and >= 0, got {scale}")
        return _zero, _zero
    if not 0.0 < scale < np.inf:
        raise ValueError(
            f"gamma_scale must be finite and > 0 for gamma='sqrt', got {scale}"
        )
    return _sqrt_gamma(scale)


def _path(
    name: str,
    alpha: ScalarFn,
    beta: ScalarFn,
    alpha_dot: ScalarFn,
    beta_dot: ScalarFn,
    gamma: str,
    gamma_scale: float,
) -> Interpolant:
    g, g_dot = _gamma_pair(gamma, gamma_scale)  # checks them
    # The same family and settings give the same object, so that programs
    # compiled for one (a sampler's, batch after batch) are found again.
    key = (name, gamma, float(gamma_scale) if gamma != "zero" else None)
    if key not in _BUILT:
        _BUILT[key] = Interpolant(
            alpha=alpha,
            beta=beta,
            alpha_dot=alpha_dot,
            beta_dot=beta_dot,
            gamma=g,
            gamma_dot=g_dot,
            name=f"{name}+{gamma}" if gamma != "zero" else name,
            has_noise=gamma != "zero",
            singular_ends=gamma == "sqrt",
        )
    return _BUILT[key]


_BUILT: dict[tuple, Interpolant] = {}  # the named families' paths, by settings


def linear(gamma: str = "zero", gamma_scale: float = 1.0) -> Interpolant:
    """alpha = 1 - t, beta = t (the image experiments' path with gamma = 0).

    Args:
      gamma: ``'zero'`` or ``'sqrt'`` (gamma = sqrt(gamma_scale t (1 - t))).
      gamma_scale: the factor a of the square-root form: finite and > 0 (any
        finite value >= 0 with ``gamma='zero'``, which ignores it).
    """
    return _path(
        "linear",
        alpha=lambda t: 1.0 - t,
        beta=lambda t: t,
        alpha_dot=lambda t: -jnp.ones_like(t),
        beta_dot=jnp.ones_like,
        gamma=gamma,
        gamma_scale=gamma_scale,
    )


def trigonometric(gamma: str = "zero", gamma_scale: float = 1.0) -> Interpolant:
    """alpha = cos(pi t / 2), beta = sin(pi t / 2).

    alpha is evaluated as sin(pi (1 - t) / 2), which is the same function but
    is exactly 0 at t = 1 in floating point (cos of the rounded pi / 2 is not).
    Arguments as in ``linear``.
    """
    half_pi = jnp.pi / 2
    return _path(
        "trigonometric",
        alpha=lambda t: jnp.sin(half_pi * (1.0 - t)),
        beta=lambda t: jnp.sin(half_pi * t),
        alpha_dot=lambda t: -half_pi * jnp.sin(half_pi * t),
        beta_dot=lambda t: half_pi * jnp.cos(half_pi * t),
        gamma=gamma,
        gamma_scale=gamma_scale,
    )


def custom(
    alpha: ScalarFn,
    beta: ScalarFn,
    alpha_dot: ScalarFn | None = None,
    beta_dot: ScalarFn | None = None,
    gamma: str | ScalarFn = "zero",
    gamma_scale: float = 1.0,
    check_boundaries: bool = True,
    gamma_dot: ScalarFn | None = None,
) -> Interpolant:
    """An interpolant from a user-given pair alpha, beta (and optionally gamma).

    The functions must be elementwise and written with ``jax.numpy``.
    Derivatives not supplied are taken by forward-mode autodiff of the given
    function (exact up to rounding). The returned alpha, beta and gamma are
    pinned to their boundary values at t = 0 and t = 1 exactly, so
    ``x_t(0) == x0`` and ``x_t(1) == x1`` even when, say, ``cos(pi / 2)``
    rounds to 4e-8; in between they are the given functions.

    Args:
      alpha, beta: the coefficient functions of t.
      alpha_dot, beta_dot: their derivatives, or None for autodiff.
      gamma: ``'zero'``, ``'sqrt'`` (sqrt(gamma_scale t (1 - t))), or a
        function of t with gamma(0) = gamma(1) = 0. A user-given gamma whose
        derivative is unbounded at the ends must be used with t_min > 0 and
        t_max < 1; nothing here can detect that.
      gamma_scale: the factor of the ``'sqrt'`` form, as in ``linear``.
      check_boundaries: check the boundary values (to 1e-6) before pinning.
      gamma_dot: the derivative of a user-given gamma, or None for autodiff;
        only with a user-given gamma.

    Raises:
      ValueError: if a function is not callable, gamma_dot comes without a
        user-given gamma, or the boundary conditions alpha(0) = beta(1) = 1,
        alpha(1) = beta(0) = 0 (and gamma(0) = gamma(1) = 0 for a user-given
        gamma) do not hold to 1e-6.

    Example:

        path = interpolants.custom(
            alpha=lambda t: (1 - t) ** 2, beta=lambda t: 1 - (1 - t) ** 2
        )
    """
    user_gamma = callable(gamma)
    _check_functions(
        alpha=alpha,
        beta=beta,
        alpha_dot=alpha_dot,
        beta_dot=beta_dot,
        gamma_dot=gamma_dot,
    )
    if gamma_dot is not None and not user_gamma:
        raise ValueError(
            f"gamma_dot is given but gamma is {gamma!r}; gamma_dot belongs to a "
            "user-given gamma function"
        )
    if check_boundaries:
        _check_ends("alpha", alpha, 1.0, 0.0)
        _check_ends("beta", beta, 0.0, 1.0)
        if user_gamma:
            _check_ends("gamma", gamma, 0.0, 0.0)
    if user_gamma:
        g = _pinned(gamma, 0.0, 0.0)
        g_dot = gamma_dot or _elementwise_derivative(gamma)
        has_noise, singular, label = True, False, "custom+user"
    else:
        g, g_dot = _gamma_pair(gamma, gamma_scale)
        has_noise, singular = gamma != "zero", gamma == "sqrt"
        label = f"custom+{gamma}" if has_noise else "custom"
    return Interpolant(
        alpha=_pinned(alpha, 1.0, 0.0),
        beta=_pinned(beta, 0.0, 1.0),
        alpha_dot=alpha_dot or _elementwise_derivative(alpha),
        beta_dot=beta_dot or _elementwise_derivative(beta),
        gamma=g,
        gamma_dot=g_dot,
        name=label,
        has_noise=has_noise,
        singular_ends=singular,
    )


def _check_functions(**functions) -> None:
    """Raises unless alpha and beta are callable, and the others callable or None."""
    for name, fn in functions.items():
        optional = name not in ("alpha", "beta")
        if not callable(fn) and not (optional and fn is None):
            expected = "a function of t" + (" or None" if optional else "")
            raise ValueError(f"{name} must be {expected}, got {fn!r}")


def _check_ends(name: str, fn: ScalarFn, at0: float, at1: float) -> None:
    try:
        got = jnp.asarray(fn(jnp.array([0.0, 1.0])))
    except (TypeError, jax.errors.JAXTypeError) as e:
        raise ValueError(
            f"{name} must be an elementwise function written with jax.numpy; "
            f"{name}(jnp.array([0., 1.])) raised {type(e).__name__}: {e}"
        ) from e
    if got.shape != (2,):
        raise ValueError(
            f"{name} must be elementwise; {name}(jnp.array([0., 1.])) has shape "
            f"{got.shape}, expected (2,)"
        )
    if not jnp.allclose(got, jnp.array([at0, at1]), atol=1e-6):
        raise ValueError(
            f"custom interpolant needs {name}(0)={at0} and {name}(1)={at1}; got "
            f"{name}(0)={float(got[0])}, {name}(1)={float(got[1])}"
        )


def _pinned(fn: ScalarFn, at0: float, at1: float) -> ScalarFn:
    """fn with its values at t = 0 and t = 1 set exactly to at0 and at1."""

    def pinned(t):
        t = jnp.asarray(t)
        return jnp.where(t == 0, at0, jnp.where(t == 1, at1, fn(t)))

    return pinned


def _elementwise_derivative(fn: ScalarFn) -> ScalarFn:
    def derivative(t):
        t = jnp.asarray(t)  # keeps its precision (and a Python float weak)
        if not jnp.issubdtype(t.dtype, jnp.floating):
            t = t.astype(jnp.result_type(float))
        return jax.jvp(fn, (t,), (jnp.ones_like(t),))[1]

    return derivative


_FAMILIES = {"linear": linear, "trigonometric": trigonometric}


def from_config(
    name: str, gamma: str = "zero", gamma_scale: float = 1.0
) -> Interpolant:
    """Builds a named family: ``'linear'`` or ``'trigonometric'``."""
    if not isinstance(name, str) or name not in _FAMILIES:
        raise ValueError(
            f"interpolant {name!r} is not known; choose one of {sorted(_FAMILIES)}"
        )
    return _FAMILIES[name](gamma=gamma, gamma_scale=gamma_scale)


def check_time_range(
    t_min: float, t_max: float, interpolant: Interpolant | None = None
) -> None:
    """Raises a ValueError unless 0 <= t_min < t_max <= 1 (concrete numbers).

    Given an interpolant whose gamma_dot is unbounded at the ends (the
    square-root family), it also requires 0 < t_min and t_max < 1.
    """
    for name, value in (("t_min", t_min), ("t_max", t_max)):
        if isinstance(value, bool) or real_scalar(name, value) is None:
            raise ValueError(f"{name} must be a real number, got {value!r}")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(
            f"time range must satisfy 0 <= t_min < t_max <= 1, got "
            f"t_min={t_min}, t_max={t_max}"
        )
    tiny = np.finfo(np.float32).tiny
    for name, value in (("t_min", t_min), ("t_max", t_max)):
        if 0.0 < value < tiny:
            raise ValueError(
                f"{name}={value} is below float32's smallest normal number "
                f"({tiny:.3g}), which XLA flushes to zero; use "
                f"{'0 or ' if name == 't_min' else ''}at least {tiny:.3g}"
            )
    if np.float32(t_max) - np.float32(t_min) < tiny:
        raise ValueError(
            f"t_min={t_min} and t_max={t_max} are the same number in float32, "
            "the precision times are computed in; widen the time range"
        )
    if interpolant is not None and interpolant.singular_ends:
        if t_min <= 0.0 or t_max >= 1.0:
            raise ValueError(
                f"interpolant {interpolant.name!r} has gamma_dot unbounded at "
                f"t = 0 and t = 1; need 0 < t_min and t_max < 1, got "
                f"t_min={t_min}, t_max={t_max}"
            )


def sample_times(
    key: jax.Array, n: int, t_min: float, t_max: float, dtype=jnp.float32
) -> jax.Array:
    """Draws n times uniformly from [t_min, t_max): one per example.

    Args:
      key: PRNG key.
      n: number of times, a positive integer.
      t_min, t_max: the range, scalars; checked with ``check_time_range`` when
        their values are concrete (Python or numpy numbers, or arrays outside
        ``jax.jit``), each against [0, 1] when only one is.
      dtype: a floating dtype of at least 32 bits (float32 by default, with or
        without ``jax_enable_x64``).

    Returns:
      [n] times of that dtype.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    low = real_scalar("t_min", t_min)
    high = real_scalar("t_max", t_max)
    if low is not None and high is not None:
        check_time_range(low, high)
    for name, value in (("t_min", low), ("t_max", high)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {name}={value}")
    try:
        kind = np.dtype(dtype)
    except TypeError:
        kind = None
    if kind is None or kind.kind != "f" or kind.itemsize < 4:
        raise ValueError(
            f"dtype must be a floating dtype of at least 32 bits, got {dtype!r}"
        )
    return jax.random.uniform(key, (n,), dtype, minval=t_min, maxval=t_max)
