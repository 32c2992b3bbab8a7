"""From a data config to built datasets, loaders and evaluation examples.

A data config is an ``ml_collections.ConfigDict`` (or any object with these
attributes) with the fields

* ``name``: ``'photo_patches'``, ``'digits'``, ``'imagenet_folder'`` or
  ``'imagenet2012'``;
* ``image_size``: side of the square images (photo_patches: 16 or 32;
  digits: 8, 16 or 32; imagenet_folder and imagenet2012: any size >= 8);
* ``data_dir``: where TFDS datasets are built and read; empty means
  ``$STOCHINTERP_DATA_DIR`` or else ``~/.cache/stochinterp/tfds``;
* ``source_dir``: the ImageNet folder tree (``imagenet_folder`` only);
* ``random_flip``: flip training images left-right at random;
* ``shuffle_seed``: seed of the training order and of the flips.

Datasets other than ``imagenet2012`` are built on first use and reused. With
several JAX processes the first ``builder`` call for a dataset (made by every
function here) is collective: process 0 builds while the others wait.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from stochinterp import input_errors
from stochinterp.data import (
    digits,
    imagenet,
    loader,
    photo_patches,
    prepare,
    transforms,
)

DATASET_NAMES = ("photo_patches", "digits", "imagenet_folder", "imagenet2012")
_EVAL_SPLIT = {
    "photo_patches": "test",
    "digits": "test",
    "imagenet_folder": "validation",
    "imagenet2012": "validation",
}


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about a dataset.

    Attributes:
      name: the dataset name.
      image_size: side of the square images.
      channels: 3 (RGB) or 1 (grey, digits).
      num_classes: number of labels.
      split_sizes: examples per split, e.g. ``{'train': 28093, 'test': 9354}``.
      eval_split: the held-out split (``'test'`` or ``'validation'``).
      class_names: one name per label.
    """

    name: str
    image_size: int
    channels: int
    num_classes: int
    split_sizes: dict[str, int]
    eval_split: str
    class_names: tuple[str, ...]


def _field(data_config: Any, key: str, default: Any = None) -> Any:
    if hasattr(data_config, "get"):
        return data_config.get(key, default)
    return getattr(data_config, key, default)


def validate(data_config: Any) -> None:
    """Raises ValueError naming the field if the config cannot be served."""
    name = _field(data_config, "name")
    if name not in DATASET_NAMES:
        raise ValueError(
            f"data.name={name!r} is unknown; choose one of {DATASET_NAMES}"
        )
    size = _field(data_config, "image_size")
    allowed = {
        "photo_patches": photo_patches.PATCH_SIZES,
        "digits": digits.IMAGE_SIZES,
    }.get(name)
    if allowed is not None and size not in allowed:
        raise ValueError(
            f"data.image_size={size!r} is not available for {name}; choose one of "
            f"{allowed}"
        )
    if allowed is None and (not isinstance(size, int) or size < 8):
        raise ValueError(
            f"data.image_size={size!r} is not valid for {name}; use an integer >= 8 "
            "(e.g. 64, 128, 256)"
        )
    flip = _field(data_config, "random_flip", False)
    if not isinstance(flip, bool):
        raise ValueError(f"data.random_flip={flip!r} must be True or False")
    seed = _field(data_config, "shuffle_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"data.shuffle_seed={seed!r} must be an integer in [0, 2**32)")
    eval_split = _field(data_config, "eval_split", "")
    if eval_split not in ("", "train", _EVAL_SPLIT[name]):
        raise ValueError(
            f"data.eval_split={eval_split!r} is not a split of {name}; choose "
            f"'' (the held-out split), 'train' or {_EVAL_SPLIT[name]!r}"
        )
    source_dir = _field(data_config, "source_dir")
    if name == "imagenet_folder" and source_dir and not os.path.isdir(source_dir):
        built = imagenet.imagenet_folder_builder(
            size, prepare.resolve_data_dir(_field(data_config, "data_dir")), None
        )
        if not built.is_prepared():
            raise ValueError(
                f"data.source_dir={source_dir!r} is not a folder ("
                f"{imagenet.LAYOUT_HELP})"
            )
    if name == "imagenet_folder" and not _field(data_config, "source_dir"):
        built = imagenet.imagenet_folder_builder(
            size, prepare.resolve_data_dir(_field(data_config, "data_dir")), None
        )
        if not built.is_prepared():
            raise ValueError(
                "data.source_dir is empty and imagenet_folder/"
                f"{size} is not built in {built.data_dir!r}; set data.source_dir "
                f"({imagenet.LAYOUT_HELP})"
            )


def builder(data_config: Any) -> tfds.core.DatasetBuilder:
    """The dataset's TFDS builder, built into ``data_dir`` if needed."""
    validate(data_config)
    name = _field(data_config, "name")
    size = _field(data_config, "image_size")
    data_dir = prepare.resolve_data_dir(_field(data_config, "data_dir"))
    if name == "imagenet2012":
        return imagenet.imagenet2012_builder(data_dir)
    if name == "photo_patches":
        make = functools.partial(
            photo_patches.PhotoPatches, config=str(size), data_dir=data_dir
        )
    elif name == "digits":
        make = functools.partial(digits.Digits, config=str(size), data_dir=data_dir)
    else:
        source_dir = _field(data_config, "source_dir") or None
        make = functools.partial(
            imagenet.imagenet_folder_builder, size, data_dir, source_dir
        )
    built = prepare.prepare(make, f"{name}/{size}@{data_dir}", data_dir)
    if name == "imagenet_folder" and not source_dir:
        _report_reuse(built)
    return built


_REUSE_REPORTED: set[str] = set()


def _report_reuse(built: tfds.core.DatasetBuilder) -> None:
    """Logs once per process which build an empty ``data.source_dir`` reads."""
    if built.data_dir in _REUSE_REPORTED:
        return
    _REUSE_REPORTED.add(built.data_dir)
    logging.info(
        "data.source_dir is empty: reading the dataset built in %s from %s",
        built.data_dir,
        (built.info.metadata or {}).get("source_dir") or "a folder it did not record",
    )


def _decode_imagenet2012(record: dict[str, Any], size: int) -> tuple[np.ndarray, int]:
    image = record["image"]
    if isinstance(image, bytes | np.bytes_):
        name = record.get("file_name", b"<imagenet2012 record>")
        name = name.decode() if isinstance(name, bytes) else str(name)
        try:
            image = transforms.decode_image_bytes(bytes(image), size, name)
        except ValueError as error:  # a damaged copy: no traceback needed
            raise input_errors.mark(
                ValueError(
                    f"{error} in the prepared imagenet2012: prepare it again or "
                    "point data.data_dir at a good copy"
                )
            ) from error
    return image, int(record["label"])


def data_source(data_config: Any, split: str) -> tuple[Sequence[Any], loader.DecodeFn]:
    """The random-access records of a split and the function decoding them.

    Raises:
      ValueError: the split does not exist; the message lists those that do.
    """
    built = builder(data_config)
    if split not in built.info.splits:
        raise ValueError(
            f"split {split!r} does not exist in {built.info.full_name} at "
            f"{built.data_dir!r}; available: {sorted(built.info.splits)}"
        )
    if _field(data_config, "name") == "imagenet2012":
        size = _field(data_config, "image_size")
        source = built.as_data_source(
            split=split, decoders={"image": tfds.decode.SkipDecoding()}
        )
        return source, functools.partial(_decode_imagenet2012, size=size)
    return built.as_data_source(split=split), loader.decode_record


def sampled_split(data_config: Any) -> str:
    """The split that evaluation and sampling read: ``data.eval_split``, or
    the dataset's held-out split when that is empty."""
    return (
        _field(data_config, "eval_split", "")
        or _EVAL_SPLIT[_field(data_config, "name")]
    )


def dataset_info(data_config: Any) -> DataInfo:
    """Image size, channels, classes and split sizes (builds if needed)."""
    built = builder(data_config)
    name = _field(data_config, "name")
    label = built.info.features["label"]
    return DataInfo(
        name=name,
        image_size=_field(data_config, "image_size"),
        channels=1 if name == "digits" else 3,
        num_classes=label.num_classes,
        split_sizes={k: v.num_examples for k, v in built.info.splits.items()},
        eval_split=_EVAL_SPLIT[name],
        class_names=tuple(label.names),
    )


def make_loader_from_config(
    data_config: Any,
    split: str,
    global_batch: int,
    *,
    train: bool = True,
    seed: int | None = None,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
) -> grain.DatasetIterator:
    """A ``loader.make_loader`` iterator over a split named by the config.

    Args:
      data_config: the data config (see the module docstring).
      split: ``'train'``, ``'test'`` or ``'validation'``.
      global_batch: examples per global batch.
      train: shuffle every epoch and flip if ``data_config.random_flip``;
        False reads the records in order without flips.
      seed: overrides ``data_config.shuffle_seed``.
      num_epochs: None for an endless stream (default when ``train``);
        evaluation (``train=False``) defaults to one pass.
      process_index: overrides ``jax.process_index()``.
      process_count: overrides ``jax.process_count()``.
      worker_count: grain worker processes.
    """
    source, decode = data_source(data_config, split)
    if seed is None:
        seed = int(_field(data_config, "shuffle_seed", 0))
    if not train and num_epochs is None:
        num_epochs = 1
    return loader.make_loader(
        source,
        global_batch,
        seed=seed,
        shuffle=train,
        random_flip=train and bool(_field(data_config, "random_flip", False)),
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        decode=decode,
        worker_count=worker_count,
    )


def _as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer (numpy's too), else None."""
    if isinstance(value, bool | np.bool_):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def eval_examples(
    data_config: Any, split: str | None = None, n: int = 16, start: int = 0
) -> dict:
    """``n`` records of a split from record ``start``, in stored order, no flips.

    Args:
      data_config: the data config.
      split: None or empty: the held-out split (``DataInfo.eval_split``:
        ``'test'`` for photo_patches and digits, ``'validation'`` for the
        ImageNet datasets).
      n: number of examples.
      start: index of the first one.

    Returns:
      ``{'image': [n, H, W, C] float32 in [-1, 1], 'label': [n] int32}``.
    """
    if not split:
        validate(data_config)
        split = _EVAL_SPLIT[_field(data_config, "name")]
    source, decode = data_source(data_config, split)
    size = len(source)
    first, count = _as_int(start), _as_int(n)
    if first is None or not 0 <= first < size:
        raise ValueError(
            f"start={start!r} must be an integer in [0, {size}): split "
            f"{split!r} holds {size} records"
        )
    if count is None or not 0 < count <= size - first:
        raise ValueError(
            f"n={n!r} examples requested from record {first} of split {split!r}, "
            f"which holds {size}; choose 1 <= n <= {size - first}"
        )
    start, n = first, count
    records = source.__getitems__(list(range(start, start + n)))
    decoded = [decode(record) for record in records]
    images = np.stack([image for image, _ in decoded])
    labels = np.asarray([label for _, label in decoded], dtype=np.int32)
    return {"image": transforms.to_unit_range(images), "label": labels}
