"""Converts the PyTorch FID Inception weights to the ``.npz`` that FID reads.

    python -m launch.convert_inception \\
        --input pt_inception-2015-12-05-6726825d.pth --output inception_fid.npz

The input is the PyTorch port of the 2015-12-05 TensorFlow Inception graph
that FID numbers in the literature use (a state dict, about 95 MB). Reading
it needs PyTorch (``pip install torch``); nothing else in stochinterp does.
The output keeps every tensor under its PyTorch name and layout; it is then
checked by loading it as ``stochinterp.models.inception.load_weights`` does.
"""

from __future__ import annotations

import os

from absl import app, flags

from launch import _common

flags.DEFINE_string("input", None, "PyTorch state dict (.pth) of the FID Inception")
flags.DEFINE_string("output", None, "the .npz to write")
FLAGS = flags.FLAGS


def read_state_dict(path: str) -> dict:
    """name -> numpy array of a PyTorch state dict file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path!r} is not a file")
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "reading a .pth file needs PyTorch: pip install torch"
        ) from error
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(
            f"{path!r} holds a {type(state).__name__}, expected a state dict "
            "(name -> tensor)"
        )
    return {name: value.numpy() for name, value in state.items()}


def main(argv):
    del argv
    import numpy as np

    from stochinterp import input_errors
    from stochinterp.models import inception

    with input_errors.checking_input():
        for name in ("input", "output"):
            if not getattr(FLAGS, name):
                raise ValueError(f"--{name} is required")
        if not FLAGS.output.endswith(".npz"):
            raise ValueError(f"--output {FLAGS.output!r} must end in .npz")
        try:
            arrays = read_state_dict(FLAGS.input)
        except ImportError as error:
            raise input_errors.mark(error) from None
        np.savez(FLAGS.output, **arrays)
        try:
            inception.load_weights(FLAGS.output)
        except ValueError:
            os.remove(FLAGS.output)
            raise
    print(f"wrote {FLAGS.output}: {len(arrays)} tensors")


if __name__ == "__main__":
    app.run(_common.one_line_input_errors(main))
