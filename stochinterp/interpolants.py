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

ScalarFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Interpolant:
    """The coefficient functions of an interpolant and their derivatives.

    Each function maps time ``t`` (any shape) to an array of the same shape.
    Boundary conditions: alpha(0) = beta(1) = 1, alpha(1) = beta(0) = 0,
    gamma(0) = gamma(1) = 0.
    """

    alpha: ScalarFn
    beta: ScalarFn
    alpha_dot: ScalarFn
    beta_dot: ScalarFn
    gamma: ScalarFn
    gamma_dot: ScalarFn
    name: str = "custom"
    has_noise: bool = False

    def x_t(
        self, t: jax.Array, x0: jax.Array, x1: jax.Array, z: jax.Array | None = None
    ) -> jax.Array:
        """The interpolant at time t.

        Args:
          t: [batch] times.
          x0: [batch, ...] base samples.
          x1: [batch, ...] data.
          z: [batch, ...] standard normal latent; required when gamma != 0.

        Returns:
          [batch, ...] the point x_t on the path.
        """
        return self._combine(t, x0, x1, z, self.alpha, self.beta, self.gamma)

    def dx_t(
        self, t: jax.Array, x0: jax.Array, x1: jax.Array, z: jax.Array | None = None
    ) -> jax.Array:
        """The time derivative of x_t: the velocity regression target.

        Shapes as in ``x_t``.
        """
        return self._combine(
            t, x0, x1, z, self.alpha_dot, self.beta_dot, self.gamma_dot
        )

    def _combine(self, t, x0, x1, z, a, b, g):
        t = _expand(t, x0.ndim)
        out = a(t) * x0 + b(t) * x1
        if self.has_noise:
            if z is None:
                raise ValueError(
                    f"interpolant {self.name!r} has gamma != 0 and needs a latent z"
                )
            out = out + g(t) * z
        return out


def _expand(t: jax.Array, ndim: int) -> jax.Array:
    t = jnp.asarray(t)
    return jnp.reshape(t, t.shape + (1,) * (ndim - t.ndim))


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
    if gamma == "zero":
        return _zero, _zero
    if gamma == "sqrt":
        if not gamma_scale > 0:
            raise ValueError(
                f"gamma_scale must be > 0 for gamma='sqrt', got {gamma_scale}"
            )
        return _sqrt_gamma(float(gamma_scale))
    raise ValueError(f"gamma must be 'zero' or 'sqrt', got {gamma!r}")


def linear(gamma: str = "zero", gamma_scale: float = 1.0) -> Interpolant:
    """alpha = 1 - t, beta = t (the image experiments' path with gamma = 0)."""
    g, g_dot = _gamma_pair(gamma, gamma_scale)
    return Interpolant(
        alpha=lambda t: 1.0 - t,
        beta=lambda t: t,
        alpha_dot=lambda t: -jnp.ones_like(t),
        beta_dot=jnp.ones_like,
        gamma=g,
        gamma_dot=g_dot,
        name=f"linear+{gamma}" if gamma != "zero" else "linear",
        has_noise=gamma != "zero",
    )


def trigonometric(gamma: str = "zero", gamma_scale: float = 1.0) -> Interpolant:
    """alpha = cos(pi t / 2), beta = sin(pi t / 2)."""
    g, g_dot = _gamma_pair(gamma, gamma_scale)
    half_pi = jnp.pi / 2
    return Interpolant(
        alpha=lambda t: jnp.cos(half_pi * t),
        beta=lambda t: jnp.sin(half_pi * t),
        alpha_dot=lambda t: -half_pi * jnp.sin(half_pi * t),
        beta_dot=lambda t: half_pi * jnp.cos(half_pi * t),
        gamma=g,
        gamma_dot=g_dot,
        name=f"trigonometric+{gamma}" if gamma != "zero" else "trigonometric",
        has_noise=gamma != "zero",
    )


def custom(
    alpha: ScalarFn,
    beta: ScalarFn,
    alpha_dot: ScalarFn | None = None,
    beta_dot: ScalarFn | None = None,
    gamma: str = "zero",
    gamma_scale: float = 1.0,
    check_boundaries: bool = True,
) -> Interpolant:
    """An interpolant from a user-given pair alpha, beta.

    Derivatives not supplied are taken by forward-mode autodiff of the given
    function (exact, elementwise).

    Raises:
      ValueError: if the boundary conditions alpha(0) = beta(1) = 1,
        alpha(1) = beta(0) = 0 do not hold (to 1e-6).
    """
    if check_boundaries:
        ends = jnp.array([0.0, 1.0])
        a, b = alpha(ends), beta(ends)
        want_a, want_b = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
        if not (
            jnp.allclose(a, want_a, atol=1e-6) and jnp.allclose(b, want_b, atol=1e-6)
        ):
            raise ValueError(
                "custom interpolant must satisfy alpha(0)=1, alpha(1)=0, beta(0)=0, "
                f"beta(1)=1; got alpha(0, 1)={a.tolist()}, beta(0, 1)={b.tolist()}"
            )
    g, g_dot = _gamma_pair(gamma, gamma_scale)
    return Interpolant(
        alpha=alpha,
        beta=beta,
        alpha_dot=alpha_dot or _elementwise_derivative(alpha),
        beta_dot=beta_dot or _elementwise_derivative(beta),
        gamma=g,
        gamma_dot=g_dot,
        name=f"custom+{gamma}" if gamma != "zero" else "custom",
        has_noise=gamma != "zero",
    )


def _elementwise_derivative(fn: ScalarFn) -> ScalarFn:
    def derivative(t):
        t = jnp.asarray(t, jnp.float32)
        return jax.jvp(fn, (t,), (jnp.ones_like(t),))[1]

    return derivative


_FAMILIES = {"linear": linear, "trigonometric": trigonometric}


def from_config(
    name: str, gamma: str = "zero", gamma_scale: float = 1.0
) -> Interpolant:
    """Builds a named family: ``'linear'`` or ``'trigonometric'``."""
    if name not in _FAMILIES:
        raise ValueError(
            f"interpolant {name!r} is not known; choose one of {sorted(_FAMILIES)}"
        )
    return _FAMILIES[name](gamma=gamma, gamma_scale=gamma_scale)


def check_time_range(t_min: float, t_max: float) -> None:
    """Raises unless 0 <= t_min < t_max <= 1."""
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(
            f"time range must satisfy 0 <= t_min < t_max <= 1, got "
            f"t_min={t_min}, t_max={t_max}"
        )


def sample_times(key: jax.Array, n: int, t_min: float, t_max: float) -> jax.Array:
    """Draws n times uniformly from [t_min, t_max]: one per example, shape [n]."""
    return jax.random.uniform(key, (n,), minval=t_min, maxval=t_max)
