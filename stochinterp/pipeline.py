"""The main job: train, then sample the fixed test images and report.

``train_and_evaluate`` is what ``python -m launch.train`` runs; the same
functions serve ``launch.sample`` and ``launch.evaluate`` on a finished
workdir.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import zipfile

import jax
import ml_collections
import numpy as np

from stochinterp import (
    checkpointing,
    couplings,
    evaluate,
    fid,
    fid_eval,
    input_errors,
    interpolants,
    npz_writer,
    samplers,
    sharding,
    train,
)
from stochinterp import data as data_lib
from stochinterp import workdir as workdir_lib

log = logging.getLogger(__name__)


def mse_trend(history: list[float]) -> dict:
    """Mean |b - dx_t|^2 over the first and the last 10% of the steps."""
    n = max(len(history) // 10, 1)
    first, last = float(np.mean(history[:n])), float(np.mean(history[-n:]))
    return {
        "mse_first_10pct": first,
        "mse_last_10pct": last,
        "mse_ratio_last_first": last / first,
    }


@input_errors.checks
def validate_sampling(
    config, mesh, num_images: int | None = None, seed: int | None = None
) -> None:
    """Checks the sampler and evaluation fields; raises before any work.

    Args:
      config: the full config.
      mesh: the device mesh; the number of images must split over it. None
        when nothing is sampled now (training without evaluation): the
        count is then only checked to be positive.
      num_images: images to sample (default ``config.eval.num_images``).
      seed: seed of the sampling (default ``config.eval.seed``).
    """
    train.check_seed("seed", config.seed)  # builds the restored state's shape
    if seed is None:
        train.check_seed("eval.seed", config.eval.seed)
    else:
        train.check_seed("--seed", seed)
    n = config.eval.num_images if num_images is None else num_images
    devices = 1 if mesh is None else mesh.devices.size
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n % devices:
        raise ValueError(
            f"number of images to sample ({n!r}: eval.num_images or "
            f"--num_samples) must be a positive multiple of the number of "
            f"devices ({devices})"
        )
    batch = config.eval.batch
    whole = isinstance(batch, int) and not isinstance(batch, bool)
    if not whole or batch < 0 or batch % devices:
        raise ValueError(
            f"eval.batch must be 0 (all eval.num_images at once) or a positive "
            f"multiple of the number of devices ({devices}), got "
            f"{config.eval.batch!r}"
        )
    if config.eval.grid_images < 1:
        raise ValueError(
            f"eval.grid_images must be >= 1, got {config.eval.grid_images}"
        )
    fid_eval.check_settings(config.eval, n)
    settings = samplers.SamplerSettings.from_config(config.sampler)
    interpolant = interpolants.from_config(**config.interpolant)
    if settings.needs_score or interpolant.has_noise:
        interpolants.check_time_range(settings.t_min, settings.t_max, interpolant)
    if settings.needs_score and interpolant.has_noise and not config.train.denoiser:
        raise ValueError(
            "sampler.method='euler_maruyama' with gamma > 0 needs the denoiser: "
            "set train.denoiser=True (or sampler.eps_scale=0)"
        )
    evaluate.check_sde_steps(
        settings,
        interpolant,
        couplings.from_config(config.coupling),
        config.sampler.guidance_scale,
    )
    _guidance(config)


@input_errors.checks
def check_held_out_size(config, num_images: int) -> None:
    """Raises unless the held-out split holds ``num_images`` images.

    Builds the dataset if needed (training would build it first anyway).
    """
    info = data_lib.dataset_info(config.data)
    split = data_lib.sampled_split(config.data)
    available = info.split_sizes.get(split, 0)
    if num_images > available:
        hint = ""
        if available == 0 and split != "train":
            hint = (
                " (its source gave no images for it; data.eval_split='train' "
                "samples training images instead)"
            )
        raise ValueError(
            f"{num_images} images to sample (eval.num_images or --num_samples), "
            f"but split {split!r} of {info.name} holds {available}{hint}"
        )


def _no_checkpoint(workdir: str) -> FileNotFoundError:
    directory = os.path.join(workdir, "checkpoints")
    return FileNotFoundError(
        f"no complete checkpoint in {directory!r}; train first with "
        f"python -m launch.train --config <the same config> --workdir {workdir} "
        "(a run in progress writes its first one after train.checkpoint_every "
        "steps)"
    )


@input_errors.checks
def check_trained_workdir(config, workdir: str) -> None:
    """Raises unless ``workdir`` holds checkpoints of a run with this config.

    Cheap (reads ``config.json`` only): launchers call it before any work.
    The fields that must match are those of ``train.check_saved_config``.
    """
    _check_has_checkpoints(workdir)
    train.check_saved_config(workdir, config)


def _check_has_checkpoints(workdir: str) -> None:
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise _no_checkpoint(workdir)


@input_errors.checks
def check_output_files(*paths: str) -> None:
    """Raises, before any work, when an output file could not be written.

    Each path's folder must be writable, and the path must not be a folder.
    """
    for path in paths:
        workdir_lib.ensure_writable(os.path.dirname(os.path.abspath(path)))
        if os.path.isdir(path):
            raise IsADirectoryError(
                f"{path!r} is a folder, where an output file is to be written; "
                "move it out of the way or choose another --tag"
            )


@input_errors.checks
def check_output_folder(workdir: str) -> None:
    """Raises unless ``workdir/samples`` is, or can be made, a writable folder.

    Launchers that write samples or pictures there call it before any work.
    """
    folder = os.path.join(workdir, "samples")
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(
            f"{folder!r} is not a folder: sampling writes its outputs there; "
            "move that file out of the way"
        )
    workdir_lib.ensure_writable(folder)


@input_errors.checks
def load_variables(config, workdir: str, mesh, use_ema: bool):
    """Restores the latest checkpoint: returns (model, variables, step).

    Its errors (no checkpoint, a config that does not match the saved one)
    are input errors (``stochinterp.input_errors``).
    """
    directory = os.path.join(workdir, "checkpoints")
    check_trained_workdir(config, workdir)
    if not os.path.lexists(os.path.join(workdir, "config.json")):
        log.warning(
            "%s has no config.json (training writes one): the config given here "
            "cannot be checked against the run's; sampling with another "
            "coupling or path gives wrong results without an error",
            workdir,
        )
    _, _, model, _, optimizer = train.setup(config, mesh)
    template = jax.eval_shape(
        lambda: train.init_state(
            config, model, optimizer, couplings.from_config(config.coupling), mesh
        )
    )
    manager = checkpointing.open_reader(directory)
    restored = checkpointing.restore_latest(manager, template, mesh)
    manager.close()
    if restored is None:
        raise _no_checkpoint(workdir)
    step, state, _ = restored
    return model, state.ema_params if use_ema else state.params, step


# The largest |w| the launchers take; the library's ``fields.guided`` takes any
# finite scale.
MAX_GUIDANCE_SCALE = 100.0


def _guidance(config) -> tuple[float, int] | None:
    """(scale, null label) when classifier-free guidance is asked for."""
    scale = config.sampler.guidance_scale
    if not abs(scale) <= MAX_GUIDANCE_SCALE:  # nan too
        raise ValueError(
            f"sampler.guidance_scale must be a number in [-{MAX_GUIDANCE_SCALE:g}, "
            f"{MAX_GUIDANCE_SCALE:g}], got {scale} (the guided field grows with "
            "|w| and adaptive steps shrink with it: Dopri5 would run until "
            "sampler.max_steps)"
        )
    if scale == 1.0:
        return None
    cc = config.coupling
    if not cc.num_classes or cc.p_uncond <= 0:
        raise ValueError(
            f"sampler.guidance_scale={scale} needs a model trained with labels "
            "dropped (coupling.num_classes > 0 and coupling.p_uncond > 0)"
        )
    return scale, cc.num_classes


def sampling_record(config, info: samplers.SamplerInfo) -> dict:
    """What a sampling run used and did, for its output files.

    The settings the chosen sampler reads (``SamplerSettings.fields_read``:
    no ``num_steps`` for Dopri5, no tolerances for the fixed-step methods),
    the guidance scale, the data split sampled, and the counts of
    the :class:`~stochinterp.samplers.SamplerInfo`: field calls (velocity and
    score together), score calls, and accepted and rejected steps.
    """
    return {
        **_settings_record(config),
        "nfe": int(np.max(info.nfe)),
        "nfe_score": int(np.max(info.nfe_score)),
        "accepted_steps": int(np.max(info.accepted_steps)),
        "rejected_steps": int(np.max(info.rejected_steps)),
    }


def _settings_record(config) -> dict:
    """The sampler, the settings it reads and the split sampled, as output
    files record them."""
    settings = samplers.SamplerSettings.from_config(config.sampler)
    used = settings.fields_read()
    return {
        "sampler": settings.method,
        "sampler_settings": {**used, "guidance_scale": config.sampler.guidance_scale},
        "split": data_lib.sampled_split(config.data),
    }


def _recorded_settings(path: str) -> dict | None:
    """The sampler settings and FID files an earlier output file records.

    JSON files hold its record at the top level, ``.npz`` files as JSON text
    under ``sampling``. An unreadable file gives None: it is replaced anyway.
    """
    try:
        if path.endswith(".npz"):
            with np.load(path) as arrays:
                record = json.loads(str(arrays["sampling"]))
        else:
            with open(path) as f:
                record = json.load(f)
        files = {name: record.get(name) for name in fid_eval.FILE_FIELDS}
        return {**record["sampler_settings"], **files}
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        zipfile.BadZipFile,
    ):
        return None


def warn_if_replacing(path: str, config) -> None:
    """Warns when ``path`` was written with other sampler settings or FID files.

    Output names tell checkpoints, weights, guidance scales, splits, counts,
    seeds and tags apart, but not the sampler's own settings (steps,
    tolerances, noise schedule) nor the FID weights and reference: a run that
    changes only those replaces the earlier file, and the warning names what
    changed and the ``--tag`` that keeps both.
    """
    if jax.process_index() != 0:
        return
    before = _recorded_settings(path)
    if not isinstance(before, dict):
        return
    settings = _settings_record(config)["sampler_settings"]
    after = json.loads(json.dumps({**settings, **fid_eval.files(config)}))
    changed = [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]
    if changed:
        log.warning(
            "replacing %s, written with other settings (%s); pass --tag to keep both",
            path,
            ", ".join(changed),
        )


def sample_test_images(
    config, model, variables, mesh, n: int, seed: int, start: int = 0, key=None
):
    """Runs the configured sampler on n held-out images from image ``start``.

    The coupling's draws and the SDE noise come from ``key``, by default
    ``jax.random.key(seed)``.

    Returns:
      (x1 [n, H, W, C], samples [n, H, W, C], CouplingSample, SamplerInfo,
      seconds spent sampling).
    """
    examples = data_lib.eval_examples(
        config.data, split=config.data.eval_split or None, n=n, start=start
    )
    x1 = np.asarray(examples["image"], np.float32)
    labels = examples["label"] if config.coupling.num_classes else None
    settings = samplers.SamplerSettings.from_config(config.sampler)
    interpolant = interpolants.from_config(**config.interpolant)
    began = time.time()
    samples, sample, info = evaluate.sample_coupling(
        model.apply,
        variables,
        x1,
        labels,
        couplings.from_config(config.coupling),
        interpolant,
        settings,
        jax.random.key(seed) if key is None else key,
        mesh,
        _guidance(config),
    )
    return x1, samples, sample, info, time.time() - began


def prepare_sampling(
    config, workdir: str, mesh, num_images: int | None = None, seed: int | None = None
):
    """The checks and loading that sampling from a trained workdir starts with.

    Checks the workdir's saved config against this one, the sampler and FID
    settings, the workdir's checkpoints and ``samples/`` folder and the
    held-out split's size, all before any work; then reads the FID files and
    the latest checkpoint.

    Args:
      config, workdir, mesh: the run.
      num_images, seed: of the sampling (default ``eval.num_images`` and
        ``eval.seed``, then named so in the messages).

    Returns:
      (fid_eval.FidSetup or None, model, variables, step).
    """
    # A config of another run first (or none given: the default's), which
    # would otherwise be named for its sampler settings.
    with input_errors.checking_input():
        train.check_saved_config(workdir, config)
        validate_sampling(config, mesh, num_images, seed)
        _check_has_checkpoints(workdir)
    check_output_folder(workdir)
    num_images = config.eval.num_images if num_images is None else num_images
    check_held_out_size(config, num_images)
    setup = fid_eval.load(config, mesh, num_images)
    model, variables, step = load_variables(config, workdir, mesh, config.eval.use_ema)
    return setup, model, variables, step


def _sampled_batches(config, model, variables, mesh, n, batch, seed, fold, what):
    """``sample_test_images`` of n held-out images, ``batch`` at a time.

    Batch c (images c * batch onwards) draws with
    ``jax.random.fold_in(jax.random.key(seed), c)`` when ``fold``, else with
    ``jax.random.key(seed)`` (one batch). A last batch of another size
    compiles the sampler once more. Logs progress, naming ``what``, after
    each batch when there are several (the time left from the batches after
    the first, whose time includes compiling, once there are some).
    """
    key = jax.random.key(seed)
    began = time.time()
    first = None  # (time, images) after the first batch, which compiles
    for index, start in enumerate(range(0, n, batch)):
        size = min(batch, n - start)
        draws = jax.random.fold_in(key, index) if fold else key
        yield sample_test_images(
            config, model, variables, mesh, size, seed, start, draws
        )
        if fold:
            now, done = time.time(), start + size
            since, images = first or (began, 0)
            first = first or (now, done)
            log.info(
                "%s: %d of %d images, %.0f s, about %.0f s left",
                what,
                done,
                n,
                now - began,
                (now - since) * (n - done) / max(done - images, 1),
            )


def _add_features(setup, stats: dict, config, x1, samples, sample) -> None:
    """Adds a batch's FID features (samples, baselines and, without
    ``eval.fid_reference``, the ground truth) to the running ``stats``."""
    image_sets = {"sample": samples, **fid_eval.baselines(config, x1, sample)}
    if setup.reference is None:  # the ground truth is the reference
        image_sets["truth"] = x1
    for name, images in image_sets.items():
        stats.setdefault(name, fid.FeatureStatistics()).update(setup.extractor(images))


def _fid_of_batches(setup, stats: dict, n: int) -> dict:
    """``fid_eval.distances`` of the statistics ``_add_features`` pooled over
    the batches of n images, and ``fid_images``."""
    metrics = fid_eval.distances(setup, stats.pop("truth", None), stats)
    metrics["fid_images"] = n
    return metrics


def _counts_of_batches(config, infos: list) -> dict:
    """The sampling record of several batches: the most calls and steps any
    batch made, and with several batches the calls of each."""
    records = [sampling_record(config, info) for info in infos]
    counts = ("nfe", "nfe_score", "accepted_steps", "rejected_steps")
    merged = {**records[0], **{k: max(r[k] for r in records) for k in counts}}
    if len(records) > 1:
        merged["nfe_per_batch"] = [r["nfe"] for r in records]
    return merged


def held_out_fid(
    config,
    model,
    variables,
    mesh,
    setup: fid_eval.FidSetup,
    n: int,
    batch: int,
    seed: int,
) -> tuple[dict, tuple]:
    """FID of n held-out images sampled ``batch`` at a time.

    Only one batch of images is held at once: the features of each batch go
    into running statistics (samples, the baselines of ``fid_eval.baselines`` and,
    without ``eval.fid_reference``, the ground truth). Batch c (images
    c * batch onwards) draws with ``jax.random.fold_in(jax.random.key(seed), c)``,
    so the samples depend on ``batch`` as well as ``seed``. A last batch of
    another size compiles the sampler once more.

    Args:
      config, model, variables, mesh: as for ``sample_test_images``.
      setup: from ``fid_eval.load``.
      n: images in all; ``n`` and ``batch`` multiples of the device count.
      batch: images sampled at a time.
      seed: seed of the draws.

    Returns:
      (metrics, (x1, samples, x0) of the first batch).
    """
    stats: dict[str, fid.FeatureStatistics] = {}
    nfe, first, began = [], None, time.time()
    batches = _sampled_batches(
        config, model, variables, mesh, n, batch, seed, True, "FID"
    )
    for x1, samples, sample, info, _ in batches:
        _add_features(setup, stats, config, x1, samples, sample)
        if first is None:
            first = (x1, samples, np.asarray(sample.x0))
        nfe.append(sampling_record(config, info)["nfe"])
    metrics = _fid_of_batches(setup, stats, n)
    record = sampling_record(config, info)
    metrics.update(
        batch=batch,
        sampler=record["sampler"],
        sampler_settings=record["sampler_settings"],
        split=record["split"],
        nfe_per_batch=nfe,
        seconds=time.time() - began,
    )
    return metrics, first


def sample_held_out(
    config,
    model,
    variables,
    mesh,
    setup: fid_eval.FidSetup | None,
    stem: str,
    n: int,
    batch: int,
    seed: int,
) -> tuple[dict, float]:
    """Samples n held-out images ``batch`` at a time into ``stem``.npz and .png.

    The ``.npz`` (``npz_writer.NpzWriter``) takes each batch's base samples
    ``x0``, ``samples``, ``ground_truth`` and the coupling's ``mask``,
    ``cond`` and ``labels`` where it has them, so one batch of images is held
    at once; its ``sampling`` entry holds the record as JSON text. The file is
    written once the last batch is sampled, before that batch's FID features
    are taken, and rewritten with the FID of ``setup`` (the samples and the
    baselines of ``fid_eval.baselines``) when ``setup`` is given. The picture
    (x0, sample, ground truth of the first batch) is written after the file.
    A run stopped before the file is written leaves neither, and any earlier
    files of those names as they were. Batches draw as in
    ``_sampled_batches``; one batch draws with ``jax.random.key(seed)``.

    Args:
      config, model, variables, mesh: as for ``sample_test_images``.
      setup: from ``fid_eval.load``, or None for no FID.
      stem: the output path without ``.npz`` or ``.png``.
      n: images in all; batch: images at a time (at most n); multiples of
        the device count.
      seed: seed of the draws.

    Returns:
      (record: ``_counts_of_batches``, ``batch`` when there are several,
      and the FID entries; seconds spent sampling).
    """
    writer = npz_writer.NpzWriter(stem + ".npz") if jax.process_index() == 0 else None
    stats, infos, shown, seconds, fid_seconds = {}, [], None, 0.0, 0.0
    batches = _sampled_batches(
        config, model, variables, mesh, n, batch, seed, batch < n, "sampling"
    )
    with writer or contextlib.nullcontext():
        for x1, samples, sample, info, spent in batches:
            infos.append(info)
            seconds += spent
            arrays = _sample_arrays(x1, samples, sample)
            if shown is None:
                shown = [np.clip(arrays["x0"], -1, 1), samples, x1]
            if writer is not None:
                writer.append(**arrays)
            if len(infos) * batch >= n:  # the last batch: the samples are kept first
                record = _counts_of_batches(config, infos)
                if batch < n:
                    record["batch"] = batch
                if writer is not None:
                    writer.close(sampling=np.asarray(json.dumps(record)))
                    evaluate.save_grid(stem + ".png", shown)
            if setup is not None:
                began = time.time()
                _add_features(setup, stats, config, x1, samples, sample)
                fid_seconds += time.time() - began
    if setup is not None:
        began = time.time()
        record.update(_fid_of_batches(setup, stats, n))
        record["fid_seconds"] = fid_seconds + time.time() - began
        if writer is not None:
            npz_writer.replace_arrays(
                stem + ".npz", sampling=np.asarray(json.dumps(record))
            )
    return record, seconds


def _sample_arrays(x1, samples, sample) -> dict[str, np.ndarray]:
    """A batch's arrays as ``launch.sample`` saves them."""
    arrays = {
        "x0": sample.x0,
        "samples": samples,
        "ground_truth": x1,
        "mask": sample.mask,
        "cond": sample.cond,
        "labels": sample.labels,
    }
    return {name: np.asarray(v) for name, v in arrays.items() if v is not None}


@input_errors.checks
def check_inpainting(config) -> None:
    """Raises unless the config is an in-painting one (what evaluation measures)."""
    if not evaluate.is_inpainting(config):
        raise ValueError(
            "in-painting evaluation needs coupling.name='inpainting' (or "
            "'independent' with baseline_condition='inpainting'), got "
            f"coupling.name={config.coupling.name!r}; use launch.sample for "
            "other couplings"
        )


def evaluate_inpainting(
    config,
    model,
    variables,
    workdir: str,
    mesh,
    picture: str = "inpaint.png",
    fid_config: fid_eval.FidSetup | None = None,
) -> dict:
    """Samples the fixed test images, writes samples/<picture>, returns metrics.

    Samples ``eval.batch`` images at a time (0: all ``eval.num_images`` at
    once, drawn with ``jax.random.key(eval.seed)``; with several batches,
    batch c draws with ``fold_in`` of that key and c, as ``held_out_fid``),
    holding one batch of images at once; PSNR and FID are pooled over all.
    Works for the coupled model and for the uncoupled baseline, whose mask is
    its first conditioning channel (it does not hold known pixels fixed, so
    its ``known_pixels_exact`` is normally False).
    """
    check_inpainting(config)
    n = config.eval.num_images
    if fid_config is None:
        fid_config = fid_eval.load(config, mesh, n)
    batch = config.eval.batch or n
    errors, stats, infos, seconds = evaluate.InpaintingErrors(), {}, [], 0.0
    shown, k = None, min(config.eval.grid_images, n)
    seed, several = config.eval.seed, batch < n
    batches = _sampled_batches(
        config, model, variables, mesh, n, batch, seed, several, "evaluation"
    )
    for x1, samples, sample, info, spent in batches:
        seconds += spent
        infos.append(info)
        mask = evaluate.inpainting_mask(sample)
        errors.update(samples, x1, mask)
        if fid_config is not None:
            _add_features(fid_config, stats, config, x1, samples, sample)
        rows = [evaluate.masked_input(x1, mask), samples, x1]
        if shown is not None:
            rows = [np.concatenate(pair) for pair in zip(shown, rows, strict=True)]
        shown = [row[:k] for row in rows]
    metrics = errors.metrics()
    metrics.update(
        _counts_of_batches(config, infos), sampling_seconds=seconds, num_images=n
    )
    if batch < n:
        metrics["batch"] = batch
    if fid_config is not None:
        metrics.update(_fid_of_batches(fid_config, stats, n))
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        path = os.path.join(workdir, "samples", picture)
        evaluate.save_grid(path, shown)
        log.info("wrote %s (rows: masked input, sample, ground truth)", path)
    return metrics


def _read_metrics(path: str) -> dict:
    """The metrics a run wrote; {} with a warning when the file is damaged."""
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, ValueError) as e:
        log.warning("%s cannot be read (%s): no metrics to return", path, e)
        return {}
    return metrics if isinstance(metrics, dict) else {}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, evaluate_after: bool = True
) -> dict:
    """Trains, then (for in-painting) evaluates and writes ``metrics.json``.

    A run that trains no step (the workdir's checkpoint is already at
    ``train.num_steps``) keeps an existing ``metrics.json`` and returns it.
    """
    mesh = sharding.make_mesh()
    sampling_now = evaluate_after and evaluate.is_inpainting(config)
    # A run to resume with another config is named before this config's values.
    if checkpointing.has_steps(os.path.join(workdir, "checkpoints")):
        with input_errors.checking_input():
            train.check_saved_config(workdir, config, resume=True)
    # The sampler fields are saved with the run and used by launch.sample and
    # launch.evaluate later: they are checked even when nothing is sampled now
    # (the number of images against the devices only then).
    validate_sampling(config, mesh if sampling_now else None)
    fid_config = None
    if sampling_now:
        with input_errors.checking_input():
            train.validate_config(config, mesh)
            data_lib.validate(config.data)
        check_held_out_size(config, config.eval.num_images)
        # Read now: a damaged weight file is reported before training.
        fid_config = fid_eval.load(config, mesh, config.eval.num_images)
    start = time.time()
    result = train.train(config, workdir, mesh)
    train_seconds = time.time() - start
    if result.preempted:
        log.info("preempted: checkpoint saved; run the same command again to resume")
        return {}
    metrics_path = os.path.join(workdir, "metrics.json")
    if not result.history["loss"] and os.path.exists(metrics_path):
        log.info("no step trained in this run: %s kept as it was", metrics_path)
        return _read_metrics(metrics_path)

    metrics = {
        "final_loss": result.history["loss"][-1] if result.history["loss"] else None,
        "final_mse": result.history["mse"][-1] if result.history["mse"] else None,
        "steps_this_run": len(result.history["loss"]),
        "first_step": result.first_step,
        "train_seconds": train_seconds,
        "devices": jax.device_count(),
    }
    if result.history["mse"]:
        metrics.update(mse_trend(result.history["mse"]))
    if evaluate_after and evaluate.is_inpainting(config):
        variables = (
            result.state.ema_params if config.eval.use_ema else result.state.params
        )
        model = train.build_model(config, train.image_shape(config)[-1])
        metrics.update(
            evaluate_inpainting(
                config, model, variables, workdir, mesh, fid_config=fid_config
            )
        )
    metrics["wall_seconds"] = time.time() - start
    metrics["config"] = json.loads(config.to_json_best_effort())
    if jax.process_index() == 0:
        workdir_lib.write_json(metrics_path, metrics)
        log.info("metrics: %s", {k: v for k, v in metrics.items() if k != "config"})
    return metrics
