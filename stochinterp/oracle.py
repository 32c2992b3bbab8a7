"""The Gaussian oracle: exact answers for jointly Gaussian data.

For data x1 ~ N(mu1, S1) and a coupling x0 = A x1 + c + sigma zeta with
Cov(sigma zeta) = S_s, every x_t is Gaussian and the velocity and score are
affine in x. With M_t = alpha A + beta I and M'_t = alpha' A + beta' I:

    mu_t  = M_t mu1 + alpha c
    S_t   = M_t S1 M_t^T + alpha^2 S_s + gamma^2 I
    C_t   = Cov(dx_t, x_t) = M'_t S1 M_t^T + alpha' alpha S_s + gamma' gamma I
    b(t, x)     = mu'_t + C_t S_t^{-1} (x - mu_t)
    score(t, x) = -S_t^{-1} (x - mu_t)
    g(t, x)     = E[z | x_t = x] = gamma S_t^{-1} (x - mu_t)

Vectors are flat, [d]; a batch of points is [n, d]. Use the oracle to check a
new coupling or sampler: train or integrate on Gaussian data and compare with
these fields.

Example:

    oracle = GaussianOracle.inpainting(mu1, S1, mask, interpolants.linear())
    b = oracle.velocity(0.5, x)            # [n, d]
    x0, x1 = oracle.sample_pairs(key, 1000)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from stochinterp.interpolants import Interpolant


@dataclasses.dataclass(frozen=True)
class GaussianOracle:
    """Exact moments and fields of x_t for Gaussian data.

    Attributes:
      mu1: [d] data mean.
      S1: [d, d] data covariance.
      A: [d, d] linear part of the coupling.
      c: [d] constant part of the coupling.
      S_s: [d, d] covariance of the coupling noise sigma * zeta.
      interpolant: the path.
    """

    mu1: jax.Array
    S1: jax.Array
    A: jax.Array
    c: jax.Array
    S_s: jax.Array
    interpolant: Interpolant

    @property
    def dim(self) -> int:
        return self.mu1.shape[0]

    @classmethod
    def independent(cls, mu1, S1, interpolant: Interpolant) -> GaussianOracle:
        """x0 ~ N(0, I) independent of x1."""
        d = mu1.shape[0]
        return cls(mu1, S1, jnp.zeros((d, d)), jnp.zeros(d), jnp.eye(d), interpolant)

    @classmethod
    def inpainting(cls, mu1, S1, mask, interpolant: Interpolant) -> GaussianOracle:
        """x0 = mask * x1 + (1 - mask) * zeta for a fixed flat mask [d] (1 = known)."""
        mask = jnp.asarray(mask, jnp.float32)
        return cls(
            mu1,
            S1,
            jnp.diag(mask),
            jnp.zeros_like(mask),
            jnp.diag(1.0 - mask),
            interpolant,
        )

    @classmethod
    def superres(
        cls,
        mu1,
        S1,
        image_shape: tuple,
        factor: int,
        sigma: float,
        interpolant: Interpolant,
    ) -> GaussianOracle:
        """x0 = U(D(x1)) + sigma * zeta for flattened images of ``image_shape``.

        Args:
          image_shape: (H, W, C); the flat vectors are images in HWC order.
          factor: box-down / nearest-up factor.
          sigma: noise scale.
        """
        A = superres_matrix(image_shape, factor)
        d = A.shape[0]
        return cls(mu1, S1, A, jnp.zeros(d), sigma**2 * jnp.eye(d), interpolant)

    def _coefficients(self, t):
        t = jnp.asarray(t, jnp.float32)
        it = self.interpolant
        return (
            it.alpha(t),
            it.beta(t),
            it.gamma(t),
            it.alpha_dot(t),
            it.beta_dot(t),
            it.gamma_dot(t),
        )

    def _moments(self, t):
        alpha, beta, gamma, alpha_dot, beta_dot, gamma_dot = self._coefficients(t)
        eye = jnp.eye(self.dim)
        M = alpha * self.A + beta * eye
        M_dot = alpha_dot * self.A + beta_dot * eye
        mu_t = M @ self.mu1 + alpha * self.c
        mu_dot = M_dot @ self.mu1 + alpha_dot * self.c
        S_t = M @ self.S1 @ M.T + alpha**2 * self.S_s + gamma**2 * eye
        C_t = (
            M_dot @ self.S1 @ M.T
            + alpha_dot * alpha * self.S_s
            + gamma_dot * gamma * eye
        )
        return mu_t, mu_dot, S_t, C_t

    def mean(self, t) -> jax.Array:
        """[d] mean of x_t."""
        return self._moments(t)[0]

    def cov(self, t) -> jax.Array:
        """[d, d] covariance of x_t."""
        return self._moments(t)[2]

    def velocity(self, t, x: jax.Array) -> jax.Array:
        """Exact b(t, x) = E[dx_t | x_t = x] for x [n, d]."""
        mu_t, mu_dot, S_t, C_t = self._moments(t)
        gain = jnp.linalg.solve(S_t, C_t.T).T  # C_t S_t^{-1}
        return mu_dot + (x - mu_t) @ gain.T

    def score(self, t, x: jax.Array) -> jax.Array:
        """Exact grad log density of x_t at x [n, d]."""
        mu_t, _, S_t, _ = self._moments(t)
        return -jnp.linalg.solve(S_t, (x - mu_t).T).T

    def denoiser(self, t, x: jax.Array) -> jax.Array:
        """Exact g(t, x) = E[z | x_t = x] = -gamma * score, for x [n, d]."""
        gamma = self.interpolant.gamma(jnp.asarray(t, jnp.float32))
        return -gamma * self.score(t, x)

    def min_velocity_loss(self, t) -> jax.Array:
        """-E|b(t, x_t)|^2: the minimum of E[|b|^2 - 2 dx_t . b] at time t."""
        mu_t, mu_dot, S_t, C_t = self._moments(t)
        explained = C_t @ jnp.linalg.solve(S_t, C_t.T)
        return -(mu_dot @ mu_dot + jnp.trace(explained))

    def base_moments(self) -> tuple[jax.Array, jax.Array]:
        """Mean [d] and covariance [d, d] of x0."""
        return self.mean(0.0), self.cov(0.0)

    def sample_pairs(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """Draws n coupled pairs (x0 [n, d], x1 [n, d])."""
        key1, key0 = jax.random.split(key)
        x1 = jax.random.multivariate_normal(key1, self.mu1, self.S1, (n,))
        noise = jax.random.multivariate_normal(
            key0, jnp.zeros(self.dim), self.S_s, (n,), method="eigh"
        )
        x0 = x1 @ self.A.T + self.c + noise
        return x0, x1


def superres_matrix(image_shape: tuple, factor: int) -> jax.Array:
    """The matrix U D of box-down then nearest-up on flat HWC images.

    It is an orthogonal projection: symmetric and idempotent.
    """
    height, width, channels = image_shape
    if height % factor or width % factor:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the "
            f"super-resolution factor {factor}"
        )
    rows = np.arange(height) // factor
    cols = np.arange(width) // factor
    block = (rows[:, None] * (width // factor) + cols[None, :]).reshape(-1)
    same_block = (block[:, None] == block[None, :]).astype(np.float32) / factor**2
    return jnp.asarray(np.kron(same_block, np.eye(channels, dtype=np.float32)))
