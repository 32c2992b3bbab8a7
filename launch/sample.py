"""Samples from the latest checkpoint of a workdir.

    python -m launch.sample --config configs/inpaint_photos16.py --workdir DIR \\
        --num_samples 16

The coupling is drawn on the first ``num_samples`` held-out images (their
masks, low-resolution versions or labels condition the samples). Writes
``DIR/samples/samples_<name>.npz`` (x0, samples, ground truth; the
coupling's ``mask`` (1 = known pixel), image conditioning ``cond`` and
``labels`` where it has them; and as JSON text ``sampling``: the sampler settings
and what the sampler did, see ``pipeline.sampling_record``; the samples
are the sampler's end points, not clipped) and
``DIR/samples/samples_<name>.png`` (rows: base sample x0, sample, ground
truth, clipped to [-1, 1]), where ``<name>`` is ``<method>_step<N>``, then
``_raw`` for the raw weights, ``_w<scale>`` for a guidance scale other than
1, ``_n<num_samples>``, ``_seed<k>`` and ``_<tag>`` for ``--tag``.

With ``--config.eval.fid_weights=W.npz`` the record also holds FID
(``stochinterp.fid``): ``fid_sample`` against the ground truth (or against
``eval.fid_reference``'s statistics) and the baseline of
``stochinterp.fid_eval.baselines``: for super-resolution ``fid_upsampled`` of
the upsampled low-resolution images, for in-painting ``fid_mean_fill`` of the
mean-filled masked images.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags

from launch import _common

_common.define_config_flag()
_common.define_output_flags()
flags.adopt_module_key_flags(_common)
flags.DEFINE_string("workdir", None, "workdir of a training run")
flags.DEFINE_integer("num_samples", 16, "number of samples (multiple of the devices)")
flags.DEFINE_integer("seed", 0, "seed for the coupling and SDE noise")
FLAGS = flags.FLAGS
_FID_SETS = ("fid_sample", "fid_upsampled", "fid_mean_fill")


def main(argv):
    if FLAGS.num_samples < 1:
        raise SystemExit(f"error: --num_samples must be >= 1, got {FLAGS.num_samples}")
    _common.check_tag(FLAGS.tag)
    workdir = _common.start(argv, splits={"--num_samples": FLAGS.num_samples})
    config = FLAGS.config

    import json

    import jax
    import numpy as np

    from stochinterp import evaluate, fid_eval, pipeline, sharding

    mesh = sharding.make_mesh()
    fid_setup, model, variables, step = pipeline.prepare_sampling(
        config, workdir, mesh, FLAGS.num_samples, FLAGS.seed
    )
    name = _common.output_name(
        config, step, FLAGS.tag, seed=FLAGS.seed, count=FLAGS.num_samples
    )
    stem = os.path.join(workdir, "samples", f"samples_{name}")
    pipeline.check_output_files(stem + ".npz", stem + ".png")
    pipeline.warn_if_replacing(stem + ".npz", config)
    x1, samples, sample, info, seconds = pipeline.sample_test_images(
        config, model, variables, mesh, FLAGS.num_samples, FLAGS.seed
    )
    record = pipeline.sampling_record(config, info)
    given = {"mask": sample.mask, "cond": sample.cond, "labels": sample.labels}
    given = {k: np.asarray(v) for k, v in given.items() if v is not None}

    def save(record):
        np.savez(
            stem + ".npz",
            x0=sample.x0,
            samples=samples,
            ground_truth=x1,
            sampling=np.asarray(json.dumps(record)),
            **given,
        )

    log = logging.getLogger("launch.sample")
    if jax.process_index() == 0:  # the samples are kept before FID is measured
        save(record)
        evaluate.save_grid(stem + ".png", [np.clip(sample.x0, -1, 1), samples, x1])
        log.info(
            "step %d: %d samples with %s, %d field calls (%d of them score "
            "calls), %.1f s -> %s.png",
            step,
            samples.shape[0],
            config.sampler.method,
            record["nfe"],
            record["nfe_score"],
            seconds,
            stem,
        )
    if fid_setup is None:
        return
    # Every process takes part (the batch is split over all devices).
    baselines = fid_eval.baselines(config, x1, sample)
    record.update(fid_eval.measure(fid_setup, x1, sample=samples, **baselines))
    if jax.process_index() == 0:
        save(record)
        log.info(
            "FID against %s: %s",
            record["fid_reference"],
            ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k in _FID_SETS),
        )


if __name__ == "__main__":
    app.run(_common.one_line_input_errors(main), flags_parser=_common.parse_flags)
