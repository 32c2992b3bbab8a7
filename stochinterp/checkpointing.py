"""Orbax checkpoints of the train state and the data iterator.

A checkpoint holds the whole ``TrainState`` (step, parameters, EMA, optimizer
state, PRNG key) and, when given, the data iterator's state as JSON. Orbax
writes each checkpoint into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import numbers
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from stochinterp import sharding


def make_manager(
    directory: str, keep: int, async_save: bool = True
) -> ocp.CheckpointManager:
    """A manager that keeps the last ``keep`` checkpoints in ``directory``.

    Saving happens when the caller asks (``save_interval_steps=1``); the
    training loop decides when.
    """
    if isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or keep < 1:
        raise ValueError(
            f"train.keep_checkpoints must be an integer >= 1, got {keep!r}"
        )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=1,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
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


def restore(manager: ocp.CheckpointManager, step: int, template, mesh: Mesh):
    """Restores checkpoint ``step`` onto ``mesh``, replicated.

    Args:
      manager: the checkpoint manager.
      step: a step listed by ``manager.all_steps()``.
      template: a state (or ``jax.eval_shape`` of one) with the expected
        structure, shapes and dtypes.
      mesh: the current mesh; the checkpoint may come from another device
        count or another number of processes.

    Returns:
      (state, data_state); data_state is None if none was saved.
    """
    items = {"state": ocp.args.StandardRestore(abstract_like(template, mesh))}
    if os.path.isdir(os.path.join(manager.directory, str(step), "data")):
        items["data"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    data_state = restored["data"] if "data" in restored else None
    return restored["state"], data_state


def restore_latest(manager: ocp.CheckpointManager, template, mesh: Mesh):
    """Restores the latest complete checkpoint onto ``mesh``.

    A checkpoint whose writing was interrupted is never complete, so it is
    skipped (and its temporary folder removed by the manager).

    Returns:
      (step, state, data_state), or None when there is no checkpoint.
    """
    step = manager.latest_step()
    if step is None:
        return None
    state, data_state = restore(manager, step, template, mesh)
    return step, state, data_state
