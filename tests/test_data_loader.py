"""The grain loader: order, shards, flips, resumption and config errors."""

import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ml_collections import ConfigDict

from stochinterp import data, sharding
from stochinterp.data import loader as loader_lib

N = 40


def _records(n=N):
    """Records whose label is their index; column 0 holds the index, so a flip
    moves it to column 3 and both are visible."""
    out = []
    for index in range(n):
        image = np.zeros((2, 4, 1), dtype=np.uint8)
        image[:, 0] = index
        image[:, 3] = 255
        out.append({"image": image, "label": index})
    return out


def _take(iterator, k):
    return [next(iterator) for _ in range(k)]


def _labels(batches):
    return [b["label"].tolist() for b in batches]


def test_same_seed_same_batches_other_seed_differs():
    source = _records()
    a = _take(data.make_loader(source, 8, seed=3, random_flip=True), 6)
    b = _take(data.make_loader(source, 8, seed=3, random_flip=True), 6)
    c = _take(data.make_loader(source, 8, seed=4, random_flip=True), 6)
    assert _labels(a) == _labels(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert _labels(a) != _labels(c)


def test_every_epoch_is_a_new_permutation_of_all_records():
    batches = _take(data.make_loader(_records(), 8, seed=0), 10)
    first = sum(_labels(batches[:5]), [])
    second = sum(_labels(batches[5:]), [])
    assert sorted(first) == list(range(N)) and sorted(second) == list(range(N))
    assert first != second and first != list(range(N))


def test_two_processes_read_disjoint_halves_of_each_global_batch():
    source = _records()
    whole = _take(data.make_loader(source, 8, seed=5, process_count=1), 5)
    parts = [
        _take(data.make_loader(source, 8, seed=5, process_index=i, process_count=2), 5)
        for i in range(2)
    ]
    seen = []
    for j in range(5):
        p0, p1 = parts[0][j]["label"], parts[1][j]["label"]
        assert p0.shape == (4,) and p1.shape == (4,)
        assert not set(p0.tolist()) & set(p1.tolist())
        np.testing.assert_array_equal(np.concatenate([p0, p1]), whole[j]["label"])
        seen += p0.tolist() + p1.tolist()
    assert sorted(seen) == list(range(N))


def test_restored_iterator_continues_exactly():
    source = _records()
    make = lambda: data.make_loader(source, 8, seed=1, random_flip=True)  # noqa: E731
    uninterrupted = _take(make(), 9)
    first = make()
    _take(first, 3)
    state = json.dumps(first.get_state())
    resumed = make()
    resumed.set_state(json.loads(state))
    for want, got in zip(uninterrupted[3:], _take(resumed, 6), strict=True):
        np.testing.assert_array_equal(want["label"], got["label"])
        np.testing.assert_array_equal(want["image"], got["image"])


def test_state_round_trips_through_orbax(tmp_path):
    source = _records()
    iterator = data.make_loader(source, 8, seed=2)
    _take(iterator, 4)
    want = data.make_loader(source, 8, seed=2)
    _take(want, 4)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(
            4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator))
        )
        manager.wait_until_finished()
    restored = data.make_loader(source, 8, seed=2)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.restore(
            4,
            args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)),
        )
    np.testing.assert_array_equal(next(restored)["label"], next(want)["label"])


def test_flips_are_seeded_and_mirror_the_image():
    batches = _take(data.make_loader(_records(), 8, seed=7, random_flip=True), 50)
    flipped = 0
    for batch in batches:
        for image, label in zip(batch["image"], batch["label"], strict=True):
            value = label * (2 / 255) - 1
            if np.isclose(image[0, 0, 0], value):
                assert image[0, 3, 0] == 1.0
            else:
                np.testing.assert_allclose(image[:, 3, 0], value, atol=1e-6)
                assert np.all(image[:, 0, 0] == 1.0)
                flipped += 1
    # 400 fair coin flips: 200 +- 50 is more than 5 standard deviations.
    assert 150 < flipped < 250
    plain = _take(data.make_loader(_records(), 8, seed=7), 50)
    assert all(np.all(b["image"][:, :, 3] == 1.0) for b in plain)


def test_values_dtypes_and_range():
    source = [{"image": np.array([[[0], [255], [128]]], np.uint8), "label": 3}] * 4
    batch = next(data.make_loader(source, 4, shuffle=False))
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    want = [-1.0, 1.0, 128 / 127.5 - 1]
    np.testing.assert_allclose(batch["image"][0, 0, :, 0], want, atol=1e-7)
    assert batch["image"].max() == 1.0 and batch["image"].min() == -1.0


def test_finite_epochs_drop_the_remainder():
    iterator = data.make_loader(_records(), 12, num_epochs=1, shuffle=False)
    batches = list(iterator)
    assert len(batches) == 3
    assert sum(_labels(batches), []) == list(range(36))


def test_global_batches_on_a_two_device_mesh():
    mesh = sharding.make_mesh()
    assert mesh.devices.size == 2
    local = _take(data.make_loader(_records(), 8, seed=0), 2)
    iterator = data.global_batches(data.make_loader(_records(), 8, seed=0), mesh)
    for want in local:
        got = next(iterator)
        assert isinstance(got["image"], jax.Array)
        assert got["image"].shape == (8, 2, 4, 1)
        assert got["image"].sharding.spec == sharding.batch_sharding(mesh).spec
        np.testing.assert_array_equal(np.asarray(got["label"]), want["label"])


def test_flip_flags_are_fair_and_seeded():
    positions = np.arange(100_000)
    a = loader_lib.flip_flags(0, positions)
    assert abs(a.mean() - 0.5) < 0.01
    np.testing.assert_array_equal(a, loader_lib.flip_flags(0, positions))
    assert (a != loader_lib.flip_flags(1, positions)).mean() > 0.4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"global_batch": 7, "process_count": 2}, "not divisible"),
        ({"global_batch": 8, "process_index": 2, "process_count": 2}, "process_index"),
        ({"global_batch": 0}, "global_batch must be a positive"),
        ({"global_batch": 64, "num_epochs": 1}, "no full batch"),
    ],
)
def test_bad_loader_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.make_loader(_records(), **kwargs)


def test_empty_source_is_refused():
    with pytest.raises(ValueError, match="empty"):
        data.make_loader([], 8)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"name": "cifar10", "image_size": 32}, r"data.name='cifar10'.*photo_patches"),
        ({"name": "photo_patches", "image_size": 24}, r"image_size=24.*\(16, 32\)"),
        ({"name": "digits", "image_size": 12}, r"image_size=12.*\(8, 16, 32\)"),
        ({"name": "imagenet_folder", "image_size": 4}, "integer >= 8"),
        ({"name": "digits", "image_size": 8, "random_flip": "yes"}, "random_flip"),
        ({"name": "digits", "image_size": 8, "shuffle_seed": 1.5}, "shuffle_seed"),
    ],
)
def test_bad_config_names_the_value_and_the_choices(tmp_path, fields, match):
    config = ConfigDict({"data_dir": str(tmp_path), **fields})
    with pytest.raises(ValueError, match=match):
        data.validate(config)


def test_data_dir_default_and_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("STOCHINTERP_DATA_DIR", raising=False)
    assert data.resolve_data_dir("").endswith(".cache/stochinterp/tfds")
    monkeypatch.setenv("STOCHINTERP_DATA_DIR", str(tmp_path))
    assert data.resolve_data_dir(None) == str(tmp_path)
    assert data.resolve_data_dir("~/x") != "~/x"


_TWO_PROCESS_SCRIPT = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
from jax.experimental import multihost_utils
from ml_collections import ConfigDict
from stochinterp import data, sharding
port, pid, data_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
config = ConfigDict({"name": "digits", "image_size": 8, "data_dir": data_dir,
                     "random_flip": True, "shuffle_seed": 4})
batches = data.global_batches(
    data.make_loader_from_config(config, "train", 8), sharding.make_mesh())
batch = next(batches)
labels = multihost_utils.process_allgather(batch["label"], tiled=True)
print("LABELS", json.dumps(labels.tolist()), flush=True)
jax.distributed.shutdown()
"""


def test_two_real_processes_assemble_the_one_process_batch(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    data_dir = str(tmp_path / "tfds")
    runs = [
        subprocess.Popen(
            [sys.executable, str(script), port, str(pid), data_dir],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    config = ConfigDict(
        {
            "name": "digits",
            "image_size": 8,
            "data_dir": data_dir,
            "random_flip": True,
            "shuffle_seed": 4,
        }
    )
    want = data.make_loader_from_config(
        config, "train", 8, process_index=0, process_count=1
    )
    want = next(want)["label"].tolist()
    for output in outputs:
        line = next(x for x in output.splitlines() if x.startswith("LABELS"))
        assert json.loads(line.split(" ", 1)[1]) == want
