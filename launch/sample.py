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
1, ``_n<num_samples>``, ``_seed<k>``, ``_b<batch>`` and ``_<tag>`` for
``--tag``.

``--batch B`` samples B images at a time (default 0: all at once) and holds
one batch in memory: the ``.npz`` is filled batch by batch and written
whole at the end (an interrupted run leaves any earlier file as it was); the
picture shows the first batch. Batch c draws with
``fold_in(key(seed), c)``, as ``launch.fid`` does, so another batch size
gives other samples (hence ``_b<batch>``); the record adds ``batch`` and
``nfe_per_batch``. See ``pipeline.sample_held_out``.

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
flags.DEFINE_integer(
    "batch", 0, "images sampled at a time (0: all at once; devices divide it)"
)
flags.DEFINE_integer("seed", 0, "seed for the coupling and SDE noise")
FLAGS = flags.FLAGS
_FID_SETS = ("fid_sample", "fid_upsampled", "fid_mean_fill")


def main(argv):
    for flag, least in (("num_samples", 1), ("batch", 0)):
        value = getattr(FLAGS, flag)
        if value < least:
            raise SystemExit(f"error: --{flag} must be >= {least}, got {value}")
    _common.check_tag(FLAGS.tag)
    splits = {"--num_samples": FLAGS.num_samples}
    if FLAGS.batch:
        splits["--batch"] = FLAGS.batch
    workdir = _common.start(argv, splits=splits)
    config = FLAGS.config

    import jax

    from stochinterp import input_errors, pipeline, sharding

    mesh = sharding.make_mesh()
    with input_errors.checking_input():
        check_batch(mesh)
    fid_setup, model, variables, step = pipeline.prepare_sampling(
        config, workdir, mesh, FLAGS.num_samples, FLAGS.seed
    )
    count = FLAGS.num_samples
    batch = min(FLAGS.batch or count, count)
    name = _common.output_name(
        config, step, FLAGS.tag, seed=FLAGS.seed, count=count, batch=batch
    )
    stem = os.path.join(workdir, "samples", f"samples_{name}")
    pipeline.check_output_files(stem + ".npz", stem + ".png")
    pipeline.warn_if_replacing(stem + ".npz", config)
    record, seconds = pipeline.sample_held_out(
        config, model, variables, mesh, fid_setup, stem, count, batch, FLAGS.seed
    )
    if jax.process_index() != 0:
        return
    log = logging.getLogger("launch.sample")
    log.info(
        "step %d: %d samples with %s, %d field calls (%d of them score calls), "
        "%.1f s -> %s.npz, .png",
        step,
        count,
        config.sampler.method,
        record["nfe"],
        record["nfe_score"],
        seconds,
        stem,
    )
    if fid_setup is not None:
        log.info(
            "FID against %s: %s",
            record["fid_reference"],
            ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k in _FID_SETS),
        )


def check_batch(mesh) -> None:
    """Raises before any work for a batch the devices do not split."""
    devices = mesh.devices.size
    if FLAGS.batch % devices:
        raise ValueError(
            f"--batch={FLAGS.batch} must be 0 (all --num_samples at once) or a "
            f"positive multiple of the number of devices ({devices})"
        )


if __name__ == "__main__":
    app.run(_common.one_line_input_errors(main), flags_parser=_common.parse_flags)
