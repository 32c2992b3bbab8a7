"""The photo_patches and digits datasets as built on disk."""

import fcntl
import functools
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict
from sklearn.datasets import load_digits

from stochinterp import data
from stochinterp.data import digits, photo_patches
from stochinterp.data.photo_patches import PHOTOS


def _config(name, size, data_dir):
    return ConfigDict(
        {
            "name": name,
            "image_size": size,
            "data_dir": str(data_dir),
            "random_flip": True,
            "shuffle_seed": 0,
        }
    )


def _read_all(source):
    records = source.__getitems__(list(range(len(source))))
    return {
        key: np.stack([r[key] for r in records])
        for key in ("image", "label", "scale", "source_box")
    }


@pytest.fixture(scope="session")
def patches16(tmp_path_factory):
    config = _config("photo_patches", 16, tmp_path_factory.mktemp("tfds"))
    built = data.builder(config)
    splits = {s: _read_all(built.as_data_source(split=s)) for s in ("train", "test")}
    return config, built, splits


@pytest.fixture(scope="session")
def photos():
    return [photo_patches.load_photo(i) for i in range(len(PHOTOS))]


def test_photos_load_offline_as_rgb(photos):
    assert len(photos) == 7
    for photo in photos:
        assert photo.ndim == 3 and photo.shape[2] == 3 and photo.dtype == np.uint8
        assert min(photo.shape[:2]) >= 300


def test_patch_counts_shapes_and_classes(patches16):
    config, _, splits = patches16
    info = data.dataset_info(config)
    assert info.num_classes == 7 and info.channels == 3
    assert info.class_names == tuple(p.name for p in PHOTOS)
    assert info.split_sizes == {"train": 28093, "test": 9354}
    for split in splits.values():
        assert split["image"].shape[1:] == (16, 16, 3)
        assert set(split["label"].tolist()) == set(range(7))
        assert set(split["scale"].tolist()) == {1, 2, 4}


def test_train_and_test_regions_share_no_pixel(patches16, photos):
    _, _, splits = patches16
    for label, photo in enumerate(photos):
        height, width = photo.shape[:2]
        train = splits["train"]["source_box"][splits["train"]["label"] == label]
        test = splits["test"]["source_box"][splits["test"]["label"] == label]
        for boxes in (train, test):
            assert boxes[:, 0].min() >= 0 and boxes[:, 2].max() <= height
            assert boxes[:, 1].min() >= 0 and boxes[:, 3].max() <= width
        # Every train column lies left of every test column.
        assert train[:, 3].max() <= test[:, 1].min()
        assert test[:, 3].max() - test[:, 1].min() <= round(0.25 * width)


def test_pixels_come_from_the_recorded_box_of_the_labelled_photo(patches16, photos):
    _, _, splits = patches16
    rng = np.random.default_rng(0)
    for split in splits.values():
        for i in rng.choice(len(split["label"]), size=300, replace=False):
            top, left, bottom, right = split["source_box"][i].tolist()
            scale = split["scale"][i]
            crop = photos[split["label"][i]][top:bottom, left:right].astype(float)
            blocks = crop.reshape(16, scale, 16, scale, 3).mean(axis=(1, 3))
            np.testing.assert_array_equal(split["image"][i], np.round(blocks))


def test_patches_are_deterministic_for_a_seed(photos):
    def boxes(seed):
        patches = photo_patches.region_patches(photos[1], 1, "test", 16, seed)
        return [p.source_box for p in patches]

    assert boxes(0) == boxes(0)
    assert boxes(0) != boxes(1)
    assert len(boxes(0)) == len(boxes(1)) > 100


def test_built_dataset_is_reused(patches16):
    config, built, _ = patches16
    folder = built.data_dir
    before = {
        f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)
    }
    again = data.builder(config)
    assert again.data_dir == folder
    after = {
        f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)
    }
    assert before == after


def test_eval_examples_are_fixed(patches16):
    config, _, splits = patches16
    first = data.eval_examples(config, n=8)
    again = data.eval_examples(config, split="", n=8)
    np.testing.assert_array_equal(first["label"], again["label"])
    again = data.eval_examples(config, split="test", n=8)
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["label"], splits["test"]["label"][:8])
    want = splits["test"]["image"][:8].astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(first["image"], want, atol=1e-6)
    with pytest.raises(ValueError, match="n=9999 examples"):
        data.eval_examples(config, n=9999)


def test_eval_examples_start_anywhere_in_the_split(patches16):
    config, _, splits = patches16
    later = data.eval_examples(config, n=3, start=5)
    np.testing.assert_array_equal(later["label"], splits["test"]["label"][5:8])
    want = splits["test"]["image"][5:8].astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(later["image"], want, atol=1e-6)
    size = len(splits["test"]["label"])
    last = data.eval_examples(config, n=1, start=size - 1)
    assert last["label"][0] == splits["test"]["label"][-1]
    with pytest.raises(ValueError, match=f"from record {size - 1} .* n <= 1"):
        data.eval_examples(config, n=2, start=size - 1)
    for start in (-1, size, 1.0, True):
        with pytest.raises(ValueError, match=rf"start={start!r} must be an integer in"):
            data.eval_examples(config, n=1, start=start)
    same = data.eval_examples(config, n=np.int64(3), start=np.int64(5))
    np.testing.assert_array_equal(same["label"], later["label"])


def test_unknown_split_lists_the_available_ones(patches16):
    config, _, _ = patches16
    with pytest.raises(
        ValueError, match=r"'validation' does not exist.*'test', 'train'"
    ):
        data.data_source(config, "validation")


def test_digits(tmp_path):
    config = _config("digits", 16, tmp_path)
    info = data.dataset_info(config)
    assert info.split_sizes == {"train": 1438, "test": 359}
    assert info.num_classes == 10 and info.channels == 1
    built = data.builder(config)
    digits = load_digits()
    counts = np.zeros(10, dtype=int)
    indices = []
    for split in ("train", "test"):
        for record in built.as_data_source(split=split):
            assert record["image"].shape == (16, 16, 1)
            assert record["label"] == digits.target[record["index"]]
            want = np.round(digits.images[record["index"]] * 255 / 16)
            np.testing.assert_array_equal(record["image"][::2, ::2, 0], want)
            np.testing.assert_array_equal(record["image"][1::2, 1::2, 0], want)
            counts[record["label"]] += 1
            indices.append(int(record["index"]))
    np.testing.assert_array_equal(counts, np.bincount(digits.target))
    assert sorted(indices) == list(range(1797))
    batch = next(data.make_loader_from_config(config, "train", 32))
    assert batch["image"].shape == (32, 16, 16, 1)


def test_photo_patches_32(tmp_path):
    info = data.dataset_info(_config("photo_patches", 32, tmp_path))
    assert info.split_sizes == {"train": 7015, "test": 2322}


def test_a_build_waits_for_another_and_reuses_what_it_built(tmp_path, monkeypatch):
    """Two runs starting together on a new data directory build it once."""
    real_build = tfds.core.DatasetBuilder.download_and_prepare
    built = []

    def build_while_holding_the_lock(self, *args, **kwargs):
        built.append(self.name)
        with open(tmp_path / ".digits.build.lock") as handle:
            with pytest.raises(BlockingIOError):  # another run would wait
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return real_build(self, *args, **kwargs)

    monkeypatch.setattr(
        tfds.core.DatasetBuilder, "download_and_prepare", build_while_holding_the_lock
    )
    make = functools.partial(digits.Digits, config="8", data_dir=str(tmp_path))
    assert data.prepare._prepare_here(make, str(tmp_path)).is_prepared()
    assert built == ["digits"]

    # A second run that found no dataset, then waited for the lock while the
    # first built it, reads that dataset instead of building it again.
    found = iter([False])
    monkeypatch.setattr(
        tfds.core.DatasetBuilder, "is_prepared", lambda self: next(found, True)
    )
    data.prepare._prepare_here(make, str(tmp_path))
    assert built == ["digits"]


def test_an_unwritable_data_directory_is_named_before_a_build(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    data_dir = tmp_path / "a_file" / "tfds"
    with pytest.raises(
        PermissionError,
        match=r"data directory .*tfds' cannot be written .* set data.data_dir or "
        r"\$STOCHINTERP_DATA_DIR to a writable folder",
    ):
        data.builder(_config("digits", 8, data_dir))
