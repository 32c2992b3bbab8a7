"""Pixel conversions between stored uint8 images and the model's [-1, 1]."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from stochinterp.data import transforms


def test_uint8_round_trip_is_exact():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    images = transforms.to_unit_range(pixels)
    assert images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0
    np.testing.assert_array_equal(transforms.from_unit_range(images), pixels)


@pytest.mark.parametrize(
    "images",
    [
        np.ones((1, 2, 2, 3), np.float32),  # a float image in [0, 1]
        np.full((1, 2, 2, 3), 65535, np.uint16),
        np.zeros((2, 2, 3), np.int64),
        np.zeros((2, 2, 3), bool),
    ],
)
def test_to_unit_range_takes_uint8_only(images):
    with pytest.raises(ValueError, match=f"uint8 .* got dtype {images.dtype}"):
        transforms.to_unit_range(images)


def test_both_directions_need_image_axes():
    with pytest.raises(ValueError, match=r"\[\.\.\., H, W, C\] .* shape \(8, 8\)"):
        transforms.to_unit_range(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"\[\.\.\., H, W, C\] .* shape \(\)"):
        transforms.from_unit_range(np.float32("nan"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_from_unit_range_refuses_non_finite_values(bad):
    images = np.zeros((1, 2, 2, 3), np.float32)
    images[0, 1, 0, 2] = bad
    with pytest.raises(ValueError, match=rf"finite .* 1 non-finite values: \[{bad}\]"):
        transforms.from_unit_range(images)


def test_from_unit_range_refuses_pixels_already_converted():
    with pytest.raises(ValueError, match="float images .* got dtype uint8"):
        transforms.from_unit_range(np.full((1, 2, 2, 3), 255, np.uint8))


def test_from_unit_range_clips_overshoot_and_takes_bfloat16():
    images = jnp.array([-1.3, -1.0, 0.0, 1.0, 1.2], jnp.bfloat16).reshape(1, 1, 5, 1)
    got = transforms.from_unit_range(images).ravel()
    np.testing.assert_array_equal(got, [0, 0, 128, 255, 255])


def test_finite_values_far_outside_the_range_are_clipped_not_called_infinite():
    images = np.full((2, 2, 3), 1e39)  # float64, beyond float32's range
    assert np.array_equal(
        transforms.from_unit_range(images), np.full((2, 2, 3), 255, np.uint8)
    )
    assert np.array_equal(
        transforms.from_unit_range(-images), np.zeros((2, 2, 3), np.uint8)
    )


def test_a_float_image_with_nan_is_named_and_finite_ones_still_decode(tmp_path):
    grey = np.random.default_rng(0).random((20, 20)).astype(np.float32)
    path = tmp_path / "float.png"  # a TIFF under an image name, as in ImageNet
    Image.fromarray(grey, mode="F").save(path, format="TIFF")
    want = np.round(grey.astype(np.float64) * 255).astype(np.uint8)
    want = transforms.center_crop_adm(Image.fromarray(want), 8)
    np.testing.assert_array_equal(transforms.decode_image_file(path, 8), want)

    grey[5:10, 5:10] = np.nan
    grey[0, 0] = np.inf
    Image.fromarray(grey, mode="F").save(path, format="TIFF")
    with pytest.raises(ValueError) as raised:
        transforms.decode_image_file(path, 8)
    message = str(raised.value)
    assert message.startswith(f"image file '{path}' has 26 non-finite pixel values")
    assert "\n" not in message
    with pytest.raises(ValueError, match="has 26 non-finite pixel values"):
        transforms.to_rgb(Image.fromarray(grey, mode="F"))
