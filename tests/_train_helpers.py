"""Helpers for the tests that train in subprocesses.

Every run shares one data directory and one persistent XLA compilation cache
under pytest's cache folder (``.pytest_cache/d/stochinterp_train``), so the
photo patches are built once and each distinct program is compiled once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import _train_worker as worker
import numpy as np

REPO = worker.REPO
WORKER = os.path.join(REPO, "tests", "_train_worker.py")
# Compiling at XLA's lowest optimisation level halves the compile time of the
# tiny network; every run of a test uses the same flags, so comparisons hold.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def shared_root(request) -> str:
    """A folder kept between test sessions: built data, compiled programs."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return str(cache.mkdir("stochinterp_train"))
    return str(request.getfixturevalue("tmp_path_factory").mktemp("train_shared"))


def env(root: str, devices: int, **extra: str) -> dict:
    """Environment of a child: ``devices`` CPU devices, the shared caches."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("STOCHINTERP_")}
    out.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=os.path.join(root, "xla_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        STOCHINTERP_DATA_DIR=os.path.join(root, "data"),
        PYTHONPATH=REPO,
    )
    out.update(extra)
    return out


def worker_command(workdir: str, root: str, *args: str, **overrides) -> list[str]:
    """The command line of ``_train_worker.py`` with config ``overrides``."""
    sets = [f"--set={key}={value!r}" for key, value in overrides.items()]
    data_dir = os.path.join(root, "data")
    head = [sys.executable, WORKER, "--workdir", workdir, "--data_dir", data_dir]
    return [*head, *sets, *args]


def run_worker(
    workdir: str,
    root: str,
    *args: str,
    devices: int = 2,
    expect: int = 0,
    **overrides,
) -> subprocess.CompletedProcess:
    """Runs the worker to completion; checks its exit code."""
    done = subprocess.run(
        worker_command(workdir, root, *args, **overrides),
        env=env(root, devices),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != expect:
        raise AssertionError(
            f"worker exited with {done.returncode}, expected {expect}:\n"
            f"{done.stderr[-4000:]}"
        )
    return done


def launcher_command(workdir: str, root: str, *args: str, **overrides) -> list[str]:
    """``python -m launch.train`` on the tiny config with ``overrides``."""
    flags = worker.launcher_flags(os.path.join(root, "data"), overrides)
    return [
        sys.executable,
        "-m",
        "launch.train",
        "--workdir",
        workdir,
        *flags,
        *args,
    ]


def run_child(command: list[str], root: str, devices: int, timeout: float = 600):
    """Runs ``command`` in the repository with ``env(root, devices)``."""
    return subprocess.run(
        command,
        env=env(root, devices=devices),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_log_line(path: str, process: subprocess.Popen, timeout: float) -> dict:
    """The first record of ``train_log.jsonl`` once it appears."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                line = f.readline()
            if line.endswith("\n"):
                return json.loads(line)
        if process.poll() is not None:
            raise AssertionError(f"run ended early: {process.stderr.read()[-4000:]}")
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    raise AssertionError(f"no log line in {path} after {timeout} s")


def load_dump(path: str) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def checkpoint_steps(workdir: str) -> tuple[list[int], list[str]]:
    """(complete checkpoint steps, names of unfinished checkpoint folders)."""
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    steps = sorted(int(n) for n in names if n.isdigit())
    return steps, sorted(n for n in names if not n.isdigit())


def restore(workdir: str, root: str, step: int | None = None, **overrides):
    """Restores checkpoint ``step`` (default latest) of ``workdir`` on this
    process's mesh; returns (step, host arrays keyed like a worker dump)."""
    config = worker.make_config(os.path.join(root, "data"), overrides)
    step, state = worker.restore_checkpoint(config, workdir, step)
    return step, worker.state_arrays(state)


def one_line_error(result) -> str:
    """The last line of a launcher that ended with an input error (exit 1)."""
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    return last
