"""Super-resolution 8 -> 32 of photo patches (factor 4), offline.

Same coupling as the ImageNet 64 -> 256 setting at a CPU-sized scale.
"""

from configs import inpaint_photos16


def get_config():
    config = inpaint_photos16.get_config()
    config.data.image_size = 32
    config.coupling.name = "superres"
    config.coupling.factor = 4
    config.coupling.sigma = 1.0
    config.train.global_batch = 32
    config.train.num_steps = 4000
    config.train.max_seconds = 0.0
    config.sampler.method = "heun"
    config.sampler.num_steps = 25
    config.sampler.t_min = 0.0
    config.sampler.t_max = 1.0
    return config
