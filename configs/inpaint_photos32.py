"""In-painting 32x32 photo patches: the main job at twice the side.

About four times slower per step than 16x16 on a CPU; give it a longer
budget for samples of the same quality.
"""

from configs import inpaint_photos16


def get_config():
    config = inpaint_photos16.get_config()
    config.data.image_size = 32
    config.train.global_batch = 32
    config.train.num_steps = 4000
    config.train.max_seconds = 0.0
    return config
