"""A training run in its own process, for the fault and multi-process tests.

    python tests/_train_worker.py --workdir DIR --data_dir DATA \
        [--set train.num_steps=20 ...] [--kill_after_save 10] \
        [--kill_during_save 10] [--nan_at_step 7] [--restore_only] \
        [--dump state.npz] [--result result.json]

Trains the tiny in-painting model of ``tiny_overrides`` with
``stochinterp.train.train`` on all devices of all processes (the distributed
runtime starts from ``STOCHINTERP_*`` variables when they are set; set
``XLA_FLAGS`` for the device count). Fault injection, all test-only:

* ``--kill_after_save N``: SIGKILL this process once checkpoint N is
  complete on disk.
* ``--kill_during_save N``: SIGKILL this process while checkpoint N is
  still being written (its temporary folder exists, the final one not yet).
* ``--nan_at_step S``: the S-th batch (1-based) of this run is all NaN.
* ``--restore_only``: restore the latest checkpoint on this process's
  devices instead of training.

Process 0 writes the final (or restored) state to ``--dump`` as an .npz of
every leaf, keyed by its tree path, and a JSON summary to ``--result``
(process i > 0 to ``--result`` + ``.i``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def tiny_overrides(data_dir: str) -> dict:
    """Config fields that shrink ``configs/inpaint_photos16.py`` for tests.

    A U-Net of width 8 with one level (~28k parameters), batch 4 of 16x16
    photo patches: a step takes milliseconds, compiling it a few seconds.
    """
    return {
        "data.data_dir": data_dir,
        "model.dim": 8,
        "model.dim_mults": (1,),
        "model.resnet_block_groups": 4,
        "model.attn_heads": 1,
        "model.attn_dim_head": 8,
        "train.global_batch": 4,
        "train.num_steps": 20,
        "train.log_every": 5,
        "train.checkpoint_every": 5,
        "train.keep_checkpoints": 10,
        "train.ema_decay": 0.9,
    }


def make_config(data_dir: str, overrides: dict | None = None):
    """The tiny config with ``overrides`` (dotted keys) applied on top."""
    from configs import inpaint_photos16

    config = inpaint_photos16.get_config()
    for key, value in {**tiny_overrides(data_dir), **(overrides or {})}.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def launcher_flags(data_dir: str, overrides: dict | None = None) -> list[str]:
    """The same config as ``make_config``, as ``launch.train`` flags."""
    items = {**tiny_overrides(data_dir), **(overrides or {})}
    return [f"--config.{key}={value}" for key, value in items.items()]


def state_arrays(state) -> dict:
    """Every leaf of a train state as host numpy arrays, keyed by tree path."""
    import jax

    from stochinterp import sharding

    state = state.replace(key=jax.random.key_data(state.key))
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return {jax.tree_util.keystr(path): sharding.to_host(leaf) for path, leaf in leaves}


def _checkpoint_folders(workdir: str, step: int) -> tuple[bool, bool]:
    """(a temporary folder of ``step`` exists, its final folder exists)."""
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    temporary = any(n.startswith(f"{step}.") and "tmp" in n for n in names)
    return temporary, str(step) in names


def _patch_save(workdir: str, step: int, finished: bool) -> None:
    """Makes ``checkpointing.save`` kill this process at checkpoint ``step``."""
    from stochinterp import checkpointing

    original = checkpointing.save

    def save(manager, at_step, *args, **kwargs):
        original(manager, at_step, *args, **kwargs)
        if at_step != step:
            return
        if finished:
            manager.wait_until_finished()
        else:
            temporary, final = _checkpoint_folders(workdir, step)
            if final or not temporary:
                sys.exit(f"checkpoint {step} was not being written when checked")
        os.kill(os.getpid(), signal.SIGKILL)

    checkpointing.save = save


class _NanAt:
    """Wraps a loader so that its ``step``-th batch (1-based) is all NaN."""

    def __init__(self, loader, step: int):
        self._loader, self._step, self._count = loader, step, 0

    def __iter__(self):
        return self

    def __next__(self):
        import numpy as np

        batch = dict(next(self._loader))
        self._count += 1
        if self._count == self._step:
            batch["image"] = np.full_like(batch["image"], np.nan)
        return batch

    def get_state(self):
        return self._loader.get_state()

    def set_state(self, state):
        self._loader.set_state(state)


def _patch_nan(step: int) -> None:
    from stochinterp import data as data_lib

    original = data_lib.make_loader_from_config
    data_lib.make_loader_from_config = lambda *a, **k: _NanAt(original(*a, **k), step)


def restore_checkpoint(config, workdir: str, step: int | None = None):
    """(step, state): checkpoint ``step`` (default: the latest) of ``workdir``
    restored onto this process's mesh."""
    import jax

    from stochinterp import checkpointing, couplings, sharding, train

    mesh = sharding.make_mesh()
    _, _, model, _, optimizer = train.setup(config, mesh)
    coupling = couplings.from_config(config.coupling)
    template = jax.eval_shape(
        lambda: train.init_state(config, model, optimizer, coupling, mesh)
    )
    manager = checkpointing.make_manager(
        os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints, False
    )
    try:
        step = manager.latest_step() if step is None else step
        state, _ = checkpointing.restore(manager, step, template, mesh)
    finally:
        manager.close()
    return step, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--kill_after_save", type=int)
    parser.add_argument("--kill_during_save", type=int)
    parser.add_argument("--nan_at_step", type=int)
    parser.add_argument("--restore_only", action="store_true")
    parser.add_argument("--dump")
    parser.add_argument("--result")
    args = parser.parse_args()

    from stochinterp import sharding

    sharding.initialize_distributed()
    import jax
    import numpy as np

    from stochinterp import train

    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = ast.literal_eval(value)
    config = make_config(args.data_dir, overrides)
    if args.kill_after_save is not None:
        _patch_save(args.workdir, args.kill_after_save, finished=True)
    if args.kill_during_save is not None:
        _patch_save(args.workdir, args.kill_during_save, finished=False)
    if args.nan_at_step is not None:
        _patch_nan(args.nan_at_step)

    if args.restore_only:
        step, state = restore_checkpoint(config, args.workdir)
        summary = {"step": step, "first_step": step, "preempted": False}
    else:
        result = train.train(config, args.workdir)
        step = int(sharding.to_host(result.state.step))
        summary = {
            "step": step,
            "first_step": result.first_step,
            "preempted": result.preempted,
        }
        state = result.state
    summary["devices"] = jax.device_count()
    first_param = jax.tree.leaves(state.params)[0]
    summary["param_devices"] = len(first_param.sharding.device_set)
    arrays = state_arrays(state)
    index = jax.process_index()
    if args.dump and index == 0:
        np.savez(args.dump, **arrays)
    if args.result:
        path = args.result if index == 0 else f"{args.result}.{index}"
        with open(path, "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main()
