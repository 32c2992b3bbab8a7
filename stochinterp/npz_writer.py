"""An ``.npz`` file written a block of rows at a time.

``np.savez`` needs every array whole. ``NpzWriter`` takes the rows of its
arrays in blocks (a batch of samples at a time), keeps each array's rows in a
file of its own beside the output until ``close``, then writes the ``.npz``
(uncompressed, as ``np.savez``; ``np.load`` reads it) and moves it into place
in one step: a crash or kill before that leaves any earlier file of that name
as it was, never a part of the new one.

    with NpzWriter("samples.npz") as out:
        for batch in batches:
            out.append(x0=batch.x0, samples=batch.samples)
        out.close(record=np.asarray("{...}"))
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import zipfile

import numpy as np

_CHUNK = 1 << 24  # bytes copied at a time into the archive


class NpzWriter:
    """Writes ``path`` (an ``.npz``) from blocks of rows.

    Every ``append`` gives the same names; an array's blocks share the dtype
    and all but the first dimension, which they are stacked along.
    """

    def __init__(self, path: str):
        self.path = path
        folder, name = os.path.split(os.path.abspath(path))
        self._parts = tempfile.mkdtemp(prefix=f".{name}.parts-", dir=folder)
        self._arrays: dict[str, _Rows] = {}
        self._closed = False

    def append(self, **arrays) -> None:
        """Adds a block of rows to each named array.

        Args:
          **arrays: name -> [rows, ...] array (numpy or jax).
        """
        if self._closed:
            raise ValueError(f"{self.path} is already written")
        blocks = {name: np.asarray(value) for name, value in arrays.items()}
        if self._arrays and set(blocks) != set(self._arrays):
            raise ValueError(
                f"blocks for {self.path} must name {sorted(self._arrays)}, "
                f"got {sorted(blocks)}"
            )
        for name, block in blocks.items():
            if block.ndim == 0:
                raise ValueError(f"a block of '{name}' needs a row axis, got a scalar")
            if name not in self._arrays:
                file = os.path.join(self._parts, f"{len(self._arrays)}.raw")
                self._arrays[name] = _Rows(name, block, file)
            self._arrays[name].check(block)
        for name, block in blocks.items():
            self._arrays[name].write(block)

    def close(self, **whole) -> None:
        """Writes the ``.npz``: the appended arrays and ``whole`` as given.

        Args:
          **whole: name -> array stored as it is (e.g. a 0-d string record).
        """
        if self._closed:
            raise ValueError(f"{self.path} is already written")
        taken = set(whole) & set(self._arrays)
        if taken:
            raise ValueError(f"{sorted(taken)} already hold appended rows")
        self._closed = True
        try:
            _write_npz(self.path, self._arrays.values(), whole)
        finally:
            self._remove_parts()

    def abandon(self) -> None:
        """Drops the rows written so far; ``path`` is left as it was."""
        self._closed = True
        self._remove_parts()

    def _remove_parts(self) -> None:
        for rows in self._arrays.values():
            rows.file.close()
        shutil.rmtree(self._parts, ignore_errors=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if not self._closed:
            self.abandon()


class _Rows:
    """The rows of one array so far, in a raw file."""

    def __init__(self, name: str, first: np.ndarray, file: str):
        self.name, self.dtype, self.tail = name, first.dtype, first.shape[1:]
        self.count = 0
        self.file = open(file, "wb")

    def check(self, block: np.ndarray) -> None:
        if block.dtype != self.dtype or block.shape[1:] != self.tail:
            raise ValueError(
                f"a block of '{self.name}' must be [rows, "
                f"{', '.join(map(str, self.tail))}] {self.dtype} like the first, "
                f"got {list(block.shape)} {block.dtype}"
            )

    def write(self, block: np.ndarray) -> None:
        block.tofile(self.file)  # in C order, whatever the block's layout
        self.count += block.shape[0]

    def header(self) -> dict:
        return {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.count, *self.tail),
        }


@contextlib.contextmanager
def _replacing(path: str):
    """An empty archive that replaces ``path`` in one step when the block
    ends without an error; an error removes it and leaves ``path`` alone."""
    folder, name = os.path.split(os.path.abspath(path))
    # Created as open() creates files (the umask applies, unlike mkstemp's 0600).
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
    try:
        with zipfile.ZipFile(tmp, "x", zipfile.ZIP_STORED, allowZip64=True) as archive:
            yield archive
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _put(archive: zipfile.ZipFile, name: str, value) -> None:
    with archive.open(f"{name}.npy", "w", force_zip64=True) as out:
        np.lib.format.write_array(out, np.asanyarray(value), allow_pickle=False)


def _write_npz(path: str, rows, whole: dict) -> None:
    """The archive of the rows and the whole arrays, moved into place last."""
    with _replacing(path) as archive:
        for array in rows:
            array.file.close()
            with archive.open(f"{array.name}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_2_0(out, array.header())
                with open(array.file.name, "rb") as raw:
                    shutil.copyfileobj(raw, out, _CHUNK)
        for name, value in whole.items():
            _put(archive, name, value)


def save(path: str, **arrays) -> None:
    """``np.savez(path, **arrays)`` that replaces ``path`` in one step."""
    with _replacing(path) as archive:
        for name, value in arrays.items():
            _put(archive, name, value)


def replace_arrays(path: str, **arrays) -> None:
    """Rewrites the ``.npz`` at ``path`` with ``arrays`` in place of (or
    beside) its arrays of those names, copying the others a chunk at a time;
    the file is replaced in one step."""
    with zipfile.ZipFile(path) as old, _replacing(path) as new:
        for member in old.infolist():
            if member.filename.removesuffix(".npy") in arrays:
                continue
            with old.open(member) as src:
                with new.open(member.filename, "w", force_zip64=True) as out:
                    shutil.copyfileobj(src, out, _CHUNK)
        for name, value in arrays.items():
            _put(new, name, value)
