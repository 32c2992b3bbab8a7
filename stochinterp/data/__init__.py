"""Datasets (TFDS builders written as array_record) and the grain loader.

Nothing here imports TensorFlow. Entry points:

* ``make_loader_from_config(data_config, split, global_batch)``: this
  process's batches ``{'image': [b, H, W, C] float32 in [-1, 1],
  'label': [b] int32}`` with ``get_state()`` / ``set_state()``;
* ``global_batches(loader, mesh)``: the same batches as global jax arrays;
* ``eval_examples(data_config, split, n)``: fixed evaluation examples;
* ``dataset_info(data_config)``: channels, classes and split sizes.
"""

from stochinterp.data.datasets import (
    DATASET_NAMES,
    DataInfo,
    builder,
    data_source,
    dataset_info,
    eval_examples,
    make_loader_from_config,
    sampled_split,
    validate,
)
from stochinterp.data.loader import global_batches, make_loader
from stochinterp.data.prepare import default_data_dir, resolve_data_dir

__all__ = [
    "DATASET_NAMES",
    "DataInfo",
    "builder",
    "data_source",
    "dataset_info",
    "default_data_dir",
    "eval_examples",
    "global_batches",
    "make_loader",
    "make_loader_from_config",
    "resolve_data_dir",
    "sampled_split",
    "validate",
]
