"""The CPU main job: in-painting 16x16 photo patches with the coupling.

A 1.3M-parameter version of the paper's U-Net (width 32, multipliers 1, 2, 2,
full attention in the middle, the per-level linear attention dropped: at this
width it costs half of every step on a CPU), trained for 200 s on the
CPU's cores; 8x8 tile grid with p = 0.3 as in the paper. The learning rate is
1e-3 rather than the paper's 2e-4, which is too slow for this budget.
Training stops after ``train.num_steps`` or ``train.max_seconds``, whichever
comes first; set ``--config.train.max_seconds=0`` for a fixed step count.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.name = "photo_patches"
    config.data.image_size = 16

    config.coupling.name = "inpainting"

    config.model.dim = 32
    config.model.dim_mults = (1, 2, 2)
    config.model.linear_attention = False

    config.optim.learning_rate = 1e-3

    config.train.global_batch = 64
    config.train.num_steps = 3000
    config.train.max_seconds = 200.0
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
