"""Evaluates the latest checkpoint of a workdir on the fixed test images.

    python -m launch.evaluate --config configs/inpaint_photos16.py --workdir DIR \\
        --config.sampler.method=dopri5

Uses the same config file as training (sampler and eval fields may be
overridden). Writes ``DIR/eval_<name>.json`` (metrics, with the sampler and
eval settings) and ``DIR/samples/inpaint_<name>.png``, where ``<name>`` is
``<method>_step<N>``, then ``_raw`` for the raw weights, ``_w<scale>`` for a
guidance scale other than 1, ``_n<eval.num_images>``, ``_seed<eval.seed>``
and ``_<tag>`` for ``--tag``. EMA weights unless
``--config.eval.use_ema=False``.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from launch import _common

_common.define_config_flag()
_common.define_output_flags()
flags.adopt_module_key_flags(_common)
flags.DEFINE_string("workdir", None, "workdir of a training run")
FLAGS = flags.FLAGS


def main(argv):
    _common.check_tag(FLAGS.tag)
    config = FLAGS.config
    splits = {"eval.num_images": config.eval.num_images}
    if config.eval.batch:
        splits["eval.batch"] = config.eval.batch
    workdir = _common.start(argv, splits=splits)

    import jax

    from stochinterp import pipeline, sharding
    from stochinterp import workdir as workdir_lib

    mesh = sharding.make_mesh()
    pipeline.check_inpainting(config)
    fid_setup, model, variables, step = pipeline.prepare_sampling(config, workdir, mesh)
    name = _common.output_name(
        config,
        step,
        FLAGS.tag,
        seed=config.eval.seed,
        count=config.eval.num_images,
        batch=config.eval.batch,
    )
    path = os.path.join(workdir, f"eval_{name}.json")
    pipeline.check_output_files(
        path, os.path.join(workdir, "samples", f"inpaint_{name}.png")
    )
    pipeline.warn_if_replacing(path, config)
    metrics = pipeline.evaluate_inpainting(
        config,
        model,
        variables,
        workdir,
        mesh,
        picture=f"inpaint_{name}.png",
        fid_config=fid_setup,
    )
    metrics.update(
        step=step,
        use_ema=config.eval.use_ema,
        eval_settings=config.eval.to_dict(),
    )
    if jax.process_index() == 0:
        workdir_lib.write_json(path, metrics)
        print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    app.run(_common.one_line_input_errors(main), flags_parser=_common.parse_flags)
