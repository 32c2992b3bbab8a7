"""Two processes with one CPU device each train like one process with two.

Both runs use ``launch.train`` / ``stochinterp.train.train`` unchanged: the
two processes meet through ``jax.distributed.initialize`` on 127.0.0.1
(process 0 configured by flags, process 1 by ``STOCHINTERP_*`` variables),
each loads its own half of every global batch, and they write one shared
workdir.
"""

import json
import os
import re
import signal
import subprocess

import _inception
import _train_helpers as helpers
import numpy as np
import pytest

STEPS = 5
OVERRIDES = {"train.num_steps": STEPS, "train.log_every": 1}


@pytest.fixture(scope="module")
def root(request):
    return helpers.shared_root(request)


@pytest.fixture(scope="module")
def two_processes(root, tmp_path_factory):
    """Workdir of a 2-process run of 5 steps (one device per process)."""
    workdir = str(tmp_path_factory.mktemp("two_processes"))
    address = f"127.0.0.1:{helpers.free_port()}"
    command = helpers.launcher_command(workdir, root, "--evaluate=false", **OVERRIDES)
    flags = [f"--coordinator_address={address}", "--num_processes=2"]
    first = subprocess.Popen(
        [*command, *flags, "--process_id=0"],
        env=helpers.env(root, devices=1),
        cwd=helpers.REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    second_env = helpers.env(
        root,
        devices=1,
        STOCHINTERP_COORDINATOR=address,
        STOCHINTERP_NUM_PROCESSES="2",
        STOCHINTERP_PROCESS_ID="1",
    )
    second = subprocess.Popen(
        command, env=second_env, cwd=helpers.REPO, stderr=subprocess.PIPE, text=True
    )
    errors = []
    for process in (first, second):
        try:
            _, stderr = process.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            first.kill(), second.kill()
            raise
        errors.append(stderr)
    assert first.returncode == 0, errors[0][-4000:]
    assert second.returncode == 0, errors[1][-4000:]
    return workdir, errors


@pytest.fixture(scope="module")
def one_process(root, tmp_path_factory):
    """Final state arrays of 1 process with 2 devices, same global batch."""
    workdir = str(tmp_path_factory.mktemp("one_process"))
    dump = os.path.join(workdir, "final.npz")
    helpers.run_worker(workdir, root, "--dump", dump, devices=2, **OVERRIDES)
    return helpers.load_dump(dump)


def test_two_processes_end_with_the_parameters_of_one_process(
    two_processes, one_process, root
):
    workdir, _ = two_processes
    step, arrays = helpers.restore(workdir, root)
    assert step == STEPS
    assert sorted(arrays) == sorted(one_process)
    for name, expected in one_process.items():
        np.testing.assert_allclose(
            arrays[name], expected, rtol=1e-5, atol=1e-7, err_msg=name
        )
    # The parameters moved (the EMA lags behind them), so the comparison is
    # not vacuous.
    params = [k for k in arrays if k.startswith(".params")]
    ema = [".ema_params" + k[len(".params") :] for k in params]
    pairs = zip(params, ema, strict=True)
    gaps = [np.abs(arrays[p] - arrays[e]).max() for p, e in pairs]
    assert max(gaps) > 1e-4


def test_only_process_0_writes_logs_and_metrics(two_processes):
    workdir, _ = two_processes
    with open(os.path.join(workdir, "train_log.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(1, STEPS + 1))
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["devices"] == 2
    assert metrics["steps_this_run"] == STEPS
    assert helpers.checkpoint_steps(workdir) == ([STEPS], [])


def test_sigterm_to_one_process_stops_both_at_the_same_checkpoint(root, tmp_path):
    workdir, result = str(tmp_path), str(tmp_path / "result.json")
    address = f"127.0.0.1:{helpers.free_port()}"
    command = helpers.worker_command(
        workdir,
        root,
        "--result",
        result,
        **{"train.num_steps": 100_000, "train.log_every": 1},
    )
    processes = []
    for index in range(2):
        env = helpers.env(
            root,
            devices=1,
            STOCHINTERP_COORDINATOR=address,
            STOCHINTERP_NUM_PROCESSES="2",
            STOCHINTERP_PROCESS_ID=str(index),
        )
        processes.append(
            subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        )
    log = os.path.join(workdir, "train_log.jsonl")
    helpers.wait_for_log_line(log, processes[0], 420)
    processes[1].send_signal(signal.SIGTERM)  # process 0 is not told
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-4000:]

    summaries = []
    for path in (result, result + ".1"):
        with open(path) as f:
            summaries.append(json.load(f))
    reached = summaries[0]["step"]
    assert summaries[1]["step"] == reached
    assert all(s["preempted"] for s in summaries)
    steps, unfinished = helpers.checkpoint_steps(workdir)
    assert steps[-1] == reached and not unfinished
    with open(log) as f:
        assert json.loads(f.readlines()[-1])["step"] == reached


def _sample_command(workdir, root, *args):
    command = helpers.launcher_command(workdir, root, *args, **OVERRIDES)
    command[command.index("launch.train")] = "launch.sample"
    return command


def test_two_processes_sample_the_whole_batch_like_one(two_processes, root, tmp_path):
    """Each process gathers the samples split over both processes' devices.

    In two batches; FID is measured too: its network runs over both
    processes' devices.
    """
    weights = _inception.write_random_weights(str(tmp_path / "inception.npz"))
    workdir, _ = two_processes
    address = f"127.0.0.1:{helpers.free_port()}"
    flags = [
        f"--coordinator_address={address}",
        "--num_processes=2",
        "--tag=two",
        f"--config.eval.fid_weights={weights}",
    ]
    processes = [
        subprocess.Popen(
            [
                *_sample_command(workdir, root, "--num_samples=4", "--batch=2"),
                *flags,
                f"--process_id={i}",
            ],
            # One core each, as one device each: two processes whose BLAS
            # threads share both cores take twice as long over FID's
            # eigendecompositions.
            env=helpers.env(root, devices=1, OPENBLAS_NUM_THREADS="1"),
            cwd=helpers.REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-4000:]
    one = helpers.run_child(
        _sample_command(
            workdir,
            root,
            "--num_samples=4",
            "--batch=2",
            "--tag=one",
            f"--config.eval.fid_weights={weights}",
        ),
        root,
        devices=2,
    )
    assert one.returncode == 0, one.stderr[-4000:]
    logged = re.search(
        r"FID against ground truth: fid_sample \S+, fid_mean_fill", one.stderr
    )
    assert logged, one.stderr[-2000:]
    folder = os.path.join(workdir, "samples")
    two_files = [n for n in os.listdir(folder) if n.endswith("_two.npz")]
    one_files = [n for n in os.listdir(folder) if n.endswith("_one.npz")]
    assert len(two_files) == len(one_files) == 1
    two = np.load(os.path.join(folder, two_files[0]))
    one = np.load(os.path.join(folder, one_files[0]))
    assert two["samples"].shape[0] == 4
    np.testing.assert_array_equal(two["x0"], one["x0"])
    np.testing.assert_allclose(two["samples"], one["samples"], rtol=1e-5, atol=1e-5)
    records = [json.loads(str(f["sampling"])) for f in (two, one)]
    fids = [record["fid_sample"] for record in records]
    assert fids[0] > 0 and records[0]["fid_images"] == 4
    assert "fid_upsampled" not in records[0]  # super-resolution only
    assert records[0]["fid_mean_fill"] > 0  # the in-painting baseline
    assert fids[0] == pytest.approx(fids[1], rel=1e-3)
    assert records[0]["nfe_per_batch"] == records[1]["nfe_per_batch"] == [20, 20]
