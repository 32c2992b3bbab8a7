"""Patches of natural colour photographs that ship with scikit-image/-learn.

Seven photographs load offline from the installed packages (see ``PHOTOS``;
the label of a patch is the index of its photograph there). Each photograph
is cut into two regions that share no pixel: the right ``TEST_FRACTION`` of
its columns is the test region, the rest the train region. Each region is
used at three scales (full, and box-downscaled by 2 and 4 inside the region),
and square patches are cropped at seeded uniform random positions inside the
scaled region, ``PATCHES_PER_AREA`` patches per ``patch x patch`` area on
average. Every example records the rectangle of original-photo pixels it was
computed from (``source_box``), so the split can be audited by coordinates.

Left out on purpose: grey or synthetic images (camera, text, logo, colour
wheel), the microscopy stain (immunohistochemistry), the astronomy image
(hubble_deep_field, mostly black sky with point sources), the retina fundus
photograph (a medical image with a black surround), the right view of the
motorcycle stereo pair (a near copy of the left view) and ``cat`` (the same
file as chelsea).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

TEST_FRACTION = 0.25
SCALES = (1, 2, 4)
PATCHES_PER_AREA = 4
PATCH_SIZES = (16, 32)


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        return image[0] if isinstance(image, tuple) else image

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


@dataclasses.dataclass(frozen=True)
class Photo:
    """One source photograph: its name, loader and licence."""

    name: str
    load: Callable[[], np.ndarray]
    licence: str


PHOTOS: tuple[Photo, ...] = (
    Photo(
        "astronaut",
        _skimage("astronaut"),
        "skimage.data.astronaut: Eileen Collins, NASA; public domain",
    ),
    Photo(
        "chelsea",
        _skimage("chelsea"),
        "skimage.data.chelsea: CC0, photographer Stefan van der Walt",
    ),
    Photo(
        "coffee",
        _skimage("coffee"),
        "skimage.data.coffee: CC0, photographer Rachel Michetti",
    ),
    Photo(
        "rocket",
        _skimage("rocket"),
        "skimage.data.rocket: SpaceX launch photo, released into the public domain",
    ),
    Photo(
        "motorcycle",
        _skimage("stereo_motorcycle"),
        "skimage.data.stereo_motorcycle (left view): Middlebury 2014 stereo "
        "benchmark (Scharstein et al., GCPR 2014); the loader states no licence",
    ),
    Photo(
        "china",
        _sklearn("china.jpg"),
        "sklearn load_sample_image('china.jpg'): CC BY 2.0, danielbuechele (Flickr)",
    ),
    Photo(
        "flower",
        _sklearn("flower.jpg"),
        "sklearn load_sample_image('flower.jpg'): CC BY 2.0, Flickr user "
        "vultilion (the docstring's attribution line names danielbuechele)",
    ),
)


def load_photo(index: int) -> np.ndarray:
    """Returns photograph ``index`` of ``PHOTOS`` as ``[H, W, 3]`` uint8."""
    photo = PHOTOS[index]
    try:
        image = np.asarray(photo.load())
    except Exception as err:
        raise RuntimeError(
            f"photograph {photo.name!r} ({photo.licence}) could not be loaded "
            f"offline ({err}); install scikit-image>=0.24 and scikit-learn>=1.4 "
            "with their bundled data files"
        ) from err
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise RuntimeError(
            f"photograph {photo.name!r} has shape {image.shape} and dtype "
            f"{image.dtype}; expected [H, W, 3] uint8"
        )
    return image


def photo_regions(height: int, width: int) -> dict[str, tuple[int, int, int, int]]:
    """The train and test regions of a ``height x width`` photograph.

    Returns:
      ``{'train': box, 'test': box}`` with ``box = (top, left, bottom, right)``
      in pixels, bottom/right exclusive; the test region is the right
      ``TEST_FRACTION`` of the columns.
    """
    split = width - round(width * TEST_FRACTION)
    return {"train": (0, 0, height, split), "test": (0, split, height, width)}


def box_downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Averages ``factor x factor`` blocks of ``[H, W, C]`` uint8, rounding.

    Rows and columns beyond the last whole block are dropped.
    """
    h, w = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[: h * factor, : w * factor].astype(np.float64)
    blocks = blocks.reshape(h, factor, w, factor, image.shape[2])
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Patch:
    """A patch and where it came from.

    Attributes:
      image: ``[patch, patch, 3]`` uint8.
      label: index of the photograph in ``PHOTOS``.
      scale: downscale factor (1, 2 or 4).
      source_box: ``(top, left, bottom, right)`` in original-photo pixels.
    """

    image: np.ndarray
    label: int
    scale: int
    source_box: tuple[int, int, int, int]


def region_patches(
    photo: np.ndarray,
    label: int,
    split: str,
    patch: int,
    seed: int,
) -> Iterator[Patch]:
    """Yields the seeded random patches of one region of one photograph.

    Args:
      photo: ``[H, W, 3]`` uint8 photograph.
      label: its index in ``PHOTOS`` (also mixed into the seed).
      split: ``'train'`` or ``'test'``.
      patch: patch side in pixels.
      seed: the sampling seed; the same arguments give the same patches.
    """
    top, left, bottom, right = photo_regions(*photo.shape[:2])[split]
    region = photo[top:bottom, left:right]
    for scale in SCALES:
        scaled = box_downscale(region, scale)
        h, w = scaled.shape[:2]
        if h < patch or w < patch:
            continue
        count = (PATCHES_PER_AREA * h * w) // (patch * patch)
        split_id = 0 if split == "train" else 1
        rng = np.random.default_rng([seed, patch, label, scale, split_id])
        ys = rng.integers(0, h - patch + 1, size=count)
        xs = rng.integers(0, w - patch + 1, size=count)
        for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
            box = (
                top + y * scale,
                left + x * scale,
                top + (y + patch) * scale,
                left + (x + patch) * scale,
            )
            yield Patch(scaled[y : y + patch, x : x + patch], label, scale, box)


def photo_patches(split: str, patch: int, seed: int = 0) -> Iterator[Patch]:
    """Yields all patches of a split, photograph by photograph."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    for label in range(len(PHOTOS)):
        yield from region_patches(load_photo(label), label, split, patch, seed)


@dataclasses.dataclass
class PhotoPatchesConfig(tfds.core.BuilderConfig):
    """Patch side and sampling seed of a ``photo_patches`` build."""

    patch_size: int = 16
    seed: int = 0


class PhotoPatches(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of ``photo_patches/16`` and ``photo_patches/32``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [
        PhotoPatchesConfig(
            name=str(size), patch_size=size, description=f"{size}x{size} patches"
        )
        for size in PATCH_SIZES
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.patch_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(size, size, 3), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(
                        names=[photo.name for photo in PHOTOS]
                    ),
                    "scale": tfds.features.Tensor(shape=(), dtype=np.int64),
                    "source_box": tfds.features.Tensor(shape=(4,), dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split: str):
        config = self.builder_config
        for i, p in enumerate(photo_patches(split, config.patch_size, config.seed)):
            yield (
                i,
                {
                    "image": p.image,
                    "label": p.label,
                    "scale": p.scale,
                    "source_box": np.asarray(p.source_box, dtype=np.int64),
                },
            )
