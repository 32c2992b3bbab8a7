"""Converts the PyTorch FID Inception weights to the ``.npz`` that FID reads.

    python -m launch.convert_inception \\
        --input pt_inception-2015-12-05-6726825d.pth --output inception_fid.npz

The input is the PyTorch port of the 2015-12-05 TensorFlow Inception graph
that FID numbers in the literature use (a state dict, about 95 MB). Reading
it needs PyTorch (``pip install torch``); nothing else in stochinterp does.
The output keeps every tensor under its PyTorch name and layout (as float32
for floating-point tensors). It is checked by loading it as
``stochinterp.models.inception.load_weights`` does, and only then takes the
place of ``--output``: a failed conversion leaves an existing file as it was.
"""

from __future__ import annotations

import os
import secrets

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
        message = "reading a .pth file needs PyTorch: pip install torch"
        raise ImportError(message) from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for what it cannot read
        raise ValueError(
            f"--input {path!r} cannot be read as a PyTorch file "
            f"({type(error).__name__})"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(
            f"--input {path!r} holds a {type(state).__name__}, expected a state "
            "dict (name -> tensor)"
        )
    arrays = {}
    for name, value in state.items():
        if not isinstance(name, str) or not torch.is_tensor(value):
            hint = ""
            if isinstance(value, dict):
                hint = " (a checkpoint holding one? save that state dict alone)"
            raise ValueError(
                f"--input {path!r} maps {name!r} to a {type(value).__name__}, "
                f"expected a state dict of name -> tensor{hint}"
            )
        arrays[name] = (value.float() if value.is_floating_point() else value).numpy()
    return arrays


def convert(source: str, target: str) -> int:
    """Writes ``target`` from ``source`` once it loads; returns the tensor count."""
    from stochinterp import npz_writer
    from stochinterp.models import inception

    arrays = read_state_dict(source)
    folder, name = os.path.split(os.path.abspath(target))
    temporary = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.npz")
    try:
        npz_writer.save(temporary, **arrays)
        try:
            inception.load_weights(temporary)
        except ValueError as error:
            message = (
                str(error)
                .replace(f"Inception weight file {temporary!r} ", "it ")
                .replace(f" in {temporary!r}", "")
            )
            raise ValueError(
                f"--input {source!r} is not the FID Inception: {message}"
            ) from None
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return len(arrays)


def main(argv):
    del argv
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # only shapes are computed
    from stochinterp import input_errors

    with input_errors.checking_input():
        for name in ("input", "output"):
            if not getattr(FLAGS, name):
                raise ValueError(f"--{name} is required")
        if not FLAGS.output.endswith(".npz"):
            raise ValueError(f"--output {FLAGS.output!r} must end in .npz")
        if os.path.isdir(FLAGS.output):
            raise ValueError(
                f"--output {FLAGS.output!r} is a folder, expected the name of "
                "the .npz file to write"
            )
        if not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.output))):
            raise FileNotFoundError(
                f"--output {FLAGS.output!r}: its folder does not exist"
            )
        try:
            count = convert(FLAGS.input, FLAGS.output)
        except ImportError as error:
            raise input_errors.mark(error) from None
    print(f"wrote {FLAGS.output}: {count} tensors")


if __name__ == "__main__":
    app.run(_common.one_line_input_errors(main))
