"""Damaged, incomplete and in-progress checkpoints, and the training log on resume.

Every test writes a tiny train state with the real checkpoint manager, then
damages the files on disk the way a full disk, a kill or a careless copy
would, and checks what a reader and a resuming run make of it.
"""

import gc
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import optax
import pytest

from stochinterp import checkpointing, input_errors, sharding, train
from stochinterp import train_state as ts


@pytest.fixture
def mesh():
    return sharding.make_mesh()


@pytest.fixture
def state(mesh):
    params = {"w": jnp.asarray([1.0, -2.0, 0.5], jnp.float32)}
    fresh = ts.create_train_state(params, optax.adam(1e-3), jax.random.key(0))
    return jax.device_put(fresh, sharding.replicated(mesh))


@pytest.fixture
def folder(tmp_path, state):
    """A checkpoint folder holding steps 33 and 34, each with a data position."""
    path = str(tmp_path / "checkpoints")
    manager = checkpointing.make_manager(path, 5, async_save=False)
    for step in (33, 34):
        checkpointing.save(manager, step, state, {"next_index": step})
    manager.close()
    return path


def snapshot(path: str) -> dict:
    """Every file and folder under ``path`` with its size and change time."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            info = os.stat(full)
            out[os.path.relpath(full, path)] = (info.st_size, info.st_mtime_ns)
    return out


def read_latest(folder: str, state, mesh, need_data: bool = True):
    manager = checkpointing.open_reader(folder)
    try:
        template = jax.eval_shape(lambda: state)
        return checkpointing.restore_latest(manager, template, mesh, need_data)
    finally:
        manager.close()


def truncate(path: str) -> None:
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[: len(content) // 2])


# --------------------------------------------------- a save still in progress


@pytest.mark.parametrize("removals, step", [(1, 33), (2, None)])
def test_a_checkpoint_removed_while_it_is_read_gives_way_to_the_latest(
    folder, state, mesh, monkeypatch, removals, step
):
    """A training run that keeps few checkpoints removes the oldest ones."""
    read = checkpointing._read
    removed = []

    def read_after_removal(manager, step, *args):
        if len(removed) < removals:
            shutil.rmtree(os.path.join(folder, str(step)))
            removed.append(step)
        return read(manager, step, *args)

    monkeypatch.setattr(checkpointing, "_read", read_after_removal)
    restored = read_latest(folder, state, mesh)
    assert removed == [34, 33][:removals]
    if step is None:
        assert restored is None  # nothing left: as in a workdir never trained
    else:
        assert restored[0] == step and restored[2] == {"next_index": step}


def test_a_reader_outrun_by_removals_says_so(folder, state, mesh, monkeypatch):
    read = checkpointing._read
    monkeypatch.setattr(checkpointing, "_READ_ATTEMPTS", 2)

    def read_while_training_goes_on(manager, step, *args):
        # The run removes this one and writes a newer one meanwhile.
        os.rename(os.path.join(folder, str(step)), os.path.join(folder, str(step + 2)))
        return read(manager, step, *args)

    monkeypatch.setattr(checkpointing, "_read", read_while_training_goes_on)
    with pytest.raises(
        checkpointing.UnreadableCheckpointError,
        match=r"removed while it was read, 2 times in a row: .*keep_checkpoints",
    ) as error:
        read_latest(folder, state, mesh)
    assert input_errors.is_input_error(error.value)


def test_readers_leave_an_unfinished_save_and_the_folder_untouched(folder, state, mesh):
    unfinished = os.path.join(folder, "35.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(unfinished, "state"))
    with open(os.path.join(unfinished, "state", "part"), "w") as f:
        f.write("being written by the training run")
    before = snapshot(folder)

    step, _, data = read_latest(folder, state, mesh)
    # A manager opened without remove_unfinished is as harmless to it.
    manager = checkpointing.make_manager(folder, 5, async_save=False)
    assert manager.latest_step() == 34
    manager.close()

    assert (step, data) == (34, {"next_index": 34})
    assert snapshot(folder) == before


def test_a_reader_does_not_create_the_folder(tmp_path):
    manager = checkpointing.open_reader(str(tmp_path / "absent"))
    assert manager.latest_step() is None
    manager.close()
    assert os.listdir(tmp_path) == []


def test_the_writer_removes_unfinished_saves_only_when_asked(folder, state):
    unfinished = os.path.join(folder, "35.orbax-checkpoint-tmp")
    os.makedirs(unfinished)
    manager = checkpointing.make_manager(folder, 5, async_save=False)
    checkpointing.save(manager, 36, state, {"next_index": 36})
    manager.close()
    assert os.path.isdir(unfinished)

    # The removal runs in the background; the first save waits for it.
    manager = checkpointing.make_manager(
        folder, 5, async_save=False, remove_unfinished=True
    )
    checkpointing.save(manager, 37, state, {"next_index": 37})
    manager.close()
    assert not os.path.exists(unfinished)


# ------------------------------------------------------- damaged checkpoints


def remove_data(folder):
    shutil.rmtree(os.path.join(folder, "34", "data"))


def truncate_data(folder):
    truncate(os.path.join(folder, "34", "data", "metadata"))


def truncate_arrays(folder):
    pattern = os.path.join(folder, "34", "state", "**", "d", "*")
    chunks = glob.glob(pattern, recursive=True)
    assert chunks
    for path in chunks:
        truncate(path)


def remove_manifest(folder):
    os.remove(os.path.join(folder, "34", "state", "manifest.ocdbt"))


def add_empty_step(folder):
    os.makedirs(os.path.join(folder, "99"))


@pytest.mark.parametrize(
    "damage, step, reason",
    [
        (remove_data, 34, r"has no data/, the data loader position"),
        (truncate_data, 34, r"JSONDecodeError: "),
        (truncate_arrays, 34, r"ValueError: OUT_OF_RANGE: "),
        (remove_manifest, 34, r"ValueError: NOT_FOUND: "),
        (add_empty_step, 99, r"has no state/ and no data/"),
    ],
)
def test_a_damaged_latest_checkpoint_is_named_with_the_earlier_one_that_reads(
    folder, state, mesh, capfd, damage, step, reason
):
    damage(folder)
    before = snapshot(folder)
    capfd.readouterr()

    with pytest.raises(checkpointing.UnreadableCheckpointError) as raised:
        read_latest(folder, state, mesh)
    gc.collect()

    message = str(raised.value)
    assert message.startswith(f"checkpoint step {step} in {folder} could not be read: ")
    assert reason in message
    fallback = 34 if step == 99 else 33
    assert message.endswith(
        f"Move {os.path.join(folder, str(step))} out of {folder} to start from "
        f"step {fallback}, the latest earlier checkpoint that reads."
    )
    assert "\n" not in message and len(message) < 800
    assert input_errors.is_input_error(raised.value)
    assert snapshot(folder) == before  # nothing moved, deleted or rewritten
    stderr = capfd.readouterr().err
    assert "Event loop is closed" not in stderr
    assert "Future exception was never retrieved" not in stderr


def test_without_an_earlier_checkpoint_that_reads_the_error_says_so(
    folder, state, mesh
):
    for step in ("33", "34"):
        os.remove(os.path.join(folder, step, "state", "manifest.ocdbt"))

    with pytest.raises(checkpointing.UnreadableCheckpointError) as raised:
        read_latest(folder, state, mesh)

    assert str(raised.value).endswith(
        "No earlier checkpoint reads either: if this config differs from the one "
        "that wrote it (e.g. in the optimizer), use that one; if it is damaged, "
        f"move {os.path.join(folder, '34')} out of {folder} to start over from "
        "step 0."
    )


def test_a_config_that_builds_another_state_is_not_blamed_on_the_files(
    folder, state, mesh
):
    params = {"w": jnp.zeros((3,)), "b": jnp.zeros((2,))}
    other = ts.create_train_state(params, optax.adam(1e-3), jax.random.key(0))
    before = snapshot(folder)

    with pytest.raises(checkpointing.UnreadableCheckpointError) as raised:
        read_latest(folder, other, mesh)

    message = str(raised.value)
    assert "No earlier checkpoint reads either: if this config differs" in message
    assert "start from step 33" not in message
    assert snapshot(folder) == before


def test_a_reader_of_weights_alone_may_use_a_checkpoint_without_data(
    folder, state, mesh
):
    remove_data(folder)
    step, _, data = read_latest(folder, state, mesh, need_data=False)
    assert (step, data) == (34, None)


def test_a_reader_of_weights_alone_skips_a_damaged_data_position(folder, state, mesh):
    truncate_data(folder)
    step, restored, data = read_latest(folder, state, mesh, need_data=False)
    assert (step, data) == (34, None)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert jax.numpy.array_equal(a, b)
    with pytest.raises(checkpointing.UnreadableCheckpointError, match="step 34"):
        read_latest(folder, state, mesh, need_data=True)


# ----------------------------------------------------- the log on a resume


def write_log(path, lines):
    with open(path, "w") as f:
        f.writelines(lines)


def record(step):
    return json.dumps({"step": step, "loss": 1.0 / step}) + "\n"


def test_a_resume_drops_the_log_records_of_rolled_back_steps(tmp_path):
    path = tmp_path / "train_log.jsonl"
    note = "not a record\n"
    torn = record(25)[:9]  # a write cut short by a kill
    write_log(path, [record(5), record(10), note, record(15), record(20), torn])

    train._Logger(str(tmp_path), 10, 100, None)

    assert path.read_text() == record(5) + record(10) + note
    assert os.listdir(tmp_path) == ["train_log.jsonl"]  # no temporary file left


def test_a_fresh_start_drops_every_record_and_a_complete_log_is_not_rewritten(
    tmp_path,
):
    path = tmp_path / "train_log.jsonl"
    write_log(path, [record(5), record(10)])
    inode = os.stat(path).st_ino

    train._Logger(str(tmp_path), 10, 100, None)
    assert os.stat(path).st_ino == inode and path.read_text() == record(5) + (
        record(10)
    )

    train._Logger(str(tmp_path), 0, 100, None)
    assert path.read_text() == ""


@pytest.mark.parametrize(
    "dump",
    [
        ' [tensorstore_spec=\'{"driver":"zarr"}\']',
        " See full TensorStore details: <bound method spec of TensorStore({.",
    ],
)
def test_a_read_error_is_named_without_tensorstores_dump(dump):
    error = ValueError(f'NOT_FOUND: Error opening "zarr" driver: no metadata{dump}')
    assert checkpointing._reason(error) == (
        'ValueError: NOT_FOUND: Error opening "zarr" driver: no metadata'
    )
