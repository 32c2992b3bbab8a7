"""Class-conditional generation of scikit-learn's digits with guidance.

Independent Gaussian base, labels through the class embedding, dropped with
probability 0.1 to the null class for classifier-free guidance; choose the
guidance scale at sampling time with ``--config.sampler.guidance_scale``.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.name = "digits"
    config.data.image_size = 16
    config.data.random_flip = False  # digits are not mirror-symmetric

    config.coupling.name = "independent"
    config.coupling.num_classes = 10
    config.coupling.p_uncond = 0.1

    config.model.dim = 32
    config.model.dim_mults = (1, 2, 2)
    config.optim.learning_rate = 1e-3

    config.train.global_batch = 64
    config.train.num_steps = 2000
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.ema_decay = 0.995

    config.sampler.method = "heun"
    config.sampler.num_steps = 25
    config.sampler.t_min = 0.0
    config.sampler.t_max = 1.0
    config.sampler.guidance_scale = 2.0
    return config
