"""An .npz written a block of rows at a time reads back as np.savez's would."""

import os

import numpy as np
import pytest

from stochinterp.npz_writer import NpzWriter, replace_arrays, save


def test_blocks_are_stacked_in_order_with_their_dtypes(tmp_path):
    path = str(tmp_path / "a.npz")
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 4, 4, 3)).astype(np.float32)
    labels = np.array([3, 1, 4, 1, 5], np.int32)
    with NpzWriter(path) as out:
        for start, stop in ((0, 2), (2, 3), (3, 5)):
            out.append(images=images[start:stop], labels=labels[start:stop])
        out.close(record=np.asarray('{"nfe": 20}'))
    saved = np.load(path)
    assert sorted(saved) == ["images", "labels", "record"]
    np.testing.assert_array_equal(saved["images"], images)
    assert saved["images"].dtype == np.float32 and saved["labels"].dtype == np.int32
    np.testing.assert_array_equal(saved["labels"], labels)
    assert str(saved["record"]) == '{"nfe": 20}'
    assert os.listdir(tmp_path) == ["a.npz"]  # the parts are gone
    # Blocks in another memory layout are stored in row order all the same.
    with NpzWriter(str(tmp_path / "t.npz")) as out:
        out.append(x=images[:2].T, y=images[::2, 0])
        out.close()
    with np.load(tmp_path / "t.npz") as stored:
        np.testing.assert_array_equal(stored["x"], images[:2].T)
        np.testing.assert_array_equal(stored["y"], images[::2, 0])
    os.remove(tmp_path / "t.npz")
    # Permissions as np.savez's own files get them (the umask's).
    np.savez(tmp_path / "b.npz", x=labels)
    assert os.stat(path).st_mode == os.stat(tmp_path / "b.npz").st_mode


def test_blocks_that_do_not_stack_are_named(tmp_path):
    out = NpzWriter(str(tmp_path / "a.npz"))
    out.append(x=np.zeros((2, 3), np.float32), y=np.zeros(2))
    with pytest.raises(ValueError, match=r"'x' must be \[rows, 3\] float32 .*\[2, 4\]"):
        out.append(x=np.zeros((2, 4), np.float32), y=np.zeros(2))
    with pytest.raises(ValueError, match=r"must be \[rows, 3\] float32.*float64"):
        out.append(x=np.zeros((2, 3)), y=np.zeros(2))
    with pytest.raises(ValueError, match=r"must name \['x', 'y'\], got \['x'\]"):
        out.append(x=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="'z' needs a row axis"):
        NpzWriter(str(tmp_path / "b.npz")).append(z=np.float32(1))
    with pytest.raises(ValueError, match=r"\['x'\] already hold appended rows"):
        out.close(x=np.zeros(1))
    out.close()
    with pytest.raises(ValueError, match="already written"):
        out.append(x=np.zeros((2, 3), np.float32), y=np.zeros(2))


def test_an_unfinished_writer_leaves_the_earlier_file(tmp_path):
    path = str(tmp_path / "a.npz")
    np.savez(path, x=np.arange(4))
    with pytest.raises(KeyboardInterrupt), NpzWriter(path) as out:
        out.append(x=np.arange(10))
        raise KeyboardInterrupt
    np.testing.assert_array_equal(np.load(path)["x"], np.arange(4))
    assert os.listdir(tmp_path) == ["a.npz"]


def test_replacing_an_array_keeps_the_others_bit_for_bit(tmp_path):
    path = str(tmp_path / "a.npz")
    values = np.random.default_rng(1).normal(size=(3, 5))
    np.savez(path, x=values, record=np.asarray("old"))
    np.savez(tmp_path / "b.npz", x=values)
    replace_arrays(path, record=np.asarray("new"), extra=np.arange(2))
    saved = np.load(path)
    assert sorted(saved) == ["extra", "record", "x"]
    assert saved["x"].tobytes() == values.tobytes()
    assert str(saved["record"]) == "new"
    assert os.stat(path).st_mode == os.stat(tmp_path / "b.npz").st_mode
    np.testing.assert_array_equal(saved["extra"], np.arange(2))
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.npz"]


def test_a_failing_write_leaves_the_earlier_file_and_no_temporary(tmp_path):
    path = str(tmp_path / "a.npz")
    np.savez(path, x=np.arange(4))
    objects = np.array([None], dtype=object)  # not written without pickles
    for write in (save, replace_arrays):
        with pytest.raises(ValueError, match="allow_pickle"):
            write(path, y=objects)
        np.testing.assert_array_equal(np.load(path)["x"], np.arange(4))
        assert os.listdir(tmp_path) == ["a.npz"]
