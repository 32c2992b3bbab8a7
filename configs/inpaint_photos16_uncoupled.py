"""Uncoupled baseline of the CPU main job: noise base, same information.

The network gets the mask and the known pixels as conditioning channels
(the coupled model gets the mask as a channel and the known pixels in its
state, where they never move); its output is not masked.

Compare its ``metrics.json`` with the coupled main job's to see what the
coupling buys at equal budget.
"""

from configs import inpaint_photos16


def get_config():
    config = inpaint_photos16.get_config()
    config.coupling.name = "independent"
    config.coupling.baseline_condition = "inpainting"
    return config
