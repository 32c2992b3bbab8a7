"""The launcher refuses bad input at once, with the value in the message."""

import importlib
import os
import re
import subprocess
import sys

import pytest
from _train_helpers import REPO, one_line_error


def run_train(*args, tmp_path, launcher="train"):
    env = dict(os.environ, STOCHINTERP_DATA_DIR=str(tmp_path / "data"))
    return subprocess.run(
        [sys.executable, "-m", f"launch.{launcher}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unknown_override_key_is_named(tmp_path):
    result = run_train(
        "--workdir",
        str(tmp_path / "wd"),
        "--config.train.num_stepz=3",
        tmp_path=tmp_path,
    )
    assert result.returncode != 0
    assert "num_stepz" in result.stderr
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_image_size_not_divisible_by_tile_grid(tmp_path):
    result = run_train(
        "--workdir",
        str(tmp_path / "wd"),
        "--config.data.image_size=20",
        tmp_path=tmp_path,
    )
    assert result.returncode != 0
    assert "20x20" in result.stderr and "tile grid 8" in result.stderr
    assert not (tmp_path / "data").exists()  # failed before building any data
    assert not (tmp_path / "wd").exists()  # and before creating the workdir


@pytest.mark.parametrize("launcher", ["train", "sample", "evaluate", "fid"])
def test_help_lists_the_shared_flags(tmp_path, launcher):
    result = run_train("--help", tmp_path=tmp_path, launcher=launcher)
    shared = ["--workdir", "--config", "--cpu_devices", "--num_processes"]
    for flag in shared + ([] if launcher == "train" else ["--tag"]):
        assert f"  {flag}" in result.stdout, (launcher, flag)


def test_a_file_that_is_not_a_config_is_one_line(tmp_path):
    (tmp_path / "notes.py").write_text("x = 1\n")
    result = run_train(
        "--workdir",
        str(tmp_path / "wd"),
        f"--config={tmp_path}/notes.py",
        tmp_path=tmp_path,
    )
    assert one_line_error(result) == (
        f"error: --config file '{tmp_path}/notes.py' defines no get_config(): not a "
        "config file (see configs/)"
    )
    assert not (tmp_path / "wd").exists()


def test_a_stray_positional_argument_is_one_line(tmp_path):
    result = run_train("--workdir", str(tmp_path / "wd"), "extra", tmp_path=tmp_path)
    assert result.stderr.strip() == (
        "error: unexpected arguments ['extra']: every setting is a flag (--help "
        "lists them)"
    )
    assert result.returncode == 1 and not (tmp_path / "wd").exists()


def test_a_missing_config_file_is_one_line(tmp_path):
    result = run_train(
        "--workdir", str(tmp_path / "wd"), "--config=configs/nope.py", tmp_path=tmp_path
    )
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "error: --config file 'configs/nope.py' does not exist"
    )


@pytest.mark.parametrize("launcher", ["sample", "evaluate"])
def test_reading_launchers_need_an_existing_workdir(tmp_path, launcher):
    workdir = tmp_path / "never_trained"
    result = run_train("--workdir", str(workdir), tmp_path=tmp_path, launcher=launcher)
    assert result.returncode != 0
    assert f"workdir '{workdir}' does not exist; train into it first" in (result.stderr)
    assert not workdir.exists()


def test_unwritable_workdir_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    workdir = blocker / "wd"
    result = run_train("--workdir", str(workdir), tmp_path=tmp_path)
    assert result.returncode != 0
    assert str(workdir) in result.stderr and "cannot be created" in result.stderr


@pytest.mark.parametrize("flag", ["--cpu_devices=0"])
def test_bad_device_count(tmp_path, flag):
    result = run_train("--workdir", str(tmp_path / "wd"), flag, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "--cpu_devices must be >= 1, got 0" in result.stderr


def test_a_misspelt_field_ends_with_one_line_not_a_traceback(tmp_path):
    result = run_train(
        "--workdir",
        str(tmp_path / "wd"),
        "--config.train.num_step=3",
        tmp_path=tmp_path,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: --config.train.num_step=3: the config has no field "
        "'train.num_step' (no 'num_step' there); did you mean 'num_steps'?"
    )
    result = run_train(
        "--workdir", str(tmp_path / "wd"), "--config.zzz.q=1", tmp_path=tmp_path
    )
    assert result.stderr.strip() == (
        "error: --config.zzz.q=1: the config has no field 'zzz.q' (no 'zzz' there)"
    )
    result = run_train(
        "--workdir",
        str(tmp_path / "wd"),
        "--config.model.dim_mults[0]=1",
        tmp_path=tmp_path,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ")


def test_an_override_given_twice_is_refused_before_any_work(tmp_path):
    # ml_collections would append a repeated tuple: dim_mults (1, 2, 1, 2).
    result = run_train(
        "--workdir",
        str(tmp_path / "wd"),
        "--config.model.dim_mults=(1,2)",
        "--config.train.num_steps=3",
        "--config.model.dim_mults=(1,2)",
        tmp_path=tmp_path,
    )
    assert one_line_error(result) == (
        "error: --config.model.dim_mults is given 2 times ((1,2), (1,2)): "
        "give each override once"
    )
    assert not (tmp_path / "wd").exists()

    repeated = importlib.import_module("launch._common")._repeated_override
    argv = ["x", "--config.train.num_steps", "5", "--config.train.num_steps=6"]
    assert repeated(argv) == (
        "--config.train.num_steps is given 2 times (5, 6): give each override once"
    )
    argv = ["x", "--config.eval.enabled", "--noconfig.eval.enabled", "--workdir=a"]
    assert repeated(argv) == (
        "--config.eval.enabled is given 2 times ((flag), false): "
        "give each override once"
    )
    distinct = ["x", "--config=c.py", "--config.a=1", "--config.ab=1", "--a=1", "--a=2"]
    assert repeated(distinct) is None


def test_sampling_settings_are_checked_before_training(tmp_path):
    result = run_train(
        "--workdir",
        str(tmp_path / "wd"),
        "--config.eval.num_images=3",
        tmp_path=tmp_path,
    )
    assert result.returncode != 0
    assert "eval.num_images" in result.stderr and "(3:" in result.stderr
    assert not (tmp_path / "data").exists()  # before any data was built


def test_a_checked_value_ends_with_one_line_unless_asked_for_the_traceback(
    tmp_path, monkeypatch
):
    args = ("--workdir", str(tmp_path / "wd"), "--config.train.global_batch=-4")
    result = run_train(*args, tmp_path=tmp_path)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == (
        "error: global batch size -4 must be a positive multiple of the number "
        "of devices (2); choose e.g. 2"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "wd").exists()

    monkeypatch.setenv("STOCHINTERP_TRACEBACK", "0")
    result = run_train(*args, tmp_path=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    monkeypatch.setenv("STOCHINTERP_TRACEBACK", "1")
    result = run_train(*args, tmp_path=tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_sampler_fields_are_checked_when_nothing_is_sampled(tmp_path):
    result = run_train(
        "--workdir",
        str(tmp_path / "wd"),
        "--noevaluate",
        "--config.sampler.method=foo",
        tmp_path=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "'foo'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "wd").exists()


def test_evaluating_another_coupling_is_one_line(tmp_path):
    (tmp_path / "wd").mkdir()
    result = run_train(
        "--workdir",
        str(tmp_path / "wd"),
        "--config",
        "configs/superres_photos32.py",
        tmp_path=tmp_path,
        launcher="evaluate",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "coupling.name='superres'" in result.stderr.strip().splitlines()[-1]


def _fake_trained_workdir(tmp_path, experiment="inpaint_photos16"):
    """A workdir that passes the cheap checks: checkpoints/ and the config.json
    of ``configs/<experiment>.py``."""
    sys.path.insert(0, REPO)
    config = importlib.import_module(f"configs.{experiment}").get_config()
    workdir = tmp_path / "wd"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    return workdir


@pytest.mark.parametrize("launcher", ["sample", "evaluate"])
def test_a_config_of_another_run_is_refused_before_any_data_is_built(
    tmp_path, launcher
):
    workdir = _fake_trained_workdir(tmp_path)
    result = run_train(
        "--workdir",
        str(workdir),
        "--config",
        "configs/inpaint_photos32.py",
        tmp_path=tmp_path,
        launcher=launcher,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "another config" in result.stderr and "data.image_size" in result.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("launcher", ["train", "sample", "evaluate"])
def test_another_run_is_named_before_the_values_of_the_config_given(tmp_path, launcher):
    """The default config's in-painting has no labels to guide: the workdir's
    class-conditional run is named first, not the guidance setting."""
    workdir = _fake_trained_workdir(tmp_path, "digits_classcond")
    (workdir / "checkpoints" / "5").mkdir()  # a run to resume, for launch.train
    result = run_train(
        "--workdir",
        str(workdir),
        "--config.sampler.guidance_scale=2",
        tmp_path=tmp_path,
        launcher=launcher,
    )
    last = one_line_error(result)
    assert "holds a run with another config" in last, last
    assert "coupling.num_classes: 10 saved, 0 now" in last, last
    assert f"its values are in {workdir / 'config.json'}" in last, last
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("launcher", ["sample", "evaluate"])
@pytest.mark.parametrize(
    "text, message",
    [
        ("{garbage", "cannot read the run's saved config .*config.json.*Expecting"),
        ("[1, 2]", "config.json' holds a JSON list, expected an object"),
    ],
)
def test_a_damaged_saved_config_is_named_in_one_line(tmp_path, launcher, text, message):
    workdir = _fake_trained_workdir(tmp_path)
    (workdir / "config.json").write_text(text)
    result = run_train("--workdir", str(workdir), tmp_path=tmp_path, launcher=launcher)
    last = one_line_error(result)
    assert re.search(message, last), last
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("launcher", ["sample", "evaluate"])
def test_a_file_in_place_of_the_samples_folder_is_refused_before_work(
    tmp_path, launcher
):
    workdir = _fake_trained_workdir(tmp_path)
    (workdir / "samples").write_text("not a folder")
    result = run_train("--workdir", str(workdir), tmp_path=tmp_path, launcher=launcher)
    last = one_line_error(result)
    assert last == (
        f"error: {str(workdir / 'samples')!r} is not a folder: sampling writes its "
        "outputs there; move that file out of the way"
    ), last
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("--config.model.dim_mults=(1,2,2,2,2,2)",),
            "data.image_size=16 must be divisible by 2**(len(model.dim_mults) - 1)"
            " = 32",
        ),
        (
            (
                "--config",
                "configs/digits_classcond.py",
                "--config.coupling.num_classes=5",
            ),
            "coupling.num_classes=5 but dataset 'digits' has 10 classes",
        ),
        (
            (
                "--config",
                "configs/digits_classcond.py",
                "--config.coupling.num_classes=11",
            ),
            "coupling.num_classes=11 but dataset 'digits' has 10 classes",
        ),
        (
            (
                "--config",
                "configs/digits_classcond.py",
                "--config.train.global_batch=4000",
            ),
            "train.global_batch=4000 is larger than the train split of digits (1438",
        ),
    ],
)
def test_checks_that_need_the_network_or_the_data_create_no_workdir(
    tmp_path, args, message
):
    result = run_train("--workdir", str(tmp_path / "wd"), *args, tmp_path=tmp_path)
    last = one_line_error(result)
    assert message in last, last
    assert not (tmp_path / "wd").exists()


_CACHE_PROBE = """
import sys, jax, jax.numpy as jnp, numpy as np
from launch import _common
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
print(_common.use_compilation_cache(sys.argv[1]))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.sin(x) * 3)(np.ones(5, np.float32)).block_until_ready()
print(events.count("/jax/compilation_cache/cache_hits"))
"""


def _probe_cache(folder):
    result = subprocess.run(
        [sys.executable, "-c", _CACHE_PROBE, str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split(), result.stderr


def test_compiled_programs_are_reused_by_the_next_run(tmp_path):
    folder = tmp_path / "xla"
    assert _probe_cache(folder)[0] == ["True", "0"]
    assert any(name.startswith("jit__lambda") for name in os.listdir(folder))
    assert _probe_cache(folder)[0] == ["True", "1"]  # loaded, not compiled
    for name in os.listdir(folder):  # a damaged entry is compiled again
        (folder / name).write_bytes(b"damaged")
    (on, hits), stderr = _probe_cache(folder)
    assert (on, hits) == ("True", "0") and "compilation cache" in stderr
    # The damaged entry was replaced by the program compiled instead.
    assert _probe_cache(folder)[0] == ["True", "1"]


_SPLIT_PROBE = """
import logging, sys, jax, jax.numpy as jnp, numpy as np
from launch import _common
logging.basicConfig(level=logging.INFO)
print(_common.use_compilation_cache(sys.argv[1]))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

def sorted_pair(x):  # two sorted copies alive at once: 2 x 2 MiB of buffers
    return jnp.sum(jnp.sort(jnp.sin(x)) * jnp.sort(jnp.cos(x))[::-1])

for _ in range(2):
    jax.jit(sorted_pair)(np.ones(1 << 19, np.float32)).block_until_ready()
"""


@pytest.mark.parametrize("heap", [None, 1 << 20])
def test_a_program_with_split_heaps_is_not_stored_and_says_so(tmp_path, heap):
    folder = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if heap:
        env["XLA_FLAGS"] = f"--xla_multiheap_size_constraint_per_heap={heap}"
    result = subprocess.run(
        [sys.executable, "-c", _SPLIT_PROBE, str(folder)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    stored = [n for n in os.listdir(folder) if n.startswith("jit_sorted_pair-")]
    said = "jit_sorted_pair not stored in the compilation cache: XLA split"
    assert "Error writing persistent compilation cache" not in result.stderr
    if heap:
        assert stored == [] and result.stderr.count(said) == 1, result.stderr
    else:
        assert len(stored) == 1 and said not in result.stderr, result.stderr


def test_the_cache_folder_expands_home_and_follows_jax_variable(monkeypatch, tmp_path):
    from launch import _common

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert _common.default_compilation_cache() == str(
        tmp_path / ".cache" / "stochinterp" / "xla"
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _common.default_compilation_cache() == str(
        tmp_path / "xdg" / "stochinterp" / "xla"
    )
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert _common.default_compilation_cache() == str(tmp_path / "jax")
    probe = subprocess.run(
        [sys.executable, "-c", _CACHE_PROBE, "~/tilde"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.stdout.split() == ["True", "0"], probe.stderr
    assert (tmp_path / "tilde").is_dir() and not (tmp_path / "~").exists()


def test_an_unwritable_cache_folder_turns_the_cache_off(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    (on, hits), stderr = _probe_cache(blocker / "xla")
    assert (on, hits) == ("False", "0")
    assert "compilation cache off" in stderr and "file/xla" in stderr


@pytest.mark.parametrize(
    "launcher, args, env, message",
    [
        (
            "train",
            ("--config.seed=99999999999999999999",),
            {},
            "error: seed must be an integer in [0, 2**32), got 99999999999999999999",
        ),
        (
            "sample",
            ("--seed=-3",),
            {},
            "error: --seed must be an integer in [0, 2**32), got -3",
        ),
        (
            "sample",
            ("--batch=-2",),
            {},
            "error: --batch must be >= 0, got -2",
        ),
        (
            "sample",
            ("--batch=3", "--cpu_devices=2"),
            {},
            "error: --batch=3 must be 0 (all --num_samples at once) or a positive "
            "multiple of the number of devices (2)",
        ),
        (
            "train",
            ("--num_processes=2",),
            {},
            "error: num_processes=2 needs a coordinator address (host:port), from "
            "the flag or STOCHINTERP_COORDINATOR",
        ),
        (
            "train",
            ("--num_processes=2", "--coordinator_address=127.0.0.1:notaport"),
            {},
            "error: coordinator address '127.0.0.1:notaport' must be host:port with "
            "a port in [1, 65535] (--coordinator_address or STOCHINTERP_COORDINATOR)",
        ),
        (
            "train",
            ("--process_id=3",),
            {},
            "error: process_id=3 must lie in [0, 0] for num_processes=1",
        ),
        (
            "train",
            (),
            {"STOCHINTERP_NUM_PROCESSES": "two"},
            "error: STOCHINTERP_NUM_PROCESSES must be an integer, got 'two'",
        ),
    ],
)
def test_bad_seeds_and_process_settings_are_one_line(
    tmp_path, monkeypatch, launcher, args, env, message
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    workdir = tmp_path / "wd"
    if launcher == "sample":
        workdir.mkdir()  # refused before its checkpoints are looked for
    result = run_train(
        "--workdir", str(workdir), *args, tmp_path=tmp_path, launcher=launcher
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == message
    assert os.listdir(workdir) == [] if launcher == "sample" else not workdir.exists()


def test_a_file_in_place_of_a_workdir_folder_is_named(tmp_path):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    (workdir / "samples").write_text("not a folder")
    result = run_train("--workdir", str(workdir), tmp_path=tmp_path)
    last = one_line_error(result)
    assert last == (
        f"error: cannot make the folder {str(workdir / 'samples')!r} in the workdir "
        "(File exists); move what is in the way, or choose another --workdir"
    ), last


def test_a_ctrl_c_outside_the_training_loop_ends_with_one_line(capsys, monkeypatch):
    sys.path.insert(0, REPO)
    from launch import _common

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.delenv("STOCHINTERP_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        _common.one_line_input_errors(interrupted)([])
    assert stop.value.code == 130
    assert capsys.readouterr().err == "error: interrupted by Ctrl-C\n"
    monkeypatch.setenv("STOCHINTERP_TRACEBACK", "1")
    with pytest.raises(KeyboardInterrupt):
        _common.one_line_input_errors(interrupted)([])
