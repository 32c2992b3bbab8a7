"""Frechet Inception Distance: feature statistics and the distance between them.

FID fits a Gaussian to the Inception pool3 features of each image set and
returns the squared 2-Wasserstein distance between the two fits,

    FID = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^1/2 S_2 S_1^1/2)^1/2),

with S the unbiased (n - 1) covariance. The statistics are accumulated in
float64 on the host, batch by batch, so any number of images fits in memory.
FID is biased upwards at small n (about 1/n per feature dimension): compare
runs only at the same number of images, and quote FID-50k (50,000 samples)
for numbers in the literature's sense.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from stochinterp import npz_writer, sharding
from stochinterp.models import inception


@dataclasses.dataclass
class FeatureStatistics:
    """Running count, sum and sum of outer products of feature vectors.

    The sums are of the features less ``shift`` (the first batch's mean), so
    that a large common offset does not cancel away the covariance's digits.
    """

    dim: int = inception.FEATURES
    count: int = 0
    shift: np.ndarray | None = None
    total: np.ndarray | None = None
    outer: np.ndarray | None = None

    def __post_init__(self):
        if self.total is None:
            self.total = np.zeros(self.dim)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim))

    def update(self, features: np.ndarray) -> None:
        """Adds a batch. ``features``: [batch, dim]."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"features of shape {features.shape}, expected [batch, {self.dim}]"
            )
        if not np.all(np.isfinite(features)):
            raise ValueError(
                "features hold non-finite values: the network's weights or the "
                "images are not finite"
            )
        if not len(features):
            return
        if self.shift is None:
            self.shift = features.mean(axis=0)
        centred = features - self.shift
        self.count += len(features)
        self.total += centred.sum(axis=0)
        self.outer += centred.T @ centred

    @property
    def mean(self) -> np.ndarray:
        self._check_count()
        return self.shift + self.total / self.count

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased covariance (divides by count - 1), as ``np.cov``."""
        self._check_count()
        mean = self.total / self.count
        cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return (cov + cov.T) / 2

    def _check_count(self) -> None:
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.count}")


def frechet_distance(
    mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray
) -> float:
    """Squared 2-Wasserstein distance between N(mean1, cov1) and N(mean2, cov2).

    The trace of the matrix square root is the sum of the singular values of
    S_2^1/2 S_1^1/2 (the square roots of the eigenvalues of
    S_1^1/2 S_2 S_1^1/2), which holds for singular covariances too (fewer
    images than features). With S_i^1/2 = Q_i D_i Q_i^T from the eigenvalues
    of S_i, those within round-off of zero counted as zero and dropped, they
    are the singular values of the small matrix D_2 Q_2^T Q_1 D_1 (rank x
    rank). Singular values keep the small eigenvalues of the product that its
    own round-off would hide.

    Args:
      mean1, mean2: [dim].
      cov1, cov2: [dim, dim], symmetric positive semi-definite.
    """
    given = {"mean1": mean1, "cov1": cov1, "mean2": mean2, "cov2": cov2}
    arrays = {}
    for name, value in given.items():
        value = np.asarray(value)
        if value.dtype.kind not in "fiu":
            raise ValueError(f"{name} holds {value.dtype} values, not real numbers")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} holds non-finite values")
        arrays[name] = value.astype(np.float64)
    mean1, cov1, mean2, cov2 = arrays.values()
    dim = mean1.shape[-1] if mean1.ndim == 1 else None
    shapes = [a.shape for a in arrays.values()]
    if not dim or shapes != [(dim,), (dim, dim), (dim,), (dim, dim)]:
        raise ValueError(
            f"means and covariances of shapes {shapes}, expected [d], [d, d], "
            "[d], [d, d] with one d >= 1"
        )

    (q1, d1), (q2, d2) = _root_factors(cov1, "cov1"), _root_factors(cov2, "cov2")
    cross = np.linalg.svd(d2[:, None] * (q2.T @ q1) * d1, compute_uv=False)
    distance = (
        np.sum(np.square(mean1 - mean2))
        + np.trace(cov1)
        + np.trace(cov2)
        - 2 * np.sum(cross)
    )
    return float(max(distance, 0.0))


def _root_factors(cov: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(q [dim, rank], d [rank]) with cov^1/2 = q diag(d) q^T, over the
    eigenvalues of the checked ``cov`` above round-off."""
    values, vectors = np.linalg.eigh(cov)
    check_covariance(cov, name, values)
    values = _round_off_to_zero(values)
    kept = values > 0
    return vectors[:, kept], np.sqrt(values[kept])


def _round_off_to_zero(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues with those within round-off of zero set to zero.

    With fewer images than features most eigenvalues are zero, and come out
    as round-off of either sign; their square roots (about 1e-6 of the
    largest one's each) would add up over thousands of them and make the
    distance depend on the order of the sums.
    """
    floor = len(eigenvalues) * np.finfo(np.float64).eps * np.abs(eigenvalues).max()
    return np.where(eigenvalues > floor, eigenvalues, 0.0)


def check_covariance(cov: np.ndarray, name: str, eigenvalues=None) -> None:
    """Raises unless ``cov`` is symmetric positive semi-definite (to round-off).

    Args:
      cov: [d, d].
      name: what it is, for the message.
      eigenvalues: its eigenvalues when already known.
    """
    if eigenvalues is None:
        eigenvalues = np.linalg.eigvalsh(cov)
    scale = max(float(np.abs(eigenvalues).max()), np.finfo(np.float64).tiny)
    asymmetry = float(np.abs(cov - cov.T).max())
    if asymmetry > 1e-6 * scale:
        raise ValueError(
            f"{name} is not symmetric (largest |S - S^T| {asymmetry:.3g}): not a "
            "covariance"
        )
    if eigenvalues.min() < -1e-6 * scale:
        raise ValueError(
            f"{name} has a negative eigenvalue ({eigenvalues.min():.3g}, the "
            f"largest is {eigenvalues.max():.3g}): not a covariance"
        )


def fid_from_statistics(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """FID between two accumulated feature sets."""
    return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)


def save_statistics(path: str, stats: FeatureStatistics) -> None:
    """Writes ``mu``, ``sigma`` (the fitted Gaussian) and ``count`` to ``path``,
    an ``.npz`` name (numpy would add the extension to any other), in one step."""
    if not os.fspath(path).endswith(".npz"):
        raise ValueError(f"FID statistics path {os.fspath(path)!r} must end in .npz")
    npz_writer.save(path, mu=stats.mean, sigma=stats.covariance, count=stats.count)


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a statistics file: ``save_statistics``'s, or any ``.npz``
    with 2048-dimensional ``mu`` and ``sigma`` (pytorch-fid's ``--save-stats``).

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: ``mu`` or ``sigma`` missing, of the wrong shape, or not finite.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no FID statistics file at {path!r}")
    dim = inception.FEATURES
    stored = inception.read_arrays(
        path, ("mu", "sigma"), "FID statistics file", np.float64
    )
    mu, sigma = stored["mu"], stored["sigma"]
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(
            f"FID statistics in {path!r} have mu {mu.shape} and sigma "
            f"{sigma.shape}, expected ({dim},) and ({dim}, {dim})"
        )
    check_covariance(sigma, f"sigma in {path!r}")
    return mu, sigma


def as_8bit(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] as an 8-bit image file holds them: clipped, 256 levels.

    FID is measured on saved images; samples are the sampler's end points,
    which may leave [-1, 1] slightly.
    """
    levels = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5)
    return (levels / 127.5 - 1.0).astype(np.float32)


class FeatureExtractor:
    """Inception pool3 features of images, batch by batch, sharded over a mesh.

    Args:
      weights: path of a converted weight file (``inception.load_weights``),
        or the variables themselves.
      mesh: device mesh; each batch is split over its devices.
      batch_size: images per forward pass (rounded up to a multiple of the
        number of devices); a smaller last batch is padded to a multiple of
        the number of devices.
    """

    def __init__(self, weights: str | dict, mesh=None, batch_size: int = 64):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise ValueError(f"batch_size must be an integer, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(weights, (str, os.PathLike)):
            weights = inception.load_weights(weights)
        self.mesh = sharding.make_mesh() if mesh is None else mesh
        self.variables = sharding.put_whole(weights, sharding.replicated(self.mesh))
        devices = self.mesh.devices.size
        self.batch_size = -(-batch_size // devices) * devices
        self._programs = {}

    def _program(self, images: jax.Array):
        """The network compiled for this input shape (kept for the next batch).

        Compiled without splitting buffers into heaps (a CPU setting that the
        launchers make for the training step): on this network the split
        costs time and logs a warning for every large buffer.
        """
        if images.shape not in self._programs:
            lowered = jax.jit(inception.InceptionFeatures().apply).lower(
                self.variables, images
            )
            self._programs[images.shape] = lowered.compile(
                compiler_options={"xla_multiheap_size_constraint_per_heap": -1}
            )
        return self._programs[images.shape]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """[n, H, W, C] images in [-1, 1] -> [n, 2048] float32 features.

        The images are first rounded as an 8-bit file holds them (``as_8bit``).
        Grey images (C = 1) are repeated over the three colour channels.
        """
        images = as_8bit(np.asarray(images, np.float32))
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"images of shape {images.shape}, expected [n, height, width, 3] "
                "(or 1 channel for grey images)"
            )
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        if 0 in images.shape[1:3]:
            raise ValueError(f"images of shape {images.shape} have no pixels")
        out, devices = [], self.mesh.devices.size
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            real = len(batch)
            # A short batch is padded to split over the devices only: one
            # more compilation, instead of running the network on copies.
            padded = -(-real // devices) * devices
            if real < padded:
                fill = np.repeat(batch[-1:], padded - real, axis=0)
                batch = np.concatenate([batch, fill])
            put = sharding.put_whole(batch, sharding.batch_sharding(self.mesh))
            features = self._program(put)(self.variables, put)
            features = sharding.gather_to_host(features)
            out.append(np.asarray(features)[:real])
        return np.concatenate(out) if out else np.zeros((0, inception.FEATURES))

    def statistics(self, images: np.ndarray) -> FeatureStatistics:
        stats = FeatureStatistics()
        stats.update(self(images))
        return stats
