"""Building a TFDS dataset once into a data directory and reusing it."""

from __future__ import annotations

import os

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


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _prepare_here(builder: tfds.core.DatasetBuilder) -> None:
    if builder.is_prepared():
        logging.info("Reusing %s from %s", builder.name, builder.data_dir)
        return
    logging.info("Building %s into %s", builder.info.full_name, builder.data_dir)
    builder.download_and_prepare(
        file_format=FILE_FORMAT,
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
            try_download_gcs=False,
        ),
    )


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """Builds ``builder``'s dataset unless it is already in its data directory.

    With several JAX processes, process 0 builds first and the others wait,
    then build their own copy only if the data directory is not shared.

    Returns:
      The same builder, ready for ``as_data_source``.
    """
    if jax.process_index() == 0:
        _prepare_here(builder)
    _barrier(f"stochinterp_prepare_{builder.info.full_name}")
    if jax.process_index() != 0:
        _prepare_here(builder)
    return builder
