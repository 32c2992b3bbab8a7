"""FID of sampled images: the ``eval.fid_*`` settings, the set-up, the metrics.

``load`` reads the Inception weights and the reference statistics before any
sampling; ``measure`` gives ``fid_<name>`` of image sets against the reference
(the ground truth unless ``eval.fid_reference`` names statistics);
``baselines`` are the image sets that tell how good a sample's FID is.
``pipeline.held_out_fid`` measures FID over many batches with the same parts.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax.numpy as jnp
import numpy as np

from stochinterp import couplings, evaluate, fid, input_errors


def check_settings(eval_config, num_images: int) -> None:
    """Checks the ``eval.fid_*`` fields; ``load`` reads the files."""
    batch = eval_config.fid_batch
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"eval.fid_batch must be a positive integer, got {batch!r}")
    if not eval_config.fid_weights:
        if eval_config.fid_reference:
            raise ValueError(
                f"eval.fid_reference={eval_config.fid_reference!r} needs "
                "eval.fid_weights (the Inception weights) to measure FID"
            )
        return
    if not os.path.isfile(eval_config.fid_weights):
        raise FileNotFoundError(
            f"eval.fid_weights={eval_config.fid_weights!r} is not a file; make "
            "it with python -m launch.convert_inception, or set "
            "eval.fid_weights='' for no FID"
        )
    reference = eval_config.fid_reference
    if reference and not os.path.isfile(reference):
        raise FileNotFoundError(
            f"eval.fid_reference={reference!r} is not a file; give FID statistics "
            "(.npz with mu and sigma), or '' to compare with the ground truth"
        )
    if num_images < 2:
        raise ValueError(
            f"FID needs at least 2 images to sample, got {num_images} "
            "(eval.num_images or --num_samples)"
        )


@dataclasses.dataclass(frozen=True)
class FidSetup:
    """The FID network and what samples are compared with.

    ``reference`` is (mu, sigma) of ``eval.fid_reference``, or None to compare
    with the ground-truth images of the same sampling.
    """

    extractor: fid.FeatureExtractor
    reference: tuple[np.ndarray, np.ndarray] | None
    reference_name: str
    weights: str = ""


@input_errors.checks
def load(config, mesh, num_images: int) -> FidSetup | None:
    """The FID network and reference statistics; None without eval.fid_weights.

    Runs before sampling, so that a damaged file is reported before any work.
    """
    if not config.eval.fid_weights:
        return None
    check_settings(config.eval, num_images)
    extractor = fid.FeatureExtractor(
        config.eval.fid_weights, mesh, batch_size=config.eval.fid_batch
    )
    path = config.eval.fid_reference
    reference = fid.load_statistics(path) if path else None
    named = files(config)
    return FidSetup(extractor, reference, named["fid_reference"], named["fid_weights"])


# The record's fields that name a run's FID files.
FILE_FIELDS = ("fid_weights", "fid_reference")


def files(config) -> dict:
    """The FID files of a run as its records name them: ``fid_weights`` and
    ``fid_reference`` (a statistics file or "ground truth"); None without FID."""
    if not config.eval.fid_weights:
        return dict.fromkeys(FILE_FIELDS)
    reference = config.eval.fid_reference or "ground truth"
    return dict(zip(FILE_FIELDS, (config.eval.fid_weights, reference), strict=True))


def baselines(config, x1: np.ndarray, sample=None) -> dict:
    """Image sets besides the samples whose FID tells how good the samples are.

    Super-resolution (coupled, or the uncoupled baseline conditioned on the
    low-resolution image): ``upsampled``, the nearest-neighbour upsampled
    low-resolution image U(D(x1)). In-painting (given the coupling's
    ``sample``, whose mask it reads): ``mean_fill``, each hole filled with its
    image's mean known colour. Others: none.

    Args:
      config: the full config.
      x1: [n, H, W, C] the ground-truth images.
      sample: the ``CouplingSample`` drawn for x1 (in-painting only).
    """
    coupling = config.coupling
    baseline = coupling.name == "independent" and coupling.baseline_condition
    if "superres" in (coupling.name, baseline):
        low = couplings.SuperResolutionCoupling(coupling.factor)
        return {"upsampled": np.asarray(low.low_resolution(jnp.asarray(x1)))}
    if evaluate.is_inpainting(config) and sample is not None:
        return {"mean_fill": evaluate.mean_fill(x1, evaluate.inpainting_mask(sample))}
    return {}


def measure(setup: FidSetup, truth: np.ndarray, **image_sets) -> dict:
    """``fid_<name>`` of each image set against the reference.

    Args:
      setup: from ``load``.
      truth: [n, H, W, C] ground-truth images, the reference when
        ``setup.reference`` is None.
      **image_sets: name -> [m, H, W, C] images in [-1, 1].
    """
    start = time.time()
    truth_stats = setup.extractor.statistics(truth) if setup.reference is None else None
    stats = {name: setup.extractor.statistics(v) for name, v in image_sets.items()}
    metrics = distances(setup, truth_stats, stats)
    metrics.update(fid_images=int(len(truth)), fid_seconds=time.time() - start)
    return metrics


def distances(
    setup: FidSetup,
    truth: fid.FeatureStatistics | None,
    image_sets: dict[str, fid.FeatureStatistics],
) -> dict:
    """``fid_<name>`` of each set's statistics against the reference.

    The reference is ``setup.reference``, or ``truth``'s statistics when that
    is None; ``fid_reference`` names it and ``fid_weights`` the network's
    weight file.
    """
    if setup.reference is None:
        mu, sigma = truth.mean, truth.covariance
    else:
        mu, sigma = setup.reference
    metrics = {
        f"fid_{name}": fid.frechet_distance(stats.mean, stats.covariance, mu, sigma)
        for name, stats in image_sets.items()
    }
    metrics.update(fid_reference=setup.reference_name, fid_weights=setup.weights)
    return metrics
