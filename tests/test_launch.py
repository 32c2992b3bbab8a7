"""The launcher refuses bad input at once, with the value in the message."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args, tmp_path):
    env = dict(os.environ, STOCHINTERP_DATA_DIR=str(tmp_path / "data"))
    return subprocess.run(
        [sys.executable, "-m", "launch.train", *args],
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


def test_unwritable_workdir_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    workdir = blocker / "wd"
    result = run_train("--workdir", str(workdir), tmp_path=tmp_path)
    assert result.returncode != 0
    assert str(workdir) in result.stderr and "not writable" in result.stderr


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
        'error: \'num_step\' Did you mean "num_steps" instead of "num_step"?'
    )


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
