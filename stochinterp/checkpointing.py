"""Orbax checkpoints of the train state and the data iterator.

A checkpoint holds the whole ``TrainState`` (step, parameters, EMA, optimizer
state, PRNG key) and, when given, the data iterator's state as JSON. Orbax
writes each checkpoint into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os

import jax
import numpy as np
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
    if keep < 1:
        raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=1,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _check_finite(state) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if jax.dtypes.issubdtype(leaf.dtype, np.floating):
            if not bool(jax.numpy.isfinite(leaf).all()):
                raise FloatingPointError(
                    f"refusing to save a checkpoint: {jax.tree_util.keystr(path)} "
                    "holds non-finite values"
                )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state,
    data_state: dict | None = None,
    force: bool = False,
) -> None:
    """Saves ``state`` (and the data iterator state) as checkpoint ``step``.

    Raises:
      FloatingPointError: if any floating leaf of the state is not finite;
        nothing is written then.
    """
    _check_finite(state)
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
        items["data"] = ocp.args.JsonSave(data_state)
    manager.save(step, args=ocp.args.Composite(**items), force=force)


def abstract_like(state, mesh: Mesh):
    """Shape/dtype/sharding targets for restoring ``state`` replicated on ``mesh``."""
    target = sharding.replicated(mesh)

    def spec(leaf):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=target)

    return jax.tree.map(spec, state)


def restore_latest(manager: ocp.CheckpointManager, template, mesh: Mesh):
    """Restores the latest complete checkpoint onto ``mesh``.

    Args:
      manager: the checkpoint manager.
      template: a state (or abstract state) with the expected structure.
      mesh: the current mesh; the checkpoint may come from another device
        count.

    Returns:
      (step, state, data_state) or None when there is no checkpoint.
    """
    step = manager.latest_step()
    if step is None:
        return None
    items = {"state": ocp.args.StandardRestore(abstract_like(template, mesh))}
    if "data" in manager.item_metadata(step):
        items["data"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    data_state = restored["data"] if "data" in restored else None
    return step, restored["state"], data_state
