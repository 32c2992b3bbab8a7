"""Image conversions shared by the dataset builders and the loader.

Stored images are ``uint8`` arrays in HWC order; the loader hands the model
``float32`` NHWC arrays in ``[-1, 1]``.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL image mode to 8-bit RGB.

    Grey images repeat the grey value in the three channels: ``L`` and ``1``
    as they are; 16-bit ``I;16`` rescaled by 1/257; 32-bit ``I`` as 8-bit
    values when none exceeds 255, else as 16-bit (1/257, clipped); float
    ``F`` as [0, 1] when none exceeds 1, else as [0, 255] (clipped). Palette
    images are expanded, CMYK uses PIL's conversion
    (``R = (255 - C) * (255 - K) / 255``, and so on), and an alpha channel
    (``RGBA``, ``LA``, ``P`` with transparency) is dropped without
    compositing, as ADM's ImageNet loader does.

    Raises:
      ValueError: a float image holds NaN or infinite values.
    """
    if image.mode == "RGB":
        return image
    _check_finite(image, "float image")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # PIL's own conversion clips at 255 instead of rescaling.
        grey = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and grey.max() > 255):
            grey = grey / 257.0
        elif image.mode == "F" and grey.max() <= 1.0:
            grey = grey * 255.0
        grey = np.clip(np.round(grey), 0, 255)
        image = Image.fromarray(grey.astype(np.uint8))
    return image.convert("RGB")


class _NonFinitePixels(ValueError):
    """A float image decodes but holds NaN or infinite values."""


def _check_finite(image: Image.Image, name: str) -> None:
    if image.mode != "F":  # only float images can hold NaN or infinity
        return
    bad = np.count_nonzero(~np.isfinite(np.asarray(image)))
    if bad:
        raise _NonFinitePixels(
            f"{name} has {bad} non-finite pixel values (NaN or infinity) among "
            f"its {image.width * image.height} float pixels; replace it with an "
            "image of finite values or remove it"
        )


# What PIL raises for a file it cannot decode (or will not: over its
# decompression-bomb pixel limit).
_DECODE_ERRORS = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
    ValueError,
)
# Beyond this aspect ratio (after the resize) only the cropped region is
# resampled.
_MAX_ASPECT = 8


def center_crop_adm(image: Image.Image, size: int) -> np.ndarray:
    """Resizes and centre-crops an image the way ADM prepares ImageNet.

    While the short side is at least ``2 * size`` the image is halved with a
    box filter (new size ``(w // 2, h // 2)``); then a bicubic resize brings
    the short side to ``size`` (the long side to ``round(long * scale)``);
    finally the central ``size x size`` square is cut out, with the extra
    pixel of an odd margin on the bottom/right. For images more than 8 times
    longer than wide (after the resize) only the region under the crop is
    resampled, at the same sample positions: pixels may differ from the
    full resize by 1, and a 2000 x 1 strip does not become a 512000 x 256
    image on the way.

    Args:
      image: a PIL image of any size and mode (converted with ``to_rgb``).
      size: side of the square output, positive.

    Returns:
      ``[size, size, 3]`` uint8 array.
    """
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    image = to_rgb(image)
    while min(image.size) >= 2 * size:
        image = image.resize(
            tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX
        )
    scale = size / min(image.size)
    resized = tuple(round(side * scale) for side in image.size)
    left, top = ((side - size) // 2 for side in resized)
    if max(resized) > _MAX_ASPECT * size:
        # A thin strip: resizing all of it could take gigabytes. Resample only
        # the source region under the crop, at the same sample positions
        # (pixels within 1 of the full resize).
        sx, sy = (side / new for side, new in zip(image.size, resized, strict=True))
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        image = image.resize((size, size), resample=Image.Resampling.BICUBIC, box=box)
        return np.asarray(image)
    array = np.asarray(image.resize(resized, resample=Image.Resampling.BICUBIC))
    return np.ascontiguousarray(array[top : top + size, left : left + size])


def decode_image_file(path: str | os.PathLike, size: int) -> np.ndarray:
    """Reads an image file and returns its ADM centre crop.

    Args:
      path: an image file PIL can read (JPEG, PNG, ...), whatever its name.
      size: side of the square output.

    Returns:
      ``[size, size, 3]`` uint8 array.

    Raises:
      ValueError: the file cannot be read or decoded, or it is a float image
        with NaN or infinite values; the message names it.
    """
    try:
        with Image.open(path) as image:
            image.load()
            _check_finite(image, f"image file {os.fspath(path)!r}")
            return center_crop_adm(image, size)
    except _NonFinitePixels:
        raise
    except _DECODE_ERRORS as err:
        raise ValueError(
            f"cannot decode image file {os.fspath(path)!r} ({err}). The file is "
            "corrupt, truncated or not an image: remove it, or replace it with a "
            "good copy from the original archive, then build the dataset again"
        ) from err


def decode_image_bytes(data: bytes, size: int, name: str = "<bytes>") -> np.ndarray:
    """Like ``decode_image_file`` for encoded bytes (e.g. a stored JPEG)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            _check_finite(image, f"stored image {name!r}")
            return center_crop_adm(image, size)
    except _NonFinitePixels:
        raise
    except _DECODE_ERRORS as err:
        raise ValueError(f"cannot decode stored image {name!r} ({err})") from err


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """Maps uint8 ``[..., H, W, C]`` pixels to float32 in ``[-1, 1]``.

    Raises:
      ValueError: for fewer than 3 axes, or another dtype than uint8 (float
        images in [0, 1], 16-bit pixels): convert those to uint8 first, as
        ``to_rgb`` does for PIL images.
    """
    images = np.asarray(images)
    _check_image_axes("to_unit_range", images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"to_unit_range takes uint8 pixels in [0, 255], got dtype "
            f"{images.dtype}; convert the images to uint8 first"
        )
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def from_unit_range(images: np.ndarray) -> np.ndarray:
    """Inverse of ``to_unit_range``, clipping and rounding to uint8.

    Values a little outside [-1, 1] (a sampler's overshoot) are clipped.

    Args:
      images: ``[..., H, W, C]`` floats in [-1, 1].

    Returns:
      ``[..., H, W, C]`` uint8 pixels.

    Raises:
      ValueError: for fewer than 3 axes, a dtype that is not floating point
        (uint8 pixels are already converted), or a NaN or infinite value.
    """
    images = np.asarray(images)
    _check_image_axes("from_unit_range", images)
    # JAX hands bfloat16 over as a float type numpy does not class as floating.
    if not (
        np.issubdtype(images.dtype, np.floating) or images.dtype.name == "bfloat16"
    ):
        raise ValueError(
            f"from_unit_range takes float images in [-1, 1], got dtype {images.dtype}"
        )
    wide = images.astype(np.float64)  # a float32 cast could overflow to inf
    finite = np.isfinite(wide)
    if not finite.all():
        raise ValueError(
            f"from_unit_range takes finite values in [-1, 1], got "
            f"{np.count_nonzero(~finite)} non-finite values: "
            f"{np.unique(images[~finite]).tolist()}"
        )
    pixels = (np.clip(wide, -1.0, 1.0) + 1.0) * 127.5
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _check_image_axes(name: str, images: np.ndarray) -> None:
    if images.ndim < 3:
        raise ValueError(
            f"{name} takes [..., H, W, C] images, got shape {images.shape}"
        )
