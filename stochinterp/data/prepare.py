"""Building a TFDS dataset once into a data directory and reusing it."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable

import jax
import tensorflow_datasets as tfds
from absl import logging

DATA_DIR_ENV = "STOCHINTERP_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/stochinterp/tfds"
FILE_FORMAT = "array_record"


def default_data_dir() -> str:
    """``$STOCHINTERP_DATA_DIR`` if set, else ``~/.cache/stochinterp/tfds``."""
    return os.path.expanduser(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    """Expands ``~`` and replaces an empty value by ``default_data_dir()``."""
    if data_dir is None or not os.fspath(data_dir):
        return default_data_dir()
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def _prepare_here(
    make_builder: Callable[[], tfds.core.DatasetBuilder], data_dir: str
) -> tfds.core.DatasetBuilder:
    """Builds the dataset into ``data_dir`` unless it is there; returns its builder.

    Builds are serialised by a lock file in ``data_dir``: a second process
    that starts while the first builds waits, then reuses what it built.
    """
    builder = make_builder()
    if builder.is_prepared():
        logging.info("Reusing %s from %s", builder.name, builder.data_dir)
        return builder
    lock_path = os.path.join(data_dir, f".{builder.name}.build.lock")
    try:
        os.makedirs(data_dir, exist_ok=True)
        handle = open(lock_path, "a")
    except OSError as e:
        raise PermissionError(
            f"data directory {data_dir!r} cannot be written ({e.strerror}), and "
            f"{builder.info.full_name} must be built there first: set "
            f"data.data_dir or ${DATA_DIR_ENV} to a writable folder"
        ) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            logging.info("Waiting for another process building %s", lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        builder = make_builder()  # reads what another process may have built
        if builder.is_prepared():
            logging.info("Reusing %s from %s", builder.name, builder.data_dir)
            return builder
        logging.info("Building %s into %s", builder.info.full_name, builder.data_dir)
        builder.download_and_prepare(
            file_format=FILE_FORMAT,
            download_config=tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP,
                try_download_gcs=False,
            ),
        )
    return builder


_SYNCED: set[str] = set()


def prepare(
    make_builder: Callable[[], tfds.core.DatasetBuilder], key: str, data_dir: str
) -> tfds.core.DatasetBuilder:
    """Builds a dataset unless it is already in its data directory.

    With several JAX processes, the first call for a given ``key`` is
    collective (every process must make it): process 0 builds while the
    others wait, then they open the dataset and build their own copy only if
    the data directory is not shared. Later calls with that key are local.

    Args:
      make_builder: makes the TFDS builder (with its config and data_dir). A
        builder reads the dataset's metadata when it is made, so the other
        processes make theirs after the wait.
      key: names the dataset and data directory.
      data_dir: the data directory (where the build lock lies).

    Returns:
      A builder whose dataset is prepared, ready for ``as_data_source``.
    """
    if jax.process_count() == 1 or key in _SYNCED:
        return _prepare_here(make_builder, data_dir)
    builder = None
    if jax.process_index() == 0:
        builder = _prepare_here(make_builder, data_dir)
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"stochinterp_data_prepare:{key}")
    _SYNCED.add(key)
    if builder is None:
        builder = _prepare_here(make_builder, data_dir)
    return builder
