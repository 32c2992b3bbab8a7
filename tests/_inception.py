"""Random weights of the FID network for tests (the real ones cannot be fetched)."""

import numpy as np

from stochinterp.models import inception


def random_weights(seed: int = 6) -> dict[str, np.ndarray]:
    """PyTorch name -> random float32 array, with batch-norm statistics that act.

    Made in numpy from the shapes alone, without running the network.
    Convolutions have He's scale sqrt(2 / fan_in): at 1 / sqrt(fan_in) the
    part of the features that depends on the image fades to 1e-4 of them.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in inception.variable_shapes().items():
        if name.endswith("conv.weight"):
            fan_in = np.prod(shape[1:])
            arrays[name] = rng.normal(size=shape) * np.sqrt(2 / fan_in)
        elif name.endswith(("running_var", "bn.weight")):
            arrays[name] = rng.uniform(0.5, 1.5, size=shape)
        else:
            arrays[name] = rng.normal(0, 0.1, size=shape)
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def write_random_weights(path: str, seed: int = 6) -> str:
    """A weight file, as ``launch.convert_inception`` writes one, of random weights."""
    np.savez(path, **random_weights(seed))
    return path
