"""The main job: train, then sample the fixed test images and report.

``train_and_evaluate`` is what ``python -m launch.train`` runs; the same
functions serve ``launch.sample`` and ``launch.evaluate`` on a finished
workdir.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from stochinterp import (
    checkpointing,
    couplings,
    evaluate,
    interpolants,
    samplers,
    sharding,
    train,
)
from stochinterp import data as data_lib

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


def load_variables(config, workdir: str, mesh, use_ema: bool):
    """Restores the latest checkpoint: returns (model, variables, step)."""
    _, _, model, _, optimizer = train.setup(config, mesh)
    template = jax.eval_shape(
        lambda: train.init_state(
            config, model, optimizer, couplings.from_config(config.coupling), mesh
        )
    )
    manager = checkpointing.make_manager(
        os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints, False
    )
    restored = checkpointing.restore_latest(manager, template, mesh)
    manager.close()
    if restored is None:
        raise FileNotFoundError(
            f"no checkpoint in {os.path.join(workdir, 'checkpoints')!r}; train first "
            "with python -m launch.train --workdir " + workdir
        )
    step, state, _ = restored
    return model, state.ema_params if use_ema else state.params, step


def evaluate_inpainting(config, model, variables, workdir: str, mesh) -> dict:
    """Samples the fixed test images, writes samples/inpaint.png, returns metrics."""
    coupling = couplings.from_config(config.coupling)
    if not isinstance(coupling, couplings.InpaintingCoupling):
        raise NotImplementedError(
            f"in-painting evaluation needs coupling.name='inpainting', got "
            f"{config.coupling.name!r}"
        )
    examples = data_lib.eval_examples(
        config.data, split=config.data.eval_split, n=config.eval.num_images
    )
    x1 = np.asarray(examples["image"], np.float32)
    settings = samplers.SamplerSettings.from_config(config.sampler)
    start = time.time()
    interpolant = interpolants.from_config(**config.interpolant)
    samples, sample, info = evaluate.sample_coupling(
        model.apply,
        variables,
        x1,
        None,
        coupling,
        interpolant,
        settings,
        jax.random.key(config.eval.seed),
        mesh,
    )
    mask = sample.mask
    metrics = evaluate.inpainting_metrics(samples, x1, mask)
    metrics.update(
        nfe=int(info.nfe),
        sampling_seconds=time.time() - start,
        num_images=int(x1.shape[0]),
    )

    if jax.process_index() == 0:
        k = min(config.eval.grid_images, x1.shape[0])
        rows = [evaluate.masked_input(x1[:k], mask[:k]), samples[:k], x1[:k]]
        path = os.path.join(workdir, "samples", "inpaint.png")
        evaluate.save_grid(path, rows)
        log.info("wrote %s (rows: masked input, sample, ground truth)", path)
    return metrics


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, evaluate_after: bool = True
) -> dict:
    """Trains, then (for in-painting) evaluates and writes ``metrics.json``."""
    mesh = sharding.make_mesh()
    start = time.time()
    result = train.train(config, workdir, mesh)
    train_seconds = time.time() - start
    if result.preempted:
        log.info("preempted: checkpoint saved; run the same command again to resume")
        return {}

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
    if evaluate_after and config.coupling.name == "inpainting":
        variables = (
            result.state.ema_params if config.eval.use_ema else result.state.params
        )
        model = train.build_model(config, train.image_shape(config)[-1])
        metrics.update(evaluate_inpainting(config, model, variables, workdir, mesh))
    metrics["wall_seconds"] = time.time() - start
    metrics["config"] = json.loads(config.to_json_best_effort())
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        log.info("metrics: %s", {k: v for k, v in metrics.items() if k != "config"})
    return metrics
