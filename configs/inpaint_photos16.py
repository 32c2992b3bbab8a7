"""The CPU main job: in-painting 16x16 photo patches with the coupling.

A 1.5M-parameter version of the paper's U-Net, trained for a few minutes on
two CPU devices; 8x8 tile grid with p = 0.3 as in the paper. The learning
rate is 1e-3 rather than the paper's 2e-4, which is too slow for this budget.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.name = "photo_patches"
    config.data.image_size = 16

    config.coupling.name = "inpainting"

    config.model.dim = 32
    config.model.dim_mults = (1, 2, 2)

    config.optim.learning_rate = 1e-3

    config.train.global_batch = 64
    config.train.num_steps = 1000
    config.train.log_every = 50
    config.train.checkpoint_every = 250
    config.train.ema_decay = 0.995
    config.train.async_checkpoint = True

    config.sampler.method = "euler"
    config.sampler.num_steps = 20
    config.sampler.t_min = 0.0
    config.sampler.t_max = 1.0

    config.eval.num_images = 64
    config.eval.grid_images = 16
    return config
