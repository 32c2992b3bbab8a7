"""Helpers for tests against Gaussian closed forms.

Gaussian data are drawn as small images [n, H, W, C]; the oracle works on
their flat HWC vectors [n, d]. Regressions are fitted in float64 with numpy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from stochinterp import losses


def gaussian(seed: int, d: int, scale: float = 0.6) -> tuple[jax.Array, jax.Array]:
    """A mean [d] and a well-conditioned, correlated covariance [d, d]."""
    rng = np.random.default_rng(seed)
    mu1 = rng.uniform(-0.5, 0.5, d)
    factor = rng.normal(size=(d, d)) / np.sqrt(d)
    S1 = scale * (factor @ factor.T + 0.3 * np.eye(d))
    return jnp.asarray(mu1, jnp.float32), jnp.asarray(S1, jnp.float32)


def draw_images(key, mu1, S1, n: int, image_shape: tuple) -> jax.Array:
    """n draws of N(mu1, S1) as images [n, *image_shape]."""
    x = jax.random.multivariate_normal(key, mu1, S1, (n,), method="eigh")
    return x.reshape((n, *image_shape))


@functools.cache
def _jitted_path(coupling, interpolant):
    def run(key, x1, t):
        key_couple, key_z = jax.random.split(key)
        sample = coupling(key_couple, x1, None)
        z = None
        if interpolant.has_noise:
            z = jax.random.normal(key_z, x1.shape)
        t = jnp.full((x1.shape[0],), t)
        x_t, dx_t = losses.interpolate(interpolant, sample, x1, t, z)
        return x_t, dx_t, z, sample

    return jax.jit(run)


def path_samples(key, coupling, interpolant, x1, t: float):
    """Runs a coupling and ``losses.interpolate`` at one time t (jitted).

    Returns:
      (x_t [n, d], dx_t [n, d], z [n, d] or None, sample), flat except sample.
    """
    n = x1.shape[0]
    x_t, dx_t, z, sample = _jitted_path(coupling, interpolant)(key, x1, t)
    flat = lambda a: None if a is None else np.asarray(a).reshape(n, -1)  # noqa: E731
    return flat(x_t), flat(dx_t), flat(z), sample


def fit_affine(x: np.ndarray, y: np.ndarray):
    """Least squares y ~ x W^T + w0 in float64; returns a function of x."""
    x = np.asarray(x, np.float64)
    design = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.asarray(y, np.float64), rcond=None)
    return lambda q: np.asarray(q, np.float64) @ coef[:-1] + coef[-1]


def relative_error(fitted, exact) -> float:
    """|fitted - exact|_F / |exact|_F over a set of test points."""
    fitted, exact = np.asarray(fitted, np.float64), np.asarray(exact, np.float64)
    return float(np.linalg.norm(fitted - exact) / np.linalg.norm(exact))
