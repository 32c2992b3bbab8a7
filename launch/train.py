"""Trains a model, then evaluates it: the main job.

    python -m launch.train --config configs/inpaint_photos16.py --workdir DIR

Writes ``DIR/checkpoints``, ``DIR/train_log.jsonl``, ``DIR/config.json``,
``DIR/metrics.json`` and, for in-painting, ``DIR/samples/inpaint.png``.
Running it again on the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

from absl import app, flags

from launch import _common

_common.define_config_flag()
flags.adopt_module_key_flags(_common)
flags.DEFINE_string("workdir", None, "output folder (created if missing)")
flags.DEFINE_bool("evaluate", True, "evaluate after training")
FLAGS = flags.FLAGS


def main(argv):
    config = FLAGS.config
    splits = {"train.global_batch": _common.per_pass_batch(config.train)}
    if FLAGS.evaluate:
        splits["eval.num_images"] = config.eval.num_images
        if config.eval.batch:
            splits["eval.batch"] = config.eval.batch
    workdir = _common.start(argv, workdir_must_exist=False, splits=splits)

    from stochinterp import pipeline

    pipeline.train_and_evaluate(config, workdir, evaluate_after=FLAGS.evaluate)


if __name__ == "__main__":
    app.run(_common.one_line_input_errors(main), flags_parser=_common.parse_flags)
