"""A grain loader over a random-access data source, sharded by process.

The examples form one stream: epoch after epoch, each epoch a permutation of
the records drawn from ``(seed, epoch)``. Global batch ``j`` is the stream's
positions ``[j * global_batch, (j + 1) * global_batch)``; process ``i`` of
``n`` reads only the ``i``-th contiguous block of ``global_batch // n`` of
them, so the global batch (process 0's block first, as ``shard_batch``
assembles it) does not depend on the number of processes. Whether a stream
position is flipped is a hash of ``(seed, position)``. Every batch is thus a
pure function of its index, and the iterator state is the index of the next
batch: ``iterator.get_state() == {'next_index': j}`` (plain JSON; grain's
``grain.checkpoint.CheckpointSave(iterator)`` stores the same state inside an
Orbax ``ocp.args.Composite``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from stochinterp import sharding
from stochinterp.data import transforms

Batch = dict[str, np.ndarray]
# Turns one stored record into (uint8 image [H, W, C], integer label).
DecodeFn = Callable[[Any], tuple[np.ndarray, int]]

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def decode_record(record: dict[str, Any]) -> tuple[np.ndarray, int]:
    """Default record decoder: the stored ``image`` and ``label`` fields."""
    return record["image"], int(record["label"])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit integer hash applied elementwise (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def flip_flags(seed: int, positions: np.ndarray) -> np.ndarray:
    """Whether each stream position is flipped: a fair, seeded hash bit."""
    key = _splitmix64(np.asarray([seed], dtype=np.uint64))
    bits = _splitmix64(positions.astype(np.uint64) ^ key)
    return (bits >> np.uint64(63)).astype(bool)


class _BatchReader:
    """Reads local batch ``j`` of the plan; a pure function of ``j``."""

    def __init__(
        self,
        source: Sequence[Any],
        *,
        seed: int,
        shuffle: bool,
        random_flip: bool,
        global_batch: int,
        local_batch: int,
        process_index: int,
        decode: DecodeFn,
    ):
        self._source = source
        self._num_records = len(source)
        self._seed = seed
        self._shuffle = shuffle
        self._random_flip = random_flip
        self._global_batch = global_batch
        self._local_batch = local_batch
        self._offset = process_index * local_batch
        self._decode = decode
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self._seed, epoch])
            self._permutations[epoch] = rng.permutation(self._num_records)
        return self._permutations[epoch]

    def positions(self, j: int) -> np.ndarray:
        """Stream positions ``[local_batch]`` of local batch ``j``."""
        start = j * self._global_batch + self._offset
        return np.arange(start, start + self._local_batch, dtype=np.int64)

    def records(self, positions: np.ndarray) -> np.ndarray:
        """Record indices ``[local_batch]`` at the given stream positions."""
        epochs, offsets = np.divmod(positions, self._num_records)
        if not self._shuffle:
            return offsets
        out = np.empty_like(offsets)
        for epoch in np.unique(epochs).tolist():
            here = epochs == epoch
            out[here] = self._permutation(epoch)[offsets[here]]
        return out

    def __call__(self, j: int) -> Batch:
        positions = self.positions(j)
        records = self.records(positions).tolist()
        if hasattr(self._source, "__getitems__"):
            raw = self._source.__getitems__(records)
        else:
            raw = [self._source[r] for r in records]
        decoded = [self._decode(record) for record in raw]
        images = np.stack([image for image, _ in decoded])
        labels = np.asarray([label for _, label in decoded], dtype=np.int32)
        if self._random_flip:
            flips = flip_flags(self._seed, positions)
            images[flips] = images[flips, :, ::-1]
        return {"image": transforms.to_unit_range(images), "label": labels}


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def make_loader(
    source: Sequence[Any],
    global_batch: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    random_flip: bool = False,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    decode: DecodeFn = decode_record,
    worker_count: int = 0,
    num_threads: int = 2,
    prefetch_batches: int = 4,
) -> grain.DatasetIterator:
    """An iterator of this process's batches, with ``get_state``/``set_state``.

    Args:
      source: random-access records (a TFDS data source, or any sequence).
      global_batch: examples per global batch (all processes together).
      seed: seeds the per-epoch permutations and the flips.
      shuffle: permute every epoch; if False the stream is the records in
        order, epoch after epoch.
      random_flip: flip images left-right at seeded random positions.
      num_epochs: passes over the data; None for an endless stream. A final
        partial global batch is dropped.
      process_index: this process (default ``jax.process_index()``).
      process_count: number of processes (default ``jax.process_count()``).
      decode: maps a record to ``(uint8 [H, W, C] image, label)``.
      worker_count: grain worker processes (0: read in this process; more
        need absl flags parsed and a picklable ``source`` and ``decode``).
      num_threads: reader threads (batches read ahead in this process).
      prefetch_batches: batches buffered by the reader threads.

    Returns:
      A ``grain.DatasetIterator`` yielding ``{'image': [b, H, W, C] float32 in
      [-1, 1], 'label': [b] int32}`` with ``b = global_batch // process_count``.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    _check_positive("global_batch", global_batch)
    _check_positive("process_count", process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must lie in [0, {process_count - 1}]"
        )
    if global_batch % process_count:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the number "
            f"of processes ({process_count})"
        )
    num_records = len(source)
    if num_records == 0:
        raise ValueError("the data source is empty")
    if num_epochs is None:
        num_batches = sys.maxsize
    else:
        _check_positive("num_epochs", num_epochs)
        num_batches = num_epochs * num_records // global_batch
        if num_batches == 0:
            raise ValueError(
                f"global batch size {global_batch} exceeds the {num_epochs} "
                f"epoch(s) of {num_records} records: no full batch"
            )
    reader = _BatchReader(
        source,
        seed=seed,
        shuffle=shuffle,
        random_flip=random_flip,
        global_batch=global_batch,
        local_batch=global_batch // process_count,
        process_index=process_index,
        decode=decode,
    )
    dataset = grain.MapDataset.range(num_batches).map(reader)
    dataset = dataset.to_iter_dataset(
        grain.ReadOptions(
            num_threads=num_threads, prefetch_buffer_size=prefetch_batches
        )
    )
    if worker_count > 0:
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count)
        )
    return iter(dataset)


def global_batches(loader: Iterator[Batch], mesh: Mesh) -> Iterator[dict]:
    """Yields the loader's batches as global ``jax.Array``s split over ``mesh``.

    Pulls one batch at a time, so ``loader.get_state()`` taken between two
    yielded batches resumes right after the last one yielded.
    """
    for batch in loader:
        yield sharding.shard_batch(batch, mesh)
