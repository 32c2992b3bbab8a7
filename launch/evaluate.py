"""Evaluates the latest checkpoint of a workdir on the fixed test images.

    python -m launch.evaluate --config configs/inpaint_photos16.py --workdir DIR \\
        --config.sampler.method=dopri5

Uses the same config file as training (sampler and eval fields may be
overridden). Writes ``DIR/eval_<method>.json`` and
``DIR/samples/inpaint_<method>.png``. EMA weights unless
``--config.eval.use_ema=False``.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from launch import _common

_common.define_config_flag()
flags.adopt_module_key_flags(_common)
flags.DEFINE_string("workdir", None, "workdir of a training run")
FLAGS = flags.FLAGS


def main(argv):
    workdir = _common.start(argv)
    config = FLAGS.config

    import jax

    from stochinterp import pipeline, sharding

    mesh = sharding.make_mesh()
    pipeline.check_inpainting(config)
    pipeline.validate_sampling(config, mesh)
    pipeline.check_trained_workdir(config, workdir)
    pipeline.check_held_out_size(config, config.eval.num_images)
    model, variables, step = pipeline.load_variables(
        config, workdir, mesh, config.eval.use_ema
    )
    method = config.sampler.method
    metrics = pipeline.evaluate_inpainting(
        config, model, variables, workdir, mesh, picture=f"inpaint_{method}.png"
    )
    metrics.update(step=step, use_ema=config.eval.use_ema)
    if jax.process_index() == 0:
        path = os.path.join(workdir, f"eval_{method}.json")
        with open(path, "w") as f:
            json.dump(metrics, f, indent=2)
        print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    app.run(_common.one_line_input_errors(main), flags_parser=_common.parse_flags)
