"""scikit-learn's handwritten digits as a small class-conditional dataset.

``sklearn.datasets.load_digits`` holds 1,797 grey images of 8x8 pixels with
17 levels (0-16) in 10 classes. Stored here as one grey channel, level ``v``
mapped to ``round(v * 255 / 16)``, upsampled by pixel repetition (nearest
neighbour) to the config's size (8, 16 or 32). The split is stratified by
class with a fixed seed: 20% of each class, rounded (359 images), for
``test``, the other 1,438 for ``train``. The writers are not recorded, so a
writer may appear in both splits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZES = (8, 16, 32)
NATIVE_SIZE = 8
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def digits_split(split: str) -> np.ndarray:
    """Indices into ``load_digits()`` of a split, in increasing order.

    For each class, a permutation seeded by ``(SPLIT_SEED, class)`` puts the
    first ``round(TEST_FRACTION * count)`` images of that class in ``test``.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    target = load_digits().target
    test = []
    for label in range(10):
        members = np.flatnonzero(target == label)
        order = np.random.default_rng([SPLIT_SEED, label]).permutation(members)
        test.append(order[: round(TEST_FRACTION * len(members))])
    is_test = np.zeros(len(target), dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def digit_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All digits as ``[1797, size, size, 1]`` uint8 and ``[1797]`` labels."""
    from sklearn.datasets import load_digits

    if image_size not in IMAGE_SIZES:
        raise ValueError(
            f"digits image_size must be one of {IMAGE_SIZES}, got {image_size}"
        )
    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    factor = image_size // NATIVE_SIZE
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    return images[..., None], data.target.astype(np.int64)


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
    """Side of the stored square images."""

    image_size: int = 16


class Digits(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of ``digits/8``, ``digits/16`` and ``digits/32``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [
        DigitsConfig(name=str(size), image_size=size, description=f"{size}x{size}")
        for size in IMAGE_SIZES
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(size, size, 1), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "index": tfds.features.Tensor(shape=(), dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split: str):
        images, labels = digit_images(self.builder_config.image_size)
        for index in digits_split(split).tolist():
            yield (
                index,
                {
                    "image": images[index],
                    "label": labels[index],
                    "index": index,
                },
            )
