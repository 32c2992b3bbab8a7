"""The uncoupled baseline of the ImageNet in-painting setting.

The base sample is pure noise; the network receives the mask and the masked
image as channels (the coupled model has the known pixels in its state and
the mask as a channel) but its output is not masked, so the comparison with
``imagenet256_inpaint.py`` isolates the coupling.
"""

from configs import imagenet256_inpaint


def get_config():
    config = imagenet256_inpaint.get_config()
    config.coupling.name = "independent"
    config.coupling.baseline_condition = "inpainting"
    return config
