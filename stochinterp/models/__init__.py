"""Networks of stochinterp."""

from stochinterp.models.unet import UNet, count_params

__all__ = ["UNet", "count_params"]
