"""Training survives faults: SIGKILL, a kill mid-save, SIGTERM, NaN, new devices.

Every run trains the tiny model of ``_train_worker.tiny_overrides`` in a
subprocess on 2 CPU devices (20 steps, a checkpoint every 5) and is compared
with one uninterrupted reference run. Damaged checkpoints are damaged copies
of the reference run's workdir.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import _train_helpers as helpers
import jax
import numpy as np
import pytest

from stochinterp import pipeline


@pytest.fixture(scope="module")
def root(request):
    return helpers.shared_root(request)


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    """An uninterrupted run of 20 steps: (workdir, arrays of its final state)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    dump = os.path.join(workdir, "final.npz")
    helpers.run_worker(workdir, root, "--dump", dump)
    return workdir, helpers.load_dump(dump)


def assert_bit_identical(arrays: dict, expected: dict) -> None:
    assert sorted(arrays) == sorted(expected)
    different = [k for k in expected if not np.array_equal(arrays[k], expected[k])]
    assert not different, f"{len(different)} leaves differ, e.g. {different[:3]}"


def resume(workdir: str, root: str) -> tuple[dict, dict]:
    """Reruns the worker on ``workdir``; returns (summary, final arrays)."""
    dump, result = (os.path.join(workdir, n) for n in ("final.npz", "result.json"))
    helpers.run_worker(workdir, root, "--dump", dump, "--result", result)
    with open(result) as f:
        return json.load(f), helpers.load_dump(dump)


def logged_steps(workdir: str) -> list[int]:
    with open(os.path.join(workdir, "train_log.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def copy_of(reference, tmp_path) -> str:
    """A copy of the reference run's workdir, to damage."""
    workdir = str(tmp_path / "workdir")
    shutil.copytree(reference[0], workdir)
    return workdir


def test_reference_run_checkpoints_every_5_steps(reference):
    workdir, arrays = reference
    assert helpers.checkpoint_steps(workdir) == ([5, 10, 15, 20], [])
    assert int(arrays[".step"]) == 20
    assert int(arrays[".bad_step"]) == -1
    with open(os.path.join(workdir, "train_log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [5, 10, 15, 20]


def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(
    reference, root, tmp_path
):
    workdir = str(tmp_path)
    helpers.run_worker(workdir, root, "--kill_after_save", "10", expect=-9)
    assert helpers.checkpoint_steps(workdir) == ([5, 10], [])

    summary, arrays = resume(workdir, root)

    assert summary["first_step"] == 10 and summary["step"] == 20
    # Parameters, EMA, Adam moments and count, step, PRNG key: all equal, so
    # the learning-rate schedule, the random draws and the data order resumed.
    assert_bit_identical(arrays, reference[1])


def test_kill_while_a_checkpoint_is_written_resumes_from_the_previous_one(
    reference, root, tmp_path
):
    workdir = str(tmp_path)
    helpers.run_worker(workdir, root, "--kill_during_save", "10", expect=-9)
    steps, unfinished = helpers.checkpoint_steps(workdir)
    assert steps == [5]
    assert unfinished and all(n.startswith("10.") for n in unfinished)

    assert logged_steps(workdir) == [5, 10]

    summary, arrays = resume(workdir, root)

    assert summary["first_step"] == 5 and summary["step"] == 20
    assert_bit_identical(arrays, reference[1])
    assert helpers.checkpoint_steps(workdir) == ([5, 10, 15, 20], [])
    # Step 10 was logged, rolled back and trained again: it is logged once.
    assert logged_steps(workdir) == [5, 10, 15, 20]


def test_checkpoint_saved_on_2_devices_restores_on_1(reference, root, tmp_path):
    workdir, expected = reference
    dump, result = str(tmp_path / "restored.npz"), str(tmp_path / "result.json")
    helpers.run_worker(
        workdir, root, "--restore_only", "--dump", dump, "--result", result, devices=1
    )
    with open(result) as f:
        summary = json.load(f)
    assert summary == {
        "step": 20,
        "first_step": 20,
        "preempted": False,
        "devices": 1,
        "param_devices": 1,
    }
    assert_bit_identical(helpers.load_dump(dump), expected)


def test_nan_stops_the_run_naming_the_step_and_leaves_finite_checkpoints(
    root, tmp_path
):
    workdir = str(tmp_path)
    done = helpers.run_worker(workdir, root, "--nan_at_step", "7", expect=1)
    assert "FloatingPointError: non-finite loss or gradient at step 7" in done.stderr
    # Detected at the step-10 boundary: checkpoint 10 (and later) never written.
    assert helpers.checkpoint_steps(workdir) == ([5], [])
    for step in helpers.checkpoint_steps(workdir)[0]:
        _, arrays = helpers.restore(workdir, root, step)
        floats = {k: v for k, v in arrays.items() if v.dtype.kind == "f"}
        assert floats and all(np.isfinite(v).all() for v in floats.values())
        assert int(arrays[".bad_step"]) == -1


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"]
)
def test_sigterm_or_ctrl_c_saves_exits_0_without_evaluating_and_the_rerun_resumes(
    root, tmp_path, signum
):
    workdir = str(tmp_path)
    env = helpers.env(root, devices=2)
    command = helpers.launcher_command(
        workdir, root, **{"train.num_steps": 100_000, "train.log_every": 1}
    )
    process = subprocess.Popen(
        command, env=env, cwd=helpers.REPO, stderr=subprocess.PIPE, text=True
    )
    helpers.wait_for_log_line(os.path.join(workdir, "train_log.jsonl"), process, 300)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 0, stderr[-4000:]
    with open(os.path.join(workdir, "train_log.jsonl")) as f:
        reached = json.loads(f.readlines()[-1])["step"]
    assert 1 <= reached < 100_000
    assert helpers.checkpoint_steps(workdir)[0][-1] == reached
    assert not os.path.exists(os.path.join(workdir, "metrics.json"))
    assert "preempted" in stderr

    rerun = helpers.launcher_command(
        workdir, root, "--evaluate=false", **{"train.num_steps": reached + 2}
    )
    subprocess.run(rerun, env=env, cwd=helpers.REPO, check=True, capture_output=True)
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["first_step"] == reached
    assert metrics["steps_this_run"] == 2
    assert helpers.checkpoint_steps(workdir)[0][-1] == reached + 2


def test_evaluation_reads_the_ema_weights_by_default(reference, root):
    workdir, arrays = reference
    config = helpers.worker.make_config(os.path.join(root, "data"))
    assert config.eval.use_ema is True
    mesh = pipeline.sharding.make_mesh()
    _, ema, step = pipeline.load_variables(config, workdir, mesh, use_ema=True)
    _, raw, _ = pipeline.load_variables(config, workdir, mesh, use_ema=False)
    assert step == 20

    def flat(tree):
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}

    ema, raw = flat(ema), flat(raw)
    for name, value in ema.items():
        np.testing.assert_array_equal(value, arrays[".ema_params" + name])
        np.testing.assert_array_equal(raw[name], arrays[".params" + name])
    assert any(not np.array_equal(ema[k], raw[k]) for k in ema)


def test_evaluation_leaves_a_checkpoint_being_written_alone(reference, root, tmp_path):
    workdir = copy_of(reference, tmp_path)
    unfinished = os.path.join(workdir, "checkpoints", "25.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(unfinished, "state"))
    with open(os.path.join(unfinished, "state", "part"), "w") as f:
        f.write("being written by the training run")
    before = sorted(os.walk(os.path.join(workdir, "checkpoints")))

    config = helpers.worker.make_config(os.path.join(root, "data"))
    mesh = pipeline.sharding.make_mesh()
    _, _, step = pipeline.load_variables(config, workdir, mesh, use_ema=True)

    assert step == 20
    assert sorted(os.walk(os.path.join(workdir, "checkpoints"))) == before


def test_a_resume_from_a_checkpoint_without_its_data_position_is_refused(
    reference, root, tmp_path
):
    workdir = copy_of(reference, tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "20", "data"))
    command = helpers.launcher_command(
        workdir, root, "--evaluate=false", **{"train.num_steps": 25}
    )
    done = subprocess.run(
        command,
        env=helpers.env(root, devices=2),
        cwd=helpers.REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )

    folder = os.path.join(workdir, "checkpoints")
    assert done.returncode == 1, done.stderr[-4000:]
    assert done.stderr.splitlines()[-1] == (
        f"error: checkpoint step 20 in {folder} could not be read: "
        f"{folder}/20 has no data/, the data loader position (a resume would "
        f"restart the data stream at its first batch). Move {folder}/20 out of "
        f"{folder} to start from step 15, the latest earlier checkpoint that reads."
    )
    assert "Traceback" not in done.stderr
    assert helpers.checkpoint_steps(workdir) == ([5, 10, 15, 20], [])
    assert logged_steps(workdir) == [5, 10, 15, 20]


def test_evaluating_a_damaged_checkpoint_ends_with_one_line_naming_it(
    reference, root, tmp_path
):
    workdir = copy_of(reference, tmp_path)
    folder = os.path.join(workdir, "checkpoints")
    for path in glob.glob(f"{folder}/20/state/**/d/*", recursive=True):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    flags = helpers.worker.launcher_flags(os.path.join(root, "data"))
    done = helpers.run_child(
        [sys.executable, "-m", "launch.evaluate", "--workdir", workdir, *flags],
        root,
        devices=2,
    )

    assert done.returncode == 1, done.stderr[-4000:]
    last = done.stderr.splitlines()[-1]
    assert last.startswith(
        f"error: checkpoint step 20 in {folder} could not be read: ValueError: "
    )
    assert last.endswith(
        f"Move {folder}/20 out of {folder} to start from step 15, the latest "
        "earlier checkpoint that reads."
    )
    assert len(last) < 800
    assert "Traceback" not in done.stderr
    assert "exception was never retrieved" not in done.stderr
    assert helpers.checkpoint_steps(workdir) == ([5, 10, 15, 20], [])
