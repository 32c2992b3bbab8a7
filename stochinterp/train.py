"""The training loop: a thin client of the library.

Reads like the algorithm: draw a batch, draw the coupling and a time per
example, regress the velocity, update Adam and the EMA; log every k steps,
checkpoint every k steps and at the end.

One code path serves one device, many local devices and many processes
(``jax.distributed``): the step is ``jax.jit`` over a one-axis mesh, the
batch split over it and the state replicated; each process loads its own
part of every global batch. Only process 0 writes logs and the config.

Faults:

* The run resumes from the latest complete checkpoint in the workdir: step,
  parameters, EMA, optimizer state (so the learning-rate schedule goes on),
  PRNG key and the data iterator position. On the same device layout the
  resumed run is bit-identical to an uninterrupted one. Records of
  ``train_log.jsonl`` after the resumed step (training that was rolled back)
  are dropped, so each step is logged once.
* A latest checkpoint that cannot be read (or has no data iterator
  position) stops the run with an error naming it and the latest earlier
  checkpoint that reads; nothing is moved or deleted.
* Once the state is built or restored, SIGTERM or a first Ctrl-C (or the
  ``train.max_seconds`` budget) saves a checkpoint after the current step
  (the first one included, which is compiled first) and returns with
  ``TrainResult.preempted`` (``out_of_time``); during set-up before that, a
  Ctrl-C raises KeyboardInterrupt and no checkpoint is written;
  a second Ctrl-C ends the process at once (the last complete checkpoint
  stays). With several processes they agree to stop at the next log or
  checkpoint step.
* A non-finite loss or gradient freezes the state inside the step; the host
  sees it at the next log or checkpoint step and raises FloatingPointError
  naming the step. No checkpoint with a non-finite value is ever written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from stochinterp import (
    checkpointing,
    couplings,
    input_errors,
    interpolants,
    losses,
    sharding,
)
from stochinterp import data as data_lib
from stochinterp import train_state as ts
from stochinterp import workdir as workdir_lib
from stochinterp.models.unet import UNet

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    """What a training run leaves behind.

    Attributes:
      state: the final train state (replicated on the mesh).
      history: per-step host values, e.g. ``history['mse'][i]`` for step i
        of this run (steps before a resume are not included).
      first_step: the step this run started from (0, or the resumed step).
      preempted: True when SIGTERM or Ctrl-C ended the run (also when it came
        during the last step or the final save).
      out_of_time: True when ``train.max_seconds`` ended the run early.
    """

    state: ts.TrainState
    history: dict
    first_step: int
    preempted: bool = False
    out_of_time: bool = False


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(H, W, C) of the configured dataset."""
    size = config.data.image_size
    return size, size, 1 if config.data.name == "digits" else 3


def check_seed(name: str, seed) -> None:
    """Raises unless ``seed`` lies in [0, 2**32): a random key keeps 32 bits
    of it (without 64-bit mode), so larger seeds would repeat smaller ones."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"{name} must be an integer in [0, 2**32), got {seed!r}")


def validate_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Checks every value the loop reads; raises ValueError before any work.

    Covers the global batch against the devices of ``mesh``, the step and
    checkpoint counts, the EMA, the time budget, the compute dtype, and the
    coupling and the network's downsampling against the image shape. The
    optimizer and the network check their own fields when ``setup`` builds
    them; ``train`` also checks that the dataset can be served
    (``data.validate``) and fills a batch.
    """
    tc = config.train
    check_seed("seed", config.seed)
    sharding.check_global_batch(tc.global_batch, mesh)
    ts.check_micro_batches(tc.micro_batches, tc.global_batch, mesh.devices.size)
    interpolants.check_time_range(tc.t_min, tc.t_max)
    for name in (
        "num_steps",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "loss_time_bins",
    ):
        value = tc[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"train.{name} must be an integer >= 1, got {value!r}")
    if not 0.0 <= tc.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay must lie in [0, 1), got {tc.ema_decay}")
    if not 0 <= tc.max_seconds < float("inf"):
        raise ValueError(
            f"train.max_seconds must be finite and >= 0 (0: no limit), got "
            f"{tc.max_seconds}"
        )
    for name in ("ema_warmup", "async_checkpoint", "denoiser"):
        if not isinstance(tc[name], bool):
            raise ValueError(f"train.{name} must be True or False, got {tc[name]!r}")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(
            f"model.dtype must be 'float32' or 'bfloat16', got {config.model.dtype!r}"
        )
    shape = image_shape(config)
    couplings.from_config(config.coupling).check_image_shape((1, *shape))
    factor = build_model(config, shape[-1]).downsample_factor
    if shape[0] % factor or shape[1] % factor:
        raise ValueError(
            f"data.image_size={config.data.image_size} must be divisible by "
            f"2**(len(model.dim_mults) - 1) = {factor} (model.dim_mults="
            f"{tuple(config.model.dim_mults)})"
        )


# Fields that shape the checkpoint or what it means: a resume or an
# evaluation with other values would restore the wrong thing.
_FIXED_FIELDS = (
    "model",
    "coupling",
    "interpolant",
    "data.name",
    "data.image_size",
    "train.denoiser",
)
# Fields a resume must also keep: the batch size and the shuffle seed fix the
# data order that the saved loader position (a batch index) counts in; with
# others a resumed run would skip or repeat examples. The source folder is
# the dataset's content, and the seed is taken from the checkpoint's key (the
# saved config would record one the run never used).
_RESUME_FIELDS = _FIXED_FIELDS + (
    "data.shuffle_seed",
    "train.global_batch",
    "data.source_dir",
    "seed",
)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def check_saved_config(
    workdir: str, config: ml_collections.ConfigDict, resume: bool = False
) -> None:
    """Refuses a config that differs from the workdir's in fields that matter.

    Compares ``config`` with ``workdir/config.json`` (when there is one) on
    the network, coupling, interpolant, dataset and denoiser fields; for a
    ``resume`` of training also on the global batch and the shuffle seed.

    Raises:
      ValueError: naming every differing field with both values.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    saved = _flatten(_read_saved_config(path))
    now = _flatten(json.loads(config.to_json_best_effort()))
    fields = _RESUME_FIELDS if resume else _FIXED_FIELDS
    fixed = [k for k in set(saved) | set(now) if k.startswith(fields)]
    changed = sorted(k for k in fixed if saved.get(k) != now.get(k))
    if changed:
        diffs = "; ".join(
            f"{k}: {saved.get(k)!r} saved, {now.get(k)!r} now" for k in changed
        )
        raise ValueError(
            f"workdir {workdir!r} holds a run with another config ({diffs}); use "
            f"the config it was trained with (its values are in {path}), or "
            "another --workdir"
        )


def _read_saved_config(path: str) -> dict:
    """The config a workdir was trained with, as the dict ``config.json`` holds."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeError too
        raise ValueError(
            f"cannot read the run's saved config {path!r} ({e}); restore the "
            "file that training wrote, or use another --workdir"
        ) from None
    if not isinstance(saved, dict):
        raise ValueError(
            f"the run's saved config {path!r} holds a JSON {type(saved).__name__}, "
            "expected an object of config fields; restore the file that training "
            "wrote, or use another --workdir"
        )
    return saved


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Creates the workdir layout and saves the resolved config; fails fast.

    Process 0 alone checks and writes ``config.json`` (the others would read
    it while it is being rewritten); the file is replaced atomically.
    """
    workdir_lib.ensure_writable(workdir, ("checkpoints", "samples"))
    if jax.process_index() != 0:
        return
    # Without a checkpoint there is nothing to resume: any config may start.
    if checkpointing.has_steps(os.path.join(workdir, "checkpoints")):
        check_saved_config(workdir, config, resume=True)
    workdir_lib.write_text(
        os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2)
    )


def build_model(config: ml_collections.ConfigDict, image_channels: int) -> UNet:
    """The U-Net of ``config.model``, sized for the coupling and the loss."""
    mc, cc = config.model, config.coupling
    out_channels = image_channels * (2 if config.train.denoiser else 1)
    return UNet(
        dim=mc.dim,
        dim_mults=tuple(mc.dim_mults),
        out_channels=out_channels,
        resnet_block_groups=mc.resnet_block_groups,
        learned_sinusoidal=mc.learned_sinusoidal,
        learned_sinusoidal_dim=mc.learned_sinusoidal_dim,
        attn_heads=mc.attn_heads,
        attn_dim_head=mc.attn_dim_head,
        linear_attention=mc.linear_attention,
        num_classes=cc.num_classes or None,
        class_null=bool(cc.num_classes) and cc.p_uncond > 0,
        class_channel=cc.class_channel,
        dtype=jnp.bfloat16 if mc.dtype == "bfloat16" else jnp.float32,
    )


def setup(config: ml_collections.ConfigDict, mesh):
    """Builds the coupling, path, network, loss and optimizer from the config."""
    coupling = couplings.from_config(config.coupling)
    interpolant = interpolants.from_config(
        config.interpolant.name,
        config.interpolant.gamma,
        config.interpolant.gamma_scale,
    )
    shape = image_shape(config)
    model = build_model(config, image_channels=shape[-1])
    loss_fn = losses.make_loss_fn(
        model.apply,
        interpolant,
        coupling,
        config.train.t_min,
        config.train.t_max,
        denoiser=config.train.denoiser,
    )
    optimizer = ts.make_optimizer(config.optim)
    return coupling, interpolant, model, loss_fn, optimizer


def init_state(config, model, optimizer, coupling, mesh) -> ts.TrainState:
    """Initialises parameters and optimizer state, replicated on the mesh.

    Every process computes the same state from ``config.seed``.
    """
    shape = image_shape(config)

    def init():
        key = jax.random.key(config.seed)
        key_init, key_train, key_couple = jax.random.split(key, 3)
        x1 = jnp.zeros((1, *shape), jnp.float32)
        labels = jnp.zeros((1,), jnp.int32) if config.coupling.num_classes else None
        sample = coupling(key_couple, x1, labels)
        params = model.init(
            key_init, sample.x0, jnp.zeros((1,)), cond=sample.cond, labels=sample.labels
        )
        return ts.create_train_state(params, optimizer, key_train)

    return jax.jit(init, out_shardings=sharding.replicated(mesh))()


def make_step_fn(config: ml_collections.ConfigDict, loss_fn, optimizer, mesh: Mesh):
    """The jitted training step: batch split over ``mesh``, state replicated.

    The gradient is a mean over the global batch: with
    ``train.micro_batches = 1`` XLA partitions the step and inserts the
    all-reduces across devices (and processes); with more, each device
    computes its gradient alone in that many passes and the devices average
    once (``train_state.per_device_gradients``). The input state is donated.
    """
    tc = config.train
    step = ts.make_train_step(
        loss_fn,
        optimizer,
        tc.ema_decay,
        tc.ema_warmup,
        tc.loss_time_bins,
        (tc.t_min, tc.t_max),
        mesh=mesh,
        micro_batches=tc.micro_batches,
    )
    replicated = sharding.replicated(mesh)
    return jax.jit(step, out_shardings=(replicated, replicated), donate_argnums=0)


class _Preemption:
    """Turns SIGTERM and a first Ctrl-C into a flag the loop checks between steps.

    Either signal asks for a checkpoint and a clean stop after the current
    step; a second Ctrl-C ends the process at once, as an unhandled Ctrl-C
    would, leaving the last complete checkpoint. The handlers stay until the
    final checkpoint is written, then the previous ones come back. A Ctrl-C
    the process was started to ignore (a background job) stays ignored.
    """

    def __init__(self):
        self.requested = False
        self._ctrl_c = 0
        self._previous = {}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:
            self._ctrl_c += 1
            if self._ctrl_c > 1:
                # A KeyboardInterrupt raised here can land in a garbage
                # collector callback, where Python ignores it: end the
                # process as an unhandled Ctrl-C does.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)
                return
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        log.warning(
            "%s received: saving a checkpoint after this step and stopping "
            "(Ctrl-C twice to stop at once, without saving)",
            name,
        )
        self.requested = True

    def __enter__(self):
        for number in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(number) is signal.SIG_IGN:
                continue
            try:
                self._previous[number] = signal.signal(number, self._handler)
            except ValueError:  # not in the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}


class _StopRule:
    """Decides, the same way on every process, when to stop early.

    A stop is asked by SIGTERM or by the ``max_seconds`` budget. With one
    process it takes effect after the current step. With several, only one
    may have received the signal and their clocks differ, so they agree by a
    collective at the next log or checkpoint step.
    """

    def __init__(self, preemption: _Preemption, max_seconds: float):
        self.preemption = preemption
        self.deadline = time.time() + max_seconds if max_seconds > 0 else None
        self.out_of_time = False
        self.preempted = False

    def should_stop(self, at_boundary: bool) -> bool:
        late = self.deadline is not None and time.time() > self.deadline
        if jax.process_count() > 1:
            if not at_boundary:
                return False
            preempted = sharding.any_process(self.preemption.requested)
            late = sharding.any_process(late)
        else:
            preempted = self.preemption.requested
        self.preempted, self.out_of_time = preempted, late and not preempted
        return preempted or late


def _raise_if_bad(state: ts.TrainState, manager) -> None:
    bad = int(sharding.to_host(state.bad_step))
    if bad >= 0:
        raise FloatingPointError(
            f"non-finite loss or gradient at step {bad + 1} (the update from "
            f"step {bad}); training stopped. No update was applied from then on "
            f"and no checkpoint after it was written; the latest checkpoint is "
            f"step {manager.latest_step()}. Lower optim.learning_rate or check "
            "the data, then run again to resume from it."
        )


class _Logger:
    """One line per ``every`` steps: step, loss, mse, steps/s, ETA.

    Every process keeps the history; only process 0 logs and writes
    ``train_log.jsonl``. Records after ``first_step`` in an existing log
    describe training that the resume rolled back; they are dropped.
    """

    def __init__(
        self, workdir: str, first_step: int, num_steps: int, deadline: float | None
    ):
        self.num_steps = num_steps
        self.deadline = deadline  # the time budget's end, if any
        self.pending: list = []
        self.history = {"loss": [], "mse": [], "grad_norm": []}
        self.last_time = time.time()
        self.last_step = first_step
        self.path = os.path.join(workdir, "train_log.jsonl")
        if jax.process_index() == 0:
            _drop_records_after(self.path, first_step)

    def add(self, metrics: dict) -> None:
        self.pending.append(metrics)

    def _steps_eta(self, step: int, rate: float) -> float:
        """Seconds for the remaining steps at this rate."""
        return (self.num_steps - step) / max(rate, 1e-9)

    def _eta(self, step: int, rate: float, now: float) -> float:
        """Seconds left: the remaining steps at this rate, or the budget's end."""
        eta = self._steps_eta(step, rate)
        if self.deadline is not None:
            eta = min(eta, max(self.deadline - now, 0.0))
        return eta

    def flush(self, step: int) -> dict | None:
        if not self.pending:
            return None
        host = sharding.to_host(self.pending)
        self.pending = []
        for name in self.history:
            self.history[name].extend(float(m[name]) for m in host)
        sums = np.sum([m["mse_bin_sums"] for m in host], axis=0)
        counts = np.sum([m["mse_bin_counts"] for m in host], axis=0)
        now = time.time()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        record = {
            "step": step,
            "loss": self.history["loss"][-1],
            "mse": float(np.mean(self.history["mse"][-len(host) :])),
            "grad_norm": self.history["grad_norm"][-1],
            "steps_per_s": rate,
            "eta_s": self._eta(step, rate, now),
            "mse_by_time_bin": (sums / np.maximum(counts, 1)).round(4).tolist(),
        }
        if jax.process_index() == 0:
            by_budget = record["eta_s"] < self._steps_eta(step, rate)
            log.info(
                "step %d/%d  loss %.4f  mse %.4f (mean of %d steps)  %.2f steps/s  "
                "ETA %.0fs%s",
                step,
                self.num_steps,
                record["loss"],
                record["mse"],
                len(host),
                rate,
                record["eta_s"],
                " (time budget)" if by_budget else "",
            )
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record


def _drop_records_after(path: str, step: int) -> None:
    """Rewrites the log ``path`` without its records of steps after ``step``.

    A line cut short by a kill (no newline at the end) is dropped too; other
    lines that are not records are kept as they are. The file is replaced
    atomically, so a kill meanwhile leaves the old or the new one.
    """
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.endswith("\n") and not _after(line, step)]
    if kept == lines:
        return
    workdir_lib.write_text(path, "".join(kept))


def _after(line: str, step: int) -> bool:
    """Whether ``line`` is a log record of a step after ``step``."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    logged = record.get("step") if isinstance(record, dict) else None
    return isinstance(logged, int) and logged > step


def _model_inputs(batch: dict, config) -> dict:
    """Keeps the labels only for class-conditional models."""
    if config.coupling.num_classes:
        return batch
    return {"image": batch["image"]}


def _start_state(config, model, optimizer, coupling, manager, loader, mesh):
    """The latest checkpoint (and its data position), or a fresh state.

    Returns:
      (state, step of the state).

    Raises:
      checkpointing.UnreadableCheckpointError: if the latest checkpoint
        cannot be read or has no data position (an input error).
    """
    if manager.latest_step() is None:
        return init_state(config, model, optimizer, coupling, mesh), 0
    template = jax.eval_shape(
        lambda: init_state(config, model, optimizer, coupling, mesh)
    )
    step, state, data_state = checkpointing.restore_latest(
        manager, template, mesh, need_data=True
    )
    loader.set_state(data_state)
    log.info("resumed from the checkpoint at step %d", step)
    if step >= config.train.num_steps:
        log.warning(
            "the checkpoint is at step %d >= train.num_steps=%d: nothing to train; "
            "raise train.num_steps to continue",
            step,
            config.train.num_steps,
        )
    return state, step


@dataclasses.dataclass
class _Loop:
    """What the steps need besides the state: data, step, saving, logging."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    loader: object
    step_fn: object
    manager: object
    logger: _Logger
    stop_rule: _StopRule

    def run(self, state: ts.TrainState, step: int) -> tuple[ts.TrainState, int]:
        """Steps until ``train.num_steps`` or an early stop; returns (state, step)."""
        tc = self.config.train
        if step < tc.num_steps:
            first_log = min(
                _next_multiple(step, tc.log_every),
                _next_multiple(step, tc.checkpoint_every),
                tc.num_steps,
            )
            log.info(
                "compiling the training step; the first progress line comes at step %d",
                first_log,
            )
        while step < tc.num_steps:
            batch = _model_inputs(next(self.loader), self.config)
            state, metrics = self.step_fn(state, sharding.shard_batch(batch, self.mesh))
            step += 1
            self.logger.add(metrics)

            save_now = step % tc.checkpoint_every == 0 or step == tc.num_steps
            boundary = save_now or step % tc.log_every == 0
            if boundary:  # waits for the step: a signal meanwhile stops here
                self._flush(step, state)
            stop = step < tc.num_steps and self.stop_rule.should_stop(boundary)
            if stop and not boundary:
                self._flush(step, state)
            if save_now or stop:
                data_state = self.loader.get_state()
                checkpointing.save(self.manager, step, state, data_state)
            if stop:
                break
        return state, step

    def _flush(self, step: int, state: ts.TrainState) -> None:
        """Logs the pending steps; raises if one of them went non-finite."""
        self.logger.flush(step)
        _raise_if_bad(state, self.manager)


def _next_multiple(step: int, every: int) -> int:
    """The first multiple of ``every`` after ``step``."""
    return (step // every + 1) * every


def train(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None
) -> TrainResult:
    """Trains (or resumes) the configured model in ``workdir``.

    Every process runs this function. The config is checked first (a bad
    value raises before the workdir, the data or the network is touched),
    then training resumes from the latest complete checkpoint if there is
    one. Checkpoints are written every ``train.checkpoint_every`` steps, at
    the end and when stopped early (SIGTERM, Ctrl-C or ``train.max_seconds``).

    Args:
      config: the full config (see ``configs/base.py``).
      workdir: output folder: ``checkpoints/``, ``train_log.jsonl``,
        ``config.json``.
      mesh: the device mesh; default all devices of all processes.

    Raises:
      ValueError: for a config value out of range (before any work).
      PermissionError: if ``workdir`` is not writable (before any work).
      FloatingPointError: when a step gives a non-finite loss or gradient;
        the message names the step. No later checkpoint is written.
    """
    mesh = sharding.make_mesh() if mesh is None else mesh
    with input_errors.checking_input():
        validate_config(config, mesh)
        data_lib.validate(config.data)
        coupling, _, model, loss_fn, optimizer = setup(config, mesh)
        _check_dataset(config)  # builds the dataset if needed
        workdir_lib.ensure_writable(workdir)
    with _workdir_lock(workdir):
        with input_errors.checking_input():
            prepare_workdir(workdir, config)
        return _run(config, workdir, mesh, coupling, model, loss_fn, optimizer)


@contextlib.contextmanager
def _workdir_lock(workdir: str):
    """Holds ``workdir/.lock`` (process 0): a second run on the same workdir fails.

    The lock is an advisory ``flock``; it dies with the process, so a killed
    run leaves nothing to clean up.
    """
    if jax.process_index() != 0:
        yield
        return
    with open(os.path.join(workdir, ".lock"), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            busy = RuntimeError(
                f"another run is training in workdir {workdir!r} (it holds "
                f"{os.path.join(workdir, '.lock')}); wait for it, stop it, or "
                "use another --workdir"
            )
            raise input_errors.mark(busy) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_dataset(config: ml_collections.ConfigDict) -> None:
    """The dataset must fill a global batch and fit the class embedding.

    A class-conditional model has one label row per class of the data.
    """
    info = data_lib.dataset_info(config.data)
    batch, examples = config.train.global_batch, info.split_sizes.get("train", 0)
    if batch > examples:
        raise ValueError(
            f"train.global_batch={batch} is larger than the train split of "
            f"{info.name} ({examples} examples): every batch would repeat examples"
        )
    n = config.coupling.num_classes
    if not n:
        return
    have = info.num_classes
    if n != have:  # more would train rows for classes that never occur
        raise ValueError(
            f"coupling.num_classes={n} but dataset {config.data.name!r} has {have} "
            f"classes; set coupling.num_classes={have}"
        )


def _run(config, workdir, mesh, coupling, model, loss_fn, optimizer) -> TrainResult:
    """The loop proper, once everything is checked and the workdir is held."""
    tc = config.train

    loader = data_lib.make_loader_from_config(
        config.data, split="train", global_batch=tc.global_batch
    )
    # This run holds the workdir lock: no other save can be in progress.
    manager = checkpointing.make_manager(
        os.path.join(workdir, "checkpoints"),
        tc.keep_checkpoints,
        tc.async_checkpoint,
        remove_unfinished=True,
    )
    try:
        # Still set-up: a Ctrl-C here just stops (nothing is written).
        state, first_step = _start_state(
            config, model, optimizer, coupling, manager, loader, mesh
        )
    except BaseException:
        manager.close()
        raise
    # From here SIGTERM and a first Ctrl-C stop cleanly, until the last
    # checkpoint is written.
    with _Preemption() as preemption:
        try:
            stop_rule = _StopRule(preemption, tc.max_seconds)
            logger = _Logger(workdir, first_step, tc.num_steps, stop_rule.deadline)
            loop = _Loop(
                config,
                mesh,
                loader,
                make_step_fn(config, loss_fn, optimizer, mesh),
                manager,
                logger,
                stop_rule,
            )
            state, step = loop.run(state, first_step)
        finally:
            manager.wait_until_finished()
            manager.close()

    # A stop asked during the last step or while the final checkpoint was
    # written still ends the run as stopped (no evaluation follows), on every
    # process alike.
    preempted = sharding.any_process(preemption.requested)
    out_of_time = stop_rule.out_of_time and not preempted
    if out_of_time:
        log.info(
            "time budget train.max_seconds=%s reached at step %d", tc.max_seconds, step
        )
    if preempted:
        log.info(
            "stopped by SIGTERM or Ctrl-C at step %d; the checkpoint is saved", step
        )
    return TrainResult(state, logger.history, first_step, preempted, out_of_time)
