"""The paper's ImageNet 256x256 in-painting setting (coupled).

8x8 tile grid, each tile hidden with p = 0.3; class-conditional U-Net
(dim 256, dim_mults (1, 1, 2, 3, 4)); Adam 2e-4, x0.99 every 1000 steps,
batch 32, 200k steps; Dopri5 sampling at 1e-5 on [1e-3, 1 - 1e-3].
Point ``data.source_dir`` at an ImageNet folder (see the README).
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.name = "imagenet_folder"
    config.data.image_size = 256
    config.data.eval_split = "validation"

    config.coupling.name = "inpainting"
    config.coupling.grid = 8
    config.coupling.p = 0.3
    config.coupling.num_classes = 1000

    config.train.global_batch = 32
    config.train.num_steps = 200_000
    config.eval.num_images = 64
    return config
