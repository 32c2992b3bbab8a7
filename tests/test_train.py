"""The training step, EMA, mixed precision, checks at start-up, checkpoints.

In-process tests on toy losses and on the tiny U-Net traced (not compiled);
the runs that train a network are in ``test_faults.py`` and
``test_multiprocess.py``.
"""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import _train_helpers as helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from launch import _common
from stochinterp import checkpointing, losses, sharding, train
from stochinterp import train_state as ts
from stochinterp.input_errors import is_input_error


def tiny_config(tmp_path, **overrides):
    return helpers.worker.make_config(str(tmp_path / "data"), overrides)


@pytest.fixture(scope="module")
def built_data(request):
    """The data folder the training workers share (built once per session)."""
    return os.path.join(helpers.shared_root(request), "data")


def toy_loss(params, key, x1, labels=None):
    """Per-example |w - x1|^2 with a time per example: a loss with terms."""
    per_example = jnp.sum(jnp.square(params["w"] - x1), axis=1)
    t = jax.random.uniform(key, (x1.shape[0],))
    terms = losses.LossTerms(
        velocity=per_example,
        velocity_mse=per_example,
        denoiser=jnp.zeros_like(per_example),
        t=t,
    )
    return jnp.mean(per_example), terms


def toy_state(optimizer, w=(1.0, -2.0, 0.5)):
    params = {"w": jnp.asarray(w, jnp.float32)}
    return ts.create_train_state(params, optimizer, jax.random.key(0))


# ---------------------------------------------------------------- the step


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_its_recursion_with_and_without_warmup(warmup):
    decay = 0.8
    optimizer = optax.sgd(0.1)
    step = jax.jit(ts.make_train_step(toy_loss, optimizer, decay, warmup, 4))
    state = toy_state(optimizer)
    ema = np.asarray(state.ema_params["w"])
    x1 = jnp.asarray([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    for n in range(6):
        state, _ = step(state, {"image": x1})
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        ema = d * ema + (1 - d) * np.asarray(state.params["w"])
        np.testing.assert_allclose(state.ema_params["w"], ema, rtol=1e-6)
    assert int(state.step) == 6
    # With warm-up the first decays are 0.1, 2/11, ...: the EMA tracks early.
    assert float(ts.ema_decay_at(jnp.asarray(0), decay, True)) == pytest.approx(0.1)
    assert float(ts.ema_decay_at(jnp.asarray(10**6), decay, True)) == np.float32(decay)


def test_a_non_finite_loss_freezes_the_state_and_records_the_step():
    optimizer = optax.adam(1e-2)
    step = jax.jit(ts.make_train_step(toy_loss, optimizer, 0.9))
    state = toy_state(optimizer)
    good = {"image": jnp.ones((2, 3))}
    bad = {"image": jnp.full((2, 3), jnp.nan)}
    state, _ = step(state, good)
    state, _ = step(state, good)
    parts = ("params", "ema_params", "opt_state")
    frozen = {name: jax.tree.map(np.asarray, getattr(state, name)) for name in parts}

    state, metrics = step(state, bad)  # the third update
    assert np.isnan(metrics["loss"])
    assert int(state.bad_step) == 2
    state, _ = step(state, good)  # no update once a step went bad

    assert int(state.step) == 2
    assert int(state.bad_step) == 2
    for name in parts:
        now, before = (
            jax.tree.leaves(getattr(state, name)),
            jax.tree.leaves(frozen[name]),
        )
        for a, b in zip(now, before, strict=True):
            np.testing.assert_array_equal(a, b)


def _one_step(micro_batches: int, x1: np.ndarray, mesh):
    optimizer = optax.adam(1e-2)
    step = jax.jit(
        ts.make_train_step(
            toy_loss, optimizer, 0.9, 4, mesh=mesh, micro_batches=micro_batches
        )
    )
    state = jax.device_put(toy_state(optimizer), sharding.replicated(mesh))
    return step(state, sharding.shard_batch({"image": x1}, mesh))


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_micro_batches_give_the_whole_batch_update(micro_batches):
    # toy_loss's gradient does not depend on its random draws: every way of
    # splitting the batch must give the update of the whole batch.
    mesh = sharding.make_mesh()
    x1 = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    whole, whole_metrics = _one_step(1, x1, mesh)
    split, metrics = _one_step(micro_batches, x1, mesh)

    # Closed form of the first Adam step: w - lr * sign(grad), grad = 2 (w - mean x1).
    w = np.asarray([1.0, -2.0, 0.5])
    expected = w - 1e-2 * np.sign(2 * (w - x1.mean(axis=0)))
    np.testing.assert_allclose(whole.params["w"], expected, rtol=1e-6)
    for name in ("params", "ema_params", "opt_state"):
        parts = (jax.tree.leaves(getattr(s, name)) for s in (split, whole))
        for a, b in zip(*parts, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert int(split.step) == 1
    per_example = np.sum(np.square(w - x1), axis=1)
    assert float(metrics["loss"]) == pytest.approx(per_example.mean(), rel=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(
        float(whole_metrics["grad_norm"]), rel=1e-6
    )
    # Every example is counted once in the loss-by-time bins.
    assert float(np.sum(metrics["mse_bin_counts"])) == 16
    assert float(np.sum(metrics["mse_bin_sums"])) == pytest.approx(
        per_example.sum(), rel=1e-5
    )
    for leaf in jax.tree.leaves((split, metrics)):
        assert leaf.sharding.is_fully_replicated


def test_micro_batches_draw_their_own_times_on_each_device():
    mesh = sharding.make_mesh()
    times = []
    grad_fn = jax.jit(
        ts.per_device_gradients(toy_loss, mesh, 2),
        out_shardings=((sharding.replicated(mesh),) * 2, sharding.replicated(mesh)),
    )
    x1 = sharding.shard_batch({"image": np.zeros((8, 3), np.float32)}, mesh)["image"]
    params = {"w": jnp.zeros(3)}
    for _ in range(2):
        (_, terms), _ = grad_fn(params, jax.random.key(3), x1, None)
        times.append(np.asarray(terms.t))
    # 2 devices x 2 passes x 2 examples: 8 times, all different, and the
    # same on a second call.
    assert len(set(times[0].tolist())) == 8
    np.testing.assert_array_equal(times[0], times[1])
    # Pass i on device d draws with fold_in(fold_in(key, d), i).
    key = jax.random.key(3)
    for d in range(2):
        for i in range(2):
            own = jax.random.fold_in(jax.random.fold_in(key, d), i)
            expected = jax.random.uniform(own, (2,))
            start = 4 * d + 2 * i
            np.testing.assert_array_equal(times[0][start : start + 2], expected)


def test_micro_batches_without_a_mesh_are_refused():
    with pytest.raises(ValueError, match="micro_batches=2 needs the mesh"):
        ts.make_train_step(toy_loss, optax.sgd(0.1), 0.9, micro_batches=2)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_a_micro_batch_count_that_is_not_a_positive_integer_is_refused(bad):
    mesh = sharding.make_mesh()
    message = f"micro_batches must be an integer >= 1, got {bad!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        ts.per_device_gradients(toy_loss, mesh, bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        ts.make_train_step(toy_loss, optax.sgd(0.1), 0.9, mesh=mesh, micro_batches=bad)


@pytest.mark.parametrize("micro_batches", [3, 5])
def test_a_device_share_that_does_not_split_into_the_passes_is_refused(micro_batches):
    # 8 examples on 2 devices: 4 each, which 3 and 5 passes do not divide
    # (the examples left over would be dropped from the gradient).
    mesh = sharding.make_mesh()
    grad_fn = jax.jit(ts.per_device_gradients(toy_loss, mesh, micro_batches))
    x1 = sharding.shard_batch({"image": np.zeros((8, 3), np.float32)}, mesh)["image"]
    message = (
        f"each device's part of the batch (4 examples) must split into "
        f"micro_batches={micro_batches} equal passes"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        grad_fn({"w": jnp.zeros(3)}, jax.random.key(0), x1, None)


def test_the_step_keeps_the_state_replicated_and_the_batch_split(tmp_path):
    mesh = sharding.make_mesh()
    config = tiny_config(tmp_path)
    optimizer = optax.sgd(0.1)
    step = train.make_step_fn(config, toy_loss, optimizer, mesh)
    state = jax.device_put(toy_state(optimizer), sharding.replicated(mesh))
    batch = sharding.shard_batch({"image": np.ones((4, 3), np.float32)}, mesh)
    assert batch["image"].sharding.spec == sharding.batch_sharding(mesh).spec
    state, metrics = step(state, batch)
    for leaf in jax.tree.leaves((state, metrics)):
        assert leaf.sharding.is_fully_replicated
        assert len(leaf.sharding.device_set) == 2
    assert sharding.to_host(metrics["loss"]).shape == ()


# ------------------------------------------------------- mixed precision


def _walk(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _walk(inner)


def _conv_dtypes(config):
    """Operand dtypes of every convolution and dense layer in the loss."""
    mesh = sharding.make_mesh()
    coupling, _, model, loss_fn, optimizer = train.setup(config, mesh)
    state = jax.eval_shape(
        lambda: train.init_state(config, model, optimizer, coupling, mesh)
    )
    x1 = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(loss_fn)(state.params, jax.random.key(0), x1).jaxpr
    names = ("conv_general_dilated", "dot_general")
    found = [e for e in _walk(jaxpr) if e.primitive.name in names]
    return {str(v.aval.dtype) for e in found for v in e.invars}, state


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_compute_dtype_applies_while_the_state_stays_float32(tmp_path, dtype):
    config = tiny_config(tmp_path, **{"model.dtype": dtype})
    compute, state = _conv_dtypes(config)
    assert compute == {dtype}

    mesh = sharding.make_mesh()
    _, _, _, loss_fn, optimizer = train.setup(config, mesh)
    step = train.make_step_fn(config, loss_fn, optimizer, mesh)
    batch = {"image": jax.ShapeDtypeStruct((4, 16, 16, 3), jnp.float32)}
    after, metrics = jax.eval_shape(step, state, batch)
    for tree in (state, after):
        for part in (tree.params, tree.ema_params, tree.opt_state):
            dtypes = {x.dtype for x in jax.tree.leaves(part)}
            assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
            assert jnp.dtype(jnp.float32) in dtypes
    assert metrics["loss"].dtype == jnp.float32


# ---------------------------------------------------------------- start-up


class _MustNotRun(Exception):
    pass


def _forbid(*_, **__):
    raise _MustNotRun("work started before the configuration was checked")


def test_global_batch_7_on_2_devices_is_refused_before_any_work(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, **{"train.global_batch": 7})
    for name in ("make_loader_from_config", "builder", "validate"):
        monkeypatch.setattr(train.data_lib, name, _forbid)
    monkeypatch.setattr(train, "init_state", _forbid)
    monkeypatch.setattr(train, "setup", _forbid)
    workdir = tmp_path / "wd"
    with pytest.raises(ValueError, match=r"global batch size 7 .*devices \(2\)"):
        train.train(config, str(workdir), sharding.make_mesh())
    assert not workdir.exists()


def test_the_launcher_refuses_batch_7_on_2_devices_without_building_data(
    tmp_path, request
):
    root = helpers.shared_root(request)
    data_dir, workdir = tmp_path / "data", tmp_path / "wd"
    data_dir.mkdir()
    command = helpers.launcher_command(
        str(workdir), root, **{"train.global_batch": 7, "data.data_dir": data_dir}
    )
    done = subprocess.run(
        [*command, "--cpu_devices=2"],
        env=helpers.env(root, devices=2),
        cwd=helpers.REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "global batch size 7" in done.stderr
    assert "number of devices (2)" in done.stderr
    assert os.listdir(data_dir) == []
    assert not (workdir / "checkpoints").exists()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.num_steps", 0, "train.num_steps must be an integer >= 1, got 0"),
        ("train.checkpoint_every", 0, "train.checkpoint_every"),
        ("train.keep_checkpoints", 0, "train.keep_checkpoints"),
        ("train.log_every", -3, "train.log_every must be an integer >= 1, got -3"),
        ("train.ema_decay", 1.0, r"train.ema_decay must lie in \[0, 1\), got 1.0"),
        ("train.max_seconds", -1.0, "train.max_seconds must be finite and >= 0"),
        ("train.max_seconds", float("nan"), "train.max_seconds .* got nan"),
        ("train.t_max", 1.5, "t_max"),
        ("model.dtype", "float16", "model.dtype must be 'float32' or 'bfloat16'"),
        ("optim.learning_rate", 0.0, "optim.learning_rate must be finite and > 0"),
        ("optim.learning_rate", float("nan"), "optim.learning_rate .* got nan"),
        ("optim.grad_clip", -1.0, r"optim.grad_clip .* > 0, got -1.0"),
        ("optim.grad_clip", 0.0, r"optim.grad_clip .* > 0, got 0.0"),
        ("optim.b1", 1.5, r"optim.b1 must lie in \[0, 1\), got 1.5"),
        ("optim.b2", 1.0, r"optim.b2 must lie in \[0, 1\), got 1.0"),
        ("model.attn_heads", 0, "attn_heads must be a positive integer, got 0"),
        ("data.shuffle_seed", 2**64, r"shuffle_seed=.* \[0, 2\*\*32\)"),
        ("data.eval_split", "bogus", "data.eval_split='bogus' is not a split"),
        ("optim.decay_rate", 1.5, "optim.decay_rate must lie in"),
        ("data.name", "cifar", "data.name='cifar' is unknown"),
        ("train.micro_batches", 0, "train.micro_batches must be an integer >= 1"),
        ("train.micro_batches", True, "train.micro_batches .* got True"),
        # The tiny config's batch of 4 on 2 devices: 2 per device.
        ("train.micro_batches", 4, r"global_batch=4 .* devices \(2\) times .* \(4\)"),
    ],
)
def test_out_of_range_values_are_refused_before_the_workdir_is_made(
    tmp_path, monkeypatch, key, value, message
):
    config = tiny_config(tmp_path, **{key: value})
    monkeypatch.setattr(train.data_lib, "make_loader_from_config", _forbid)
    monkeypatch.setattr(train, "init_state", _forbid)
    workdir = tmp_path / "wd"
    with pytest.raises(ValueError, match=message):
        train.train(config, str(workdir), sharding.make_mesh())
    assert not workdir.exists()


def test_a_dangling_link_or_an_overlong_path_is_named_before_anything_is_made(
    tmp_path,
):
    link = tmp_path / "wd"
    link.symlink_to(tmp_path / "gone")
    for must_exist in (False, True):
        with pytest.raises(SystemExit, match="symbolic link to .*gone', which does"):
            _common.check_workdir(str(link), must_exist=must_exist)
    for path in (tmp_path / ("y" * 256), tmp_path.joinpath(*["y" * 200] * 25)):
        with pytest.raises(SystemExit, match="longer than the system allows"):
            _common.check_workdir(str(path), must_exist=False)
    assert sorted(os.listdir(tmp_path)) == ["wd"]


def test_an_unwritable_workdir_is_refused_before_data_or_model(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    workdir = str(blocker / "wd")
    monkeypatch.setattr(train.data_lib, "make_loader_from_config", _forbid)
    monkeypatch.setattr(train, "init_state", _forbid)
    with pytest.raises(PermissionError, match="not writable"):
        train.train(tiny_config(tmp_path), workdir, sharding.make_mesh())
    with pytest.raises(SystemExit, match="cannot be created"):
        _common.check_workdir(workdir, must_exist=False)
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        _common.check_workdir(str(blocker), must_exist=False)
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        train.train(tiny_config(tmp_path), str(blocker), sharding.make_mesh())
    missing = tmp_path / "missing" / "wd"
    with pytest.raises(SystemExit, match="does not exist; train into it first"):
        _common.check_workdir(str(missing), must_exist=True)
    assert _common.check_workdir(str(missing), must_exist=False) == str(missing)
    assert not (tmp_path / "missing").exists()  # checking creates nothing


def _start_output(args, xla_flags=None, cores=None, splits=None):
    """What ``set_cpu_devices`` returns, then XLA_FLAGS, in a fresh process."""
    pretend = f"os.cpu_count = lambda: {cores}; " if cores else ""
    code = (
        f"import os, sys; from launch import _common; {pretend}"
        f"_common.FLAGS(sys.argv); print(_common.set_cpu_devices({splits!r})); "
        "print(os.environ['XLA_FLAGS'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.pop("STOCHINTERP_NUM_PROCESSES", None)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=helpers.REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()


def test_launcher_cpu_devices_default_to_one_per_core_and_the_flag_wins():
    count = "--xla_force_host_platform_device_count"
    assert _start_output([]) == ["None", f"{count}={os.cpu_count()}"]
    assert _start_output([], f"{count}=5") == ["None", f"{count}=5"]
    assert _start_output(["--cpu_devices=3"], f"--foo {count}=5") == [
        "None",
        f"--foo {count}=3",
    ]


def test_launcher_cpu_devices_default_to_the_most_that_split_the_batches():
    count = "--xla_force_host_platform_device_count"
    splits = {"train.global_batch": 64, "n": 48}
    assert _start_output([], cores=6, splits=splits) == [
        "CPU devices: 4 for 6 cores, the most that split train.global_batch=64, "
        "n=48 evenly (--cpu_devices sets the count)",
        f"{count}=4",
    ]
    # Two processes: their 2 x 4 devices split both counts.
    assert _start_output(["--num_processes=2"], cores=6, splits=splits)[1] == (
        f"{count}=4"
    )
    assert _start_output(["--num_processes=3"], cores=6, splits=splits)[1] == (
        f"{count}=6"
    )
    assert _start_output(["--cpu_devices=6"], cores=6, splits=splits) == [
        "None",
        f"{count}=6",
    ]


@pytest.mark.parametrize(
    "cores,splits,expected",
    [
        (6, {"a": 64}, 4),
        (6, {"a": 60, "b": 90}, 6),
        (8, {"a": 63}, 7),
        (2, {"a": 63}, 1),
        (4, {"a": "64", "b": True, "c": 0, "d": None}, 4),  # left to the checks
        (3, {}, 3),
    ],
)
def test_default_cpu_devices_counts(monkeypatch, cores, splits, expected):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert _common.default_cpu_devices(splits) == expected
    # No count splits 64 over 3 processes: one per core, left to the checks.
    assert _common.default_cpu_devices({"a": 64}, processes=3) == cores


def test_default_cpu_devices_split_over_all_processes(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert _common.default_cpu_devices({"a": 64}, processes=2) == 4  # 8 devices
    assert _common.default_cpu_devices({"a": 48}, processes=2) == 6  # 12 devices
    assert _common.default_cpu_devices({"a": 40}, processes=4) == 5  # 20 devices


def test_distributed_start_needs_a_coordinator_and_a_valid_id(monkeypatch):
    monkeypatch.setenv("STOCHINTERP_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="coordinator address"):
        sharding.initialize_distributed()
    with pytest.raises(ValueError, match=r"process_id=2 must lie in \[0, 1\]"):
        sharding.initialize_distributed("127.0.0.1:1", 2, 2)
    monkeypatch.setenv("STOCHINTERP_NUM_PROCESSES", "1")
    assert sharding.initialize_distributed() is False
    for address in ("localhost:80", "10.0.0.1:65535", "[::1]:1234", "my-host.x:1"):
        assert sharding.distributed_settings(address, 2, 1) == (address, 2, 1)
    for args, message in [
        ((None, 0, None), r"num_processes must be an integer in \[1, 2\*\*31\), got 0"),
        (("127.0.0.1:1", 2**70, 0), "num_processes must be an integer in"),
        (("127.0.0.1:99999", 2, 0), "coordinator address '127.0.0.1:99999' must be"),
        (("127.0.0.1:", 2, 0), "coordinator address '127.0.0.1:' must be host:port"),
        (("garbage", 2, 0), "coordinator address 'garbage' must be host:port"),
        ((" 127.0.0.1:80", 2, 0), "coordinator address ' 127.0.0.1:80' must be"),
        (("::1:80", 2, 0), "coordinator address '::1:80' must be host:port"),
        (("http://h:80", 2, 0), "coordinator address 'http://h:80' must be"),
        (("127.0.0.1:\u0663\u0663", 2, 0), "coordinator address '127.0.0.1:"),
        ((":80", 2, 0), "coordinator address ':80' must be host:port"),
        ((None, 1, 3), r"process_id=3 must lie in \[0, 0\] for num_processes=1"),
        ((None, 2, -1), r"process_id=-1 must lie in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message) as raised:
            sharding.initialize_distributed(*args)
        assert is_input_error(raised.value)
    monkeypatch.setenv("STOCHINTERP_NUM_PROCESSES", "two")
    with pytest.raises(
        ValueError, match="STOCHINTERP_NUM_PROCESSES must be an integer, got 'two'"
    ):
        sharding.initialize_distributed()


# ------------------------------------------------------------- checkpoints


def test_a_state_with_a_nan_is_never_saved(tmp_path):
    optimizer = optax.adam(1e-3)
    state = toy_state(optimizer)
    state = state.replace(ema_params={"w": jnp.asarray([0.0, jnp.nan, 1.0])})
    manager = checkpointing.make_manager(str(tmp_path / "ckpt"), 3, async_save=True)
    with pytest.raises(FloatingPointError, match=r"\.ema_params\['w'\]"):
        checkpointing.save(manager, 1, state, {"next_index": 1})
    manager.wait_until_finished()
    assert manager.all_steps() == []
    assert os.listdir(tmp_path / "ckpt") == []
    manager.close()


def test_a_step_not_after_the_latest_is_refused(tmp_path):
    optimizer = optax.adam(1e-3)
    state = toy_state(optimizer)
    manager = checkpointing.make_manager(str(tmp_path / "ckpt"), 3, async_save=True)
    checkpointing.save(manager, 5, state, {"next_index": 5})
    for step in (5, 3):
        with pytest.raises(ValueError, match=f"step {step} is not after .* step 5"):
            checkpointing.save(manager, step, state, {"next_index": step})
    manager.wait_until_finished()
    assert manager.all_steps() == [5]
    manager.close()


def test_a_resume_with_another_batch_or_data_order_is_refused(tmp_path):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    config = tiny_config(tmp_path)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    changes = {
        "train.global_batch": 16,
        "data.shuffle_seed": 5,
        "data.source_dir": "/elsewhere",
        "seed": 7,
    }
    other = tiny_config(tmp_path, **changes)
    with pytest.raises(
        ValueError,
        match=r"data.shuffle_seed: 0 saved, 5 now; data.source_dir: '' saved, "
        r"'/elsewhere' now; seed: 0 saved, 7 now; train.global_batch: \d+ saved, 16",
    ):
        train.check_saved_config(str(workdir), other, resume=True)
    train.check_saved_config(str(workdir), other)  # sampling reads the same weights


def test_a_workdir_without_a_checkpoint_takes_any_config(tmp_path, monkeypatch):
    """What a Ctrl-C before the first checkpoint leaves: config.json, empty folders."""
    workdir = tmp_path / "wd"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(tiny_config(tmp_path).to_json_best_effort())
    other = tiny_config(tmp_path, **{"model.dim": 16, "train.global_batch": 16})
    train.prepare_workdir(str(workdir), other)
    assert json.loads((workdir / "config.json").read_text())["model"]["dim"] == 16
    (workdir / "checkpoints" / "3").mkdir()  # a finished save of step 3
    with pytest.raises(ValueError, match=r"model.dim: 16 saved, 8 now"):
        train.prepare_workdir(str(workdir), tiny_config(tmp_path))


def test_state_and_data_position_round_trip(tmp_path):
    mesh = sharding.make_mesh()
    optimizer = optax.adam(1e-3)
    state = jax.device_put(toy_state(optimizer), sharding.replicated(mesh))
    state = state.replace(step=jnp.asarray(7, jnp.int32))
    manager = checkpointing.make_manager(str(tmp_path / "ckpt"), 2, async_save=True)
    for step in (3, 5, 7):
        checkpointing.save(manager, step, state, {"next_index": step})
    manager.wait_until_finished()
    assert manager.all_steps() == [5, 7]  # keeps the last 2

    template = jax.eval_shape(lambda: state)
    step, restored, data = checkpointing.restore_latest(manager, template, mesh)
    manager.close()
    assert (step, data) == (7, {"next_index": 7})
    assert jax.random.key_data(restored.key).tolist() == (
        jax.random.key_data(state.key).tolist()
    )
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        if jnp.issubdtype(a.dtype, jnp.number):
            np.testing.assert_array_equal(a, b)
    assert restored.params["w"].sharding.is_fully_replicated


# ----------------------------------------------------------------- logging


def test_logger_writes_one_line_per_flush_with_rate_and_eta(tmp_path, caplog):
    logger = train._Logger(str(tmp_path), first_step=10, num_steps=20, deadline=None)
    for loss in (3.0, 1.0):
        logger.add(
            {
                "loss": np.float32(loss),
                "mse": np.float32(2 * loss),
                "grad_norm": np.float32(1.0),
                "mse_bin_sums": np.asarray([loss, 0.0]),
                "mse_bin_counts": np.asarray([1, 0]),
            }
        )
    with caplog.at_level(logging.INFO, logger="stochinterp.train"):
        record = logger.flush(12)
    assert record["step"] == 12
    assert record["loss"] == 1.0
    assert record["mse"] == 4.0  # mean over the two steps
    assert record["mse_by_time_bin"] == [2.0, 0.0]
    assert record["eta_s"] == pytest.approx(8 / record["steps_per_s"])
    assert logger.history["loss"] == [3.0, 1.0]
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("step 12/20  loss 1.0000  mse 4.0000 (mean of 2 steps)")
    assert "steps/s" in line and "ETA" in line and "time budget" not in line
    with open(tmp_path / "train_log.jsonl") as f:
        assert [json.loads(x)["step"] for x in f] == [12]
    assert logger.flush(13) is None  # nothing pending: nothing written


def test_eta_ends_at_the_time_budget_when_that_comes_first(tmp_path):
    logger = train._Logger(str(tmp_path), first_step=0, num_steps=1000, deadline=150.0)
    assert logger._eta(step=100, rate=2.0, now=100.0) == 50.0  # budget: 50 s left
    assert logger._eta(step=990, rate=2.0, now=100.0) == 5.0  # steps: 10 at 2/s
    assert logger._eta(step=100, rate=2.0, now=200.0) == 0.0  # budget spent


def test_log_line_says_when_the_time_budget_sets_the_eta(tmp_path, caplog):
    deadline = time.time() + 30.0
    logger = train._Logger(str(tmp_path), 0, num_steps=10**9, deadline=deadline)
    logger.add(
        {
            "loss": np.float32(1.0),
            "mse": np.float32(2.0),
            "grad_norm": np.float32(1.0),
            "mse_bin_sums": np.asarray([2.0]),
            "mse_bin_counts": np.asarray([1]),
        }
    )
    with caplog.at_level(logging.INFO, logger="stochinterp.train"):
        record = logger.flush(1)
    assert 0 < record["eta_s"] <= 30.0
    [line] = [r.getMessage() for r in caplog.records]
    assert line.endswith(f"ETA {record['eta_s']:.0f}s (time budget)")


# ------------------------------------------------------------- early stops


def test_sigterm_sets_the_flag_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with train._Preemption() as preemption:
        assert not train._StopRule(preemption, 0.0).should_stop(True)
        os.kill(os.getpid(), signal.SIGTERM)
        rule = train._StopRule(preemption, 0.0)
        assert rule.should_stop(False)
        assert rule.preempted and not rule.out_of_time
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_first_ctrl_c_sets_the_flag_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGINT)
    with train._Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
        rule = train._StopRule(preemption, 0.0)
        assert rule.should_stop(False)
        assert rule.preempted and not rule.out_of_time
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_ctrl_c_ends_the_process_at_once():
    """Only the second Ctrl-C: a SIGTERM before the first one does not count."""
    script = (
        "import os, signal, time\n"
        "from stochinterp import train\n"
        "with train._Preemption() as p:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    print('flag', p.requested, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "print('not reached')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -signal.SIGINT, done.stderr
    assert done.stdout == "flag True\n"
    for name in ("SIGTERM", "Ctrl-C"):
        assert f"{name} received: saving a checkpoint after this step" in done.stderr


def test_an_ignored_ctrl_c_stays_ignored():
    """A background job started with SIGINT ignored is not stopped by it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with train._Preemption() as preemption:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert not preemption.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_while_the_state_is_built_just_stops(
    tmp_path, monkeypatch, built_data
):
    build = train.init_state

    def interrupted(*args, **kwargs):
        state = build(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return state

    monkeypatch.setattr(train, "init_state", interrupted)
    monkeypatch.setattr(train, "make_step_fn", _forbid)
    before = signal.getsignal(signal.SIGINT)
    workdir = tmp_path / "wd"
    config = helpers.worker.make_config(built_data)
    with pytest.raises(KeyboardInterrupt):
        train.train(config, str(workdir), sharding.make_mesh())
    assert os.listdir(workdir / "checkpoints") == []
    assert signal.getsignal(signal.SIGINT) is before


def test_the_time_budget_stops_after_it_is_spent():
    rule = train._StopRule(train._Preemption(), max_seconds=0.05)
    assert not rule.should_stop(True)
    time.sleep(0.1)
    assert rule.should_stop(False)
    assert rule.out_of_time and not rule.preempted


def test_seeds_are_the_32_bits_a_random_key_keeps():
    train.check_seed("seed", 2**32 - 1)
    for bad in (2**32, -1, 1.0, True):
        with pytest.raises(
            ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"
        ):
            train.check_seed("seed", bad)
    # Why: without 64-bit mode a key keeps the low 32 bits of its seed.
    assert np.array_equal(
        jax.random.key_data(jax.random.key(2**32)),
        jax.random.key_data(jax.random.key(0)),
    )


def _optim_config(**changes):
    from configs import base

    config = base.get_config().optim
    config.update(changes)
    return config


def test_learning_rate_decays_in_stairs():
    # A constant gradient makes every Adam step -lr(step) (up to eps).
    optimizer = ts.make_optimizer(_optim_config())  # 2e-4, x 0.99 per 1000 steps
    params = jnp.zeros(1)

    def step(state, _):
        updates, state = optimizer.update(jnp.ones(1), state, params)
        return state, updates[0]

    _, updates = jax.lax.scan(step, optimizer.init(params), length=2001)
    np.testing.assert_allclose(
        updates[np.array([0, 999, 1000, 1500, 1999, 2000])],
        -2e-4 * np.array([1, 1, 0.99, 0.99, 0.99, 0.99**2]),
        rtol=2e-5,  # float32 bias correction; a smooth decay is off by 5e-3
    )


def test_gradients_are_clipped_to_the_global_norm_before_adam():
    # b1 = 0: Adam's step is -lr g_t / sqrt(v_t / (1 - b2^t)). A first gradient
    # of 1e6 clipped to 1e4, then 1e4: v_2 / (1 - b2^2) = 1e8 and the second
    # step is -lr exactly (without clipping it would be -0.0173 lr).
    optimizer = ts.make_optimizer(_optim_config(b1=0.0, b2=0.5, grad_clip=1e4))
    params = jnp.zeros(2)
    state = optimizer.init(params)
    steps = []
    for g in (jnp.array([6e5, 8e5]), jnp.array([6e3, 8e3])):  # norms 1e6, 1e4
        updates, state = optimizer.update(g, state, params)
        steps.append(np.asarray(updates))
    np.testing.assert_allclose(steps[0], [-2e-4, -2e-4], rtol=1e-6)
    np.testing.assert_allclose(steps[1], [-2e-4, -2e-4], rtol=1e-5)


def test_a_signal_while_a_logged_step_runs_stops_after_that_step(
    tmp_path, monkeypatch, built_data
):
    # The signal comes while the loop waits for step 3 to log: the run saves
    # step 3 and stops, without starting step 4.
    flush = train._Logger.flush

    def flush_then_signal(self, step):
        record = flush(self, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    def counting_step_fn(config, loss_fn, optimizer, mesh):  # no compile
        bins = config.train.loss_time_bins

        def step(state, batch):
            metrics = {"loss": 1.0, "mse": 1.0, "grad_norm": 0.0}
            metrics.update(mse_bin_sums=np.zeros(bins), mse_bin_counts=np.ones(bins))
            return state.replace(step=state.step + 1), metrics

        return step

    monkeypatch.setattr(train._Logger, "flush", flush_then_signal)
    monkeypatch.setattr(train, "make_step_fn", counting_step_fn)
    overrides = {"train.num_steps": 6, "train.log_every": 1}
    overrides["train.checkpoint_every"] = 100
    config = helpers.worker.make_config(built_data, overrides)
    workdir = tmp_path / "wd"
    result = train.train(config, str(workdir), sharding.make_mesh())
    assert result.preempted and int(result.state.step) == 3
    assert len(result.history["loss"]) == 3
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
