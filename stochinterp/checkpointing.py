"""Orbax checkpoints of the train state and the data iterator.

A checkpoint holds the whole ``TrainState`` (step, parameters, EMA, optimizer
state, PRNG key) and, when given, the data iterator's state as JSON. Orbax
writes each checkpoint into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous checkpoint as the latest.

One process writes a checkpoint folder (the training run, which holds the
workdir lock); any number may read it meanwhile through :func:`open_reader`,
which creates, cleans up and deletes nothing. A checkpoint that cannot be
read (damaged after it was written, or without a part the caller needs)
raises :class:`UnreadableCheckpointError`, an input error naming the latest
earlier checkpoint that reads; nothing is ever moved or deleted to recover.
"""

from __future__ import annotations

import logging
import numbers
import os
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from stochinterp import input_errors, sharding

# TensorStore appends its whole spec, kilobytes of JSON, to its first line.
_TENSORSTORE_SPEC = " [tensorstore_spec"
# Where a TensorStore error's own text ends and its dump of the store begins.
_TENSORSTORE_DUMPS = (_TENSORSTORE_SPEC, " See full TensorStore details")
_CLOSED_LOOP = "Event loop is closed"
_echoes_dropped = False
_ORBAX_FOLDER = os.path.dirname(ocp.__file__)
_MAX_REASON = 300


class UnreadableCheckpointError(RuntimeError):
    """A listed checkpoint that cannot be restored: damaged or incomplete."""


class _Removed(RuntimeError):
    """A checkpoint removed while it was read (by the run that keeps them)."""


# Reads of the latest checkpoint, each after the one before was removed.
_READ_ATTEMPTS = 5


def make_manager(
    directory: str, keep: int, async_save: bool = True, remove_unfinished: bool = False
) -> ocp.CheckpointManager:
    """A manager that writes checkpoints in ``directory`` and keeps the last ``keep``.

    Saving happens when the caller asks (``save_interval_steps=1``); the
    training loop decides when.

    Args:
      directory: the checkpoint folder; created if missing.
      keep: how many checkpoints to keep; older ones are deleted on save.
      async_save: write in a background thread.
      remove_unfinished: delete, on opening, the temporary folders of saves
        that never completed. Only the run that holds the workdir lock may
        ask for it: the folder of a save in progress looks the same.
    """
    if isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or keep < 1:
        raise ValueError(
            f"train.keep_checkpoints must be an integer >= 1, got {keep!r}"
        )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=1,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=remove_unfinished,
        create=True,
    )
    return _manager(directory, options)


def has_steps(directory: str) -> bool:
    """Whether ``directory`` lists a finished checkpoint (a folder named by its
    step); a save in progress or interrupted is not one."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return False
    return any(n.isdigit() and os.path.isdir(os.path.join(directory, n)) for n in names)


def open_reader(directory: str) -> ocp.CheckpointManager:
    """A manager that only reads the checkpoints in ``directory``.

    It creates, cleans up and deletes nothing, so it may run beside a
    training run that is writing there; that run's unfinished save is not
    listed. ``directory`` must exist.
    """
    # Orbax warns that the folder is read only: that is the point here.
    logging.getLogger("absl").addFilter(_not_the_read_only_notice)
    options = ocp.CheckpointManagerOptions(
        read_only=True,
        save_interval_steps=0,
        max_to_keep=None,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=False,
        create=False,
    )
    return _manager(directory, options)


def _not_the_read_only_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


def _manager(directory: str, options) -> ocp.CheckpointManager:
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_handlers=handlers
    )


@jax.jit
def _finite_leaves(state) -> jax.Array:
    """[num_float_leaves] bool: whether each floating leaf is all finite."""
    flags = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(state)
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    return jnp.stack(flags) if flags else jnp.ones((0,), bool)


def check_finite(state) -> None:
    """Raises FloatingPointError naming the first leaf that is not finite."""
    finite = sharding.to_host(_finite_leaves(state))
    if finite.all():
        return
    paths = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    bad = [p for p, ok in zip(paths, finite, strict=True) if not ok]
    raise FloatingPointError(
        f"refusing to save a checkpoint: {bad[0]} holds non-finite values "
        f"({len(bad)} of {len(paths)} floating leaves are affected)"
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state,
    data_state: dict | None = None,
) -> None:
    """Saves ``state`` (and the data iterator state) as checkpoint ``step``.

    Steps only move forward: ``step`` must be after every step already in the
    directory, so the latest checkpoint is always the newest state.

    Raises:
      ValueError: if ``step`` is not after the latest saved step.
      FloatingPointError: if any floating leaf of the state is not finite.
      RuntimeError: if the manager declined to write.
      Nothing is written in any of these cases.
    """
    latest = manager.latest_step()
    if latest is not None and step <= latest:
        raise ValueError(
            f"checkpoint step {step} is not after the latest saved step {latest} "
            f"in {manager.directory}; steps must increase"
        )
    check_finite(state)
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
        items["data"] = ocp.args.JsonSave(data_state)
    # Saving is the caller's decision: force past the manager's own policy.
    if not manager.save(step, args=ocp.args.Composite(**items), force=True):
        raise RuntimeError(f"the checkpoint manager did not save step {step}")


def abstract_like(state, mesh: Mesh):
    """Shape/dtype/sharding targets for restoring ``state`` replicated on ``mesh``."""
    target = sharding.replicated(mesh)

    def spec(leaf):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=target)

    return jax.tree.map(spec, state)


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    template,
    mesh: Mesh,
    need_data: bool = False,
):
    """Restores checkpoint ``step`` onto ``mesh``, replicated.

    Args:
      manager: the checkpoint manager.
      step: a step listed by ``manager.all_steps()``.
      template: a state (or ``jax.eval_shape`` of one) with the expected
        structure, shapes and dtypes.
      mesh: the current mesh; the checkpoint may come from another device
        count or another number of processes.
      need_data: the data iterator state must be there (to resume training);
        otherwise it is read only when saved.

    Returns:
      (state, data_state); data_state is None if none was saved.

    Raises:
      UnreadableCheckpointError: (an input error) when the checkpoint cannot
        be read, or has no data iterator state and ``need_data``. The message
        names the step, the folder, the reason and the latest earlier step
        that reads, if any.
    """
    _drop_echoes_of_failed_reads()
    try:
        return _read(manager, step, template, mesh, need_data)
    except Exception as e:
        folder = os.path.join(manager.directory, str(step))
        if not os.path.lexists(folder):
            raise _Removed(f"checkpoint {folder} was removed while it was read") from e
        hint = _fallback_hint(manager, step, template, mesh, need_data)
        raise input_errors.mark(
            UnreadableCheckpointError(
                f"checkpoint step {step} in {manager.directory} could not be read: "
                f"{_reason(e)}. {hint}"
            )
        ) from e


def _drop_echoes_of_failed_reads() -> None:
    """Hides, from now on, the reports that follow a failed array read.

    When one array of a checkpoint fails to open, Orbax's event loop ends
    with that error while TensorStore still completes the other reads, some
    after ``restore`` has raised: each completion reports "Event loop is
    closed" through ``sys.unraisablehook``, each Orbax coroutine left
    unfinished reports its own error there, and each failed read left in a
    future is logged by ``asyncio`` ("... exception was never retrieved").
    Each is a traceback or kilobytes of JSON; the error ``restore`` raises
    already names the checkpoint and the first failure. Every other report
    passes.
    """
    global _echoes_dropped
    if _echoes_dropped:
        return
    _echoes_dropped = True
    previous = sys.unraisablehook

    def hook(report):
        if not _is_echo(report):
            previous(report)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_not_an_unretrieved_read)


def _is_echo(report) -> bool:
    error = report.exc_value
    if isinstance(error, RuntimeError) and str(error) == _CLOSED_LOOP:
        return True
    code = getattr(report.object, "cr_code", None)  # an unfinished coroutine
    return code is not None and code.co_filename.startswith(_ORBAX_FOLDER)


def _not_an_unretrieved_read(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    unretrieved = "exception was never retrieved" in str(record.msg)
    return not (unretrieved and any(d in str(error) for d in _TENSORSTORE_DUMPS))


class _MissingItems(Exception):
    """A checkpoint without an item that the caller needs."""


def _read(manager, step: int, template, mesh: Mesh, need_data: bool):
    folder = os.path.join(manager.directory, str(step))
    has_data = os.path.isdir(os.path.join(folder, "data"))
    missing = [] if os.path.isdir(os.path.join(folder, "state")) else ["state/"]
    if need_data and not has_data:
        missing.append("data/, the data loader position")
    if missing:
        reason = f"{folder} has no {' and no '.join(missing)}"
        if not has_data:
            reason += " (a resume would restart the data stream at its first batch)"
        raise _MissingItems(reason)
    state = ocp.args.StandardRestore(abstract_like(template, mesh))
    if has_data:
        both = ocp.args.Composite(state=state, data=ocp.args.JsonRestore())
        try:
            restored = manager.restore(step, args=both)
            return restored["state"], restored["data"]
        except Exception:
            if need_data:
                raise
            # A reader of the weights does not need a damaged loader position.
    restored = manager.restore(step, args=ocp.args.Composite(state=state))
    return restored["state"], None


def _reason(error: Exception) -> str:
    """The first line of ``error``, short enough to read."""
    if isinstance(error, _MissingItems):
        return str(error)
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    for dump in _TENSORSTORE_DUMPS:
        line = line.split(dump)[0]
    line = line.rstrip(" .:")
    if len(line) > _MAX_REASON:
        line = line[: _MAX_REASON - 3] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _fallback_hint(manager, step: int, template, mesh: Mesh, need_data: bool) -> str:
    """What to move aside, and the step that would be used then."""
    folder = os.path.join(manager.directory, str(step))
    earlier = sorted((s for s in manager.all_steps() if s < step), reverse=True)
    for candidate in earlier:
        try:
            _read(manager, candidate, template, mesh, need_data)
        except Exception:
            continue
        return (
            f"Move {folder} out of {manager.directory} to start from step "
            f"{candidate}, the latest earlier checkpoint that reads."
        )
    # Nothing reads: a config that builds another train state fails so too.
    none = "No earlier checkpoint reads either" if earlier else "It is the only one"
    return (
        f"{none}: if this config differs from the one that wrote it (e.g. in "
        "the optimizer), use that one; if it is damaged, move "
        f"{folder} out of {manager.directory} to start over from step 0."
    )


def restore_latest(
    manager: ocp.CheckpointManager, template, mesh: Mesh, need_data: bool = False
):
    """Restores the latest checkpoint onto ``mesh`` (see :func:`restore`).

    A checkpoint whose writing was interrupted, or is still going on, is not
    listed, so it is skipped. A listed one that cannot be read raises
    UnreadableCheckpointError: no earlier one is used in its place unasked.
    One that a training run removes while it is read (it keeps only the
    latest few) is replaced by the then latest one, a few times at most.

    Returns:
      (step, state, data_state), or None when there is no checkpoint.
    """
    for attempt in range(_READ_ATTEMPTS):
        step = manager.latest_step()
        if step is None:
            return None
        try:
            state, data_state = restore(manager, step, template, mesh, need_data)
        except _Removed as e:
            if attempt == _READ_ATTEMPTS - 1:
                raise input_errors.mark(
                    UnreadableCheckpointError(
                        f"{e}, {_READ_ATTEMPTS} times in a row: the run writing "
                        f"{manager.directory} keeps too few checkpoints to read one "
                        "(raise train.keep_checkpoints) or read after it ends"
                    )
                ) from e
            manager.reload()
            continue
        return step, state, data_state
