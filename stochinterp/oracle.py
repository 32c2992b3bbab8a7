"""The Gaussian oracle: exact answers for jointly Gaussian data.

For data x1 ~ N(mu1, S1) and a coupling x0 = A x1 + c + sigma zeta with
Cov(sigma zeta) = S_s, every x_t is Gaussian and the velocity, score and
denoiser are affine in x. With M_t = alpha A + beta I and
M'_t = alpha' A + beta' I:

    mu_t  = M_t mu1 + alpha c
    S_t   = M_t S1 M_t^T + alpha^2 S_s + gamma^2 I
    C_t   = Cov(dx_t, x_t) = M'_t S1 M_t^T + alpha' alpha S_s + gamma' gamma I
    b(t, x)     = mu'_t + C_t S_t^{-1} (x - mu_t)
    score(t, x) = -S_t^{-1} (x - mu_t)
    g(t, x)     = E[z | x_t = x] = gamma S_t^{-1} (x - mu_t)

Coordinates listed in ``known`` (in-painting: the kept pixels) are held at
x1 for all t, as the library's losses and samplers do; with H = I - diag(known)
the path is x_t = diag(known) x1 + H (alpha x0 + beta x1 + gamma z), so M_t
becomes diag(known) + H (alpha A + beta I), M'_t becomes H M'_t, and the noise
terms are sandwiched by H. For the linear path with gamma = 0 the two forms
agree.

Vectors are flat, [d]; a batch of points is [n, d]. An image [H, W, C] maps
to a flat vector in HWC order (``x.reshape(n, -1)`` of an NHWC batch).

How to validate a coupling of your own: write it as x0 = A x1 + c + noise,
build ``GaussianOracle(mu1, S1, A, c, S_s, interpolant)``, draw x1 from
N(mu1, S1) (reshaped to small images), run your coupling and
``losses.interpolate`` to get (x_t, dx_t), and compare a least-squares fit of
dx_t on [x_t, 1] with ``oracle.velocity`` (``tests/test_oracle.py`` does
this for every built-in coupling). A network trained on such data should
approach ``oracle.min_velocity_loss``.

What a conditional network learns: the oracle's fields condition on x_t
only. A network that also sees part of x1 (the super-resolution input
U(D(x1)), the in-painting baseline's masked image) learns the fields of
``oracle.condition(B, y)``, the oracle of x1 given B x1 = y. For in-painting
with an output mask, x_t already reveals the known pixels, so both agree.

Example:

    mask = couplings.tile_mask(key, (1, 4, 4, 1), grid=2)
    oracle = GaussianOracle.inpainting(
        mu1, S1, flat_mask(mask[0], channels=1), interpolants.linear()
    )
    b = oracle.velocity(0.5, x)            # x [n, 16] -> b [n, 16]
    x0, x1 = oracle.sample_pairs(key, 1000)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from stochinterp import sharding
from stochinterp.checks import (
    as_array,
    check_finite,
    check_noise_scale,
    check_positive_int,
    real_scalar,
)
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
      known: [d] 0/1 vector of coordinates held at x1 for all t (in-painting's
        kept pixels), or None.

    The fields are exact where S_t is invertible: for t < 1, or for t = 1 when
    S1 is. ``t`` is a Python or 0-d scalar in every method, 0 <= t <= 1 (checked
    when its value is concrete, as in ``Interpolant.x_t``).
    """

    mu1: jax.Array
    S1: jax.Array
    A: jax.Array
    c: jax.Array
    S_s: jax.Array
    interpolant: Interpolant
    known: jax.Array | None = None

    def __post_init__(self):
        dtype = jnp.result_type(float)
        for name in ("mu1", "S1", "A", "c", "S_s", "known"):
            value = getattr(self, name)
            if name != "known" or value is not None:  # known alone may be None
                object.__setattr__(self, name, as_array(name, value, dtype))
        if self.mu1.ndim != 1:
            raise ValueError(f"mu1 must be a vector [d], got shape {self.mu1.shape}")
        d = self.mu1.shape[0]
        for name in ("S1", "A", "S_s"):
            if getattr(self, name).shape != (d, d):
                raise ValueError(
                    f"{name} must have shape ({d}, {d}) to match mu1, got "
                    f"{getattr(self, name).shape}"
                )
        for name in ("c", "known"):
            value = getattr(self, name)
            if value is not None and value.shape != (d,):
                raise ValueError(
                    f"{name} must have shape ({d},) to match mu1, got {value.shape}"
                )
        for name in ("mu1", "S1", "A", "c", "S_s"):
            check_finite(name, getattr(self, name))
        for name in ("S1", "S_s"):
            _check_covariance(name, getattr(self, name))
        values = None if self.known is None else sharding.host_values(self.known)
        if values is not None:
            if not np.isin(values, (0.0, 1.0)).all():
                raise ValueError(
                    "known must hold only 0 and 1, got "
                    f"{np.unique(values[~np.isin(values, (0.0, 1.0))])[:5].tolist()}"
                )

    @property
    def dim(self) -> int:
        """The dimension d of the flat vectors."""
        return self.mu1.shape[0]

    @classmethod
    def independent(cls, mu1, S1, interpolant: Interpolant) -> GaussianOracle:
        """x0 ~ N(0, I) independent of x1 ~ N(mu1 [d], S1 [d, d])."""
        d = jnp.size(mu1)
        return cls(mu1, S1, jnp.zeros((d, d)), jnp.zeros(d), jnp.eye(d), interpolant)

    @classmethod
    def inpainting(cls, mu1, S1, mask, interpolant: Interpolant) -> GaussianOracle:
        """x0 = mask * x1 + (1 - mask) * zeta for one fixed flat mask.

        Known coordinates are held at x1 for all t, so the velocity there is
        exactly 0 for every interpolant.

        Args:
          mu1: [d] data mean.
          S1: [d, d] data covariance.
          mask: [d] 1 = known, 0 = hidden (``flat_mask`` turns an image mask
            into this).
          interpolant: the path.
        """
        mask = as_array("mask", mask, jnp.result_type(float))
        if mask.ndim != 1:
            raise ValueError(
                f"mask must be a flat vector [d] (flat_mask turns an image mask "
                f"[H, W, 1] into one), got shape {mask.shape}"
            )
        return cls(
            mu1,
            S1,
            jnp.diag(mask),
            jnp.zeros_like(mask),
            jnp.diag(1.0 - mask),
            interpolant,
            known=mask,
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
          mu1: [d] data mean, d = H * W * C.
          S1: [d, d] data covariance.
          image_shape: (H, W, C); the flat vectors are images in HWC order.
          factor: box-down / nearest-up factor.
          sigma: noise scale.
          interpolant: the path.
        """
        check_noise_scale("super-resolution sigma", sigma)
        A = superres_matrix(image_shape, factor)
        d = A.shape[0]
        return cls(mu1, S1, A, jnp.zeros(d), sigma**2 * jnp.eye(d), interpolant)

    def condition(self, B: jax.Array, y: jax.Array) -> GaussianOracle:
        """The oracle for data drawn from x1 | B x1 = y.

        Use it for a network that sees B x1 as conditioning: super-resolution
        (B = ``downsample_matrix``, y = D x1) or a baseline that sees the
        known pixels (B = the rows of I at the known coordinates).

        Args:
          B: [k, d] with full row rank (B S1 B^T invertible).
          y: [k] the observed value of B x1 for one example.

        Returns:
          A GaussianOracle with the conditional mean and covariance of x1.

        Example, the conditional velocity for a batch (y [n, k], x [n, d]):

            b = jax.vmap(
                lambda y, x: oracle.condition(B, y).velocity(t, x[None])[0]
            )(y, x)
        """
        B, y = as_array("B", B, self.mu1.dtype), as_array("y", y, self.mu1.dtype)
        if B.ndim != 2 or B.shape[1] != self.dim:
            raise ValueError(
                f"B must have shape [k, d = {self.dim}], got shape {B.shape}"
            )
        if y.shape != B.shape[:1]:
            raise ValueError(
                f"y must have shape [k] = ({B.shape[0]},) to match B, got shape "
                f"{y.shape}"
            )
        _check_well_conditioned(B, self.S1)
        gain = jnp.linalg.solve(B @ self.S1 @ B.T, B @ self.S1).T  # S1 B^T (.)^-1
        mu1 = self.mu1 + gain @ (y - B @ self.mu1)
        S1 = self.S1 - gain @ B @ self.S1
        return dataclasses.replace(self, mu1=mu1, S1=0.5 * (S1 + S1.T))

    def _coefficients(self, t):
        value = real_scalar("t", t)  # None when traced
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"t must satisfy 0 <= t <= 1, got t = {value}")
        t = jnp.asarray(t, self.mu1.dtype)
        it = self.interpolant
        coefficients = (
            it.alpha(t),
            it.beta(t),
            it.gamma(t),
            it.alpha_dot(t),
            it.beta_dot(t),
            it.gamma_dot(t),
        )
        return tuple(jnp.asarray(v, self.mu1.dtype) for v in coefficients)

    def _moments(self, t):
        alpha, beta, gamma, alpha_dot, beta_dot, gamma_dot = self._coefficients(t)
        eye = jnp.eye(self.dim, dtype=self.mu1.dtype)
        M = alpha * self.A + beta * eye
        M_dot = alpha_dot * self.A + beta_dot * eye
        noise = alpha**2 * self.S_s + gamma**2 * eye
        noise_cross = alpha_dot * alpha * self.S_s + gamma_dot * gamma * eye
        c, c_dot = alpha * self.c, alpha_dot * self.c
        if self.known is not None:
            free = 1.0 - self.known
            M = jnp.diag(self.known) + free[:, None] * M
            M_dot = free[:, None] * M_dot
            noise = free[:, None] * noise * free[None, :]
            noise_cross = free[:, None] * noise_cross * free[None, :]
            c, c_dot = free * c, free * c_dot
        mu_t = M @ self.mu1 + c
        mu_dot = M_dot @ self.mu1 + c_dot
        S_t = M @ self.S1 @ M.T + noise
        C_t = M_dot @ self.S1 @ M.T + noise_cross
        return mu_t, mu_dot, S_t, C_t

    def _check_points(self, x) -> None:
        if jnp.ndim(x) != 2 or jnp.shape(x)[1] != self.dim:
            raise ValueError(
                f"x must be points [n, d = {self.dim}], got shape {jnp.shape(x)}"
            )

    def mean(self, t) -> jax.Array:
        """[d] mean of x_t."""
        return self._moments(t)[0]

    def cov(self, t) -> jax.Array:
        """[d, d] covariance of x_t."""
        return self._moments(t)[2]

    def velocity(self, t, x: jax.Array) -> jax.Array:
        """Exact b(t, x) = E[dx_t | x_t = x] for x [n, d]; returns [n, d]."""
        self._check_points(x)
        mu_t, mu_dot, S_t, C_t = self._moments(t)
        gain = jnp.linalg.solve(S_t, C_t.T).T  # C_t S_t^{-1}
        return mu_dot + (x - mu_t) @ gain.T

    def score(self, t, x: jax.Array) -> jax.Array:
        """Exact grad log density of x_t at x [n, d]; returns [n, d]."""
        self._check_points(x)
        mu_t, _, S_t, _ = self._moments(t)
        precision = jnp.linalg.inv(S_t)  # d x d once, then one matmul for all n
        return -(x - mu_t) @ precision.T

    def denoiser(self, t, x: jax.Array) -> jax.Array:
        """Exact g(t, x) = E[z | x_t = x] = -gamma * score, for x [n, d].

        On ``known`` coordinates z does not enter x_t and g is 0 there.
        """
        gamma = self._coefficients(t)[2]
        g = -gamma * self.score(t, x)
        return g if self.known is None else g * (1.0 - self.known)

    def min_velocity_loss(self, t) -> jax.Array:
        """-E|b(t, x_t)|^2: the minimum of E[|b|^2 - 2 dx_t . b] at time t.

        Averaged over t ~ U(t_min, t_max) (e.g. with ``jax.vmap`` over a grid)
        it is the lowest value the velocity loss of ``losses`` can reach.
        """
        _, mu_dot, S_t, C_t = self._moments(t)
        explained = C_t @ jnp.linalg.solve(S_t, C_t.T)
        return -(mu_dot @ mu_dot + jnp.trace(explained))

    def base_moments(self) -> tuple[jax.Array, jax.Array]:
        """Mean [d] and covariance [d, d] of x0."""
        return self.mean(0.0), self.cov(0.0)

    def sample_pairs(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """Draws n coupled pairs (x0 [n, d], x1 [n, d]); n a positive integer."""
        check_positive_int("n", n)
        key1, key0 = jax.random.split(key)
        x1 = jax.random.multivariate_normal(
            key1, self.mu1, self.S1, (n,), method="eigh"
        )
        noise = jax.random.multivariate_normal(
            key0, jnp.zeros(self.dim), self.S_s, (n,), method="eigh"
        )
        x0 = x1 @ self.A.T + self.c + noise
        return x0, x1


def _check_well_conditioned(B: jax.Array, S1: jax.Array) -> None:
    """Raises unless a concrete B S1 B^T can be inverted in S1's precision.

    The condition number is computed in float64 on the host; above 1e-3 / eps
    of S1's dtype (8.4e3 for float32) the solve loses more than a thousandth
    of its accuracy, and the conditioned covariance may come out indefinite.
    Traced values (e.g. under ``jax.vmap``) pass.
    """
    B_values, S_values = sharding.host_values(B), sharding.host_values(S1)
    if B_values is None or S_values is None:
        return
    B_values = B_values.astype(np.float64)
    M = B_values @ S_values.astype(np.float64) @ B_values.T
    singular_values = np.linalg.svd(M, compute_uv=False)
    limit = 1e-3 / np.finfo(S1.dtype).eps
    if singular_values[-1] <= singular_values[0] / limit:
        smallest = singular_values[-1]
        condition = singular_values[0] / smallest if smallest > 0 else np.inf
        raise ValueError(
            f"B S1 B^T has condition number {condition:.3g} for B of shape "
            f"{B.shape}, above {limit:.3g} for {S1.dtype}: B must have full row "
            "rank with rows that S1 keeps apart"
        )


def _check_covariance(name: str, S: jax.Array) -> None:
    """Raises unless a concrete S is symmetric positive semi-definite.

    Traced matrices (e.g. under ``jax.vmap`` of ``condition``) pass.
    """
    values = sharding.host_values(S)
    if values is None:
        return
    S = values.astype(np.float64)
    scale = max(np.abs(S).max(), 1e-30)
    asymmetry = np.abs(S - S.T).max()
    if asymmetry > 1e-5 * scale:
        raise ValueError(
            f"{name} must be symmetric, got max |{name} - {name}^T| = {asymmetry:.3g}"
        )
    lowest = np.linalg.eigvalsh(0.5 * (S + S.T)).min()
    if lowest < -1e-5 * scale:
        raise ValueError(
            f"{name} must be positive semi-definite, got an eigenvalue {lowest:.3g}"
        )


def flat_mask(mask: jax.Array, channels: int) -> jax.Array:
    """An image mask [H, W, 1] as a flat [H * W * channels] vector (HWC)."""
    mask = jnp.asarray(mask)
    if mask.ndim != 3 or mask.shape[-1] != 1:
        raise ValueError(f"expected a mask of shape [H, W, 1], got {mask.shape}")
    return jnp.repeat(mask, channels, axis=-1).reshape(-1)


def _block_index(image_shape: tuple, factor: int) -> np.ndarray:
    shape = tuple(image_shape) if isinstance(image_shape, tuple | list) else ()
    if len(shape) != 3 or not all(
        isinstance(n, int | np.integer) and not isinstance(n, bool) and n > 0
        for n in shape
    ):
        raise ValueError(
            f"image_shape must be (H, W, C), three positive integers, got "
            f"{image_shape!r}"
        )
    check_positive_int("super-resolution factor", factor)
    height, width, _ = shape
    if height % factor or width % factor:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the "
            f"super-resolution factor {factor}"
        )
    rows = np.arange(height) // factor
    cols = np.arange(width) // factor
    return (rows[:, None] * (width // factor) + cols[None, :]).reshape(-1)


def downsample_matrix(image_shape: tuple, factor: int) -> jax.Array:
    """The box-average D on flat HWC images: [h * w * C, H * W * C].

    ``D @ x.reshape(-1)`` equals ``couplings.box_downsample`` of the image,
    flattened in hwC order.
    """
    block = _block_index(image_shape, factor)
    channels = image_shape[2]
    one_hot = (np.arange(block.max() + 1)[:, None] == block[None, :]).astype(np.float32)
    return jnp.asarray(np.kron(one_hot / factor**2, np.eye(channels, dtype=np.float32)))


def superres_matrix(image_shape: tuple, factor: int) -> jax.Array:
    """The matrix U D of box-down then nearest-up on flat HWC images.

    It is an orthogonal projection: symmetric and idempotent.

    Args:
      image_shape: (H, W, C).
      factor: the down/up factor; H and W must be divisible by it.

    Returns:
      [d, d] with d = H * W * C.
    """
    block = _block_index(image_shape, factor)
    channels = image_shape[2]
    same_block = (block[:, None] == block[None, :]).astype(np.float32) / factor**2
    return jnp.asarray(np.kron(same_block, np.eye(channels, dtype=np.float32)))
