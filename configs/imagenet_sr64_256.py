"""The paper's ImageNet super-resolution setting, 64 -> 256.

x0 = U(D(x1)) + sigma * zeta with box-average D (factor 4), nearest U and
sigma = 1; the clean U(D(x1)) is fed as 3 extra input channels. The
class-conditional U-Net (6 input channels, 1000 classes) has 269,650,195
parameters.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.name = "imagenet_folder"
    config.data.image_size = 256
    config.data.eval_split = "validation"

    config.coupling.name = "superres"
    config.coupling.factor = 4
    config.coupling.sigma = 1.0
    config.coupling.num_classes = 1000

    config.train.global_batch = 32
    config.train.num_steps = 200_000
    return config
