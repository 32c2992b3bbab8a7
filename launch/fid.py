"""FID of many held-out images, sampled a batch at a time (FID-50k).

    python -m launch.fid --config configs/imagenet256_inpaint.py --workdir DIR \\
        --config.eval.fid_weights=inception_fid.npz --num_samples 50000 --batch 250

Samples the first ``num_samples`` held-out images from the latest checkpoint,
``batch`` at a time, and keeps only running feature statistics: memory does
not grow with ``num_samples``. Works for every coupling. Writes
``DIR/fid_<name>.json`` (``fid_sample``; for in-painting ``fid_mean_fill``,
for super-resolution ``fid_upsampled``; the reference; the sampler settings
and calls per batch) and ``DIR/samples/fid_<name>.png`` (rows: x0, sample,
ground truth, of the first batch), where ``<name>`` is that of
``launch.sample`` followed by ``_b<batch>`` (batch c draws with
``fold_in(key(seed), c)``: another batch size gives other samples).
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
flags.DEFINE_integer("num_samples", 50_000, "images to sample (devices divide it)")
flags.DEFINE_integer("batch", 256, "images sampled at a time (devices divide it)")
flags.DEFINE_integer("seed", 0, "seed for the coupling and SDE noise")
FLAGS = flags.FLAGS


def check_flags(config, mesh) -> None:
    """Raises before any work for a missing weight file or a bad batch."""
    if not config.eval.fid_weights:
        raise ValueError(
            "launch.fid needs --config.eval.fid_weights=<converted Inception "
            "weights>; make them with python -m launch.convert_inception"
        )
    devices = mesh.devices.size
    batch = FLAGS.batch
    if batch < 1 or batch % devices:
        raise ValueError(
            f"--batch={batch} must be a positive multiple of the number of "
            f"devices ({devices})"
        )


def main(argv):
    _common.check_tag(FLAGS.tag)
    splits = {"--num_samples": FLAGS.num_samples, "--batch": FLAGS.batch}
    workdir = _common.start(argv, splits=splits)
    config = FLAGS.config

    import jax
    import numpy as np

    from stochinterp import evaluate, input_errors, pipeline, sharding
    from stochinterp import workdir as workdir_lib

    mesh = sharding.make_mesh()
    with input_errors.checking_input():
        check_flags(config, mesh)
    setup, model, variables, step = pipeline.prepare_sampling(
        config, workdir, mesh, FLAGS.num_samples, FLAGS.seed
    )
    batch = min(FLAGS.batch, FLAGS.num_samples)
    name = _common.output_name(
        config, step, "", seed=FLAGS.seed, count=FLAGS.num_samples
    )
    name += f"_b{batch}" + (f"_{FLAGS.tag}" if FLAGS.tag else "")
    json_path = os.path.join(workdir, f"fid_{name}.json")
    picture = os.path.join(workdir, "samples", f"fid_{name}.png")
    pipeline.check_output_files(json_path, picture)
    pipeline.warn_if_replacing(json_path, config)
    metrics, (x1, samples, x0) = pipeline.held_out_fid(
        config,
        model,
        variables,
        mesh,
        setup,
        FLAGS.num_samples,
        batch,
        FLAGS.seed,
    )
    metrics.update(step=step, use_ema=config.eval.use_ema, seed=FLAGS.seed)
    if jax.process_index() != 0:
        return
    k = min(config.eval.grid_images, len(x1))
    os.makedirs(os.path.dirname(picture), exist_ok=True)
    evaluate.save_grid(picture, [np.clip(x0[:k], -1, 1), samples[:k], x1[:k]])
    # Last: its presence means a complete run.
    workdir_lib.write_json(json_path, metrics)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    app.run(_common.one_line_input_errors(main), flags_parser=_common.parse_flags)
