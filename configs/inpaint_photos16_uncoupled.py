"""Uncoupled baseline of the CPU main job: noise base, same conditioning.

Compare its ``metrics.json`` with the coupled main job's to see what the
coupling buys at equal budget.
"""

from configs import inpaint_photos16


def get_config():
    config = inpaint_photos16.get_config()
    config.coupling.name = "independent"
    config.coupling.baseline_condition = "inpainting"
    return config
