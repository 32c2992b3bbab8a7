"""The Inception-v3 feature network of the Frechet Inception Distance (FID).

FID compares the 2048 features of the network's last pooling layer ("pool3")
on generated and real images. The numbers in the literature use one set of
weights (the 2015-12-05 Inception graph of TensorFlow, 1008 classes), and the
variant of the architecture that goes with it: in the blocks built by
``_BlockA``, ``_BlockC`` and the first ``_BlockE`` the 3x3 average pooling
divides by the number of real (unpadded) pixels, and the last ``_BlockE``
pools its fourth branch with a 3x3 maximum instead of an average.

Layout: NHWC, as everywhere in stochinterp. Module and parameter names follow
the PyTorch port of those weights (``Mixed_5b.branch1x1.conv.weight``, ...),
so that ``load_weights`` maps a converted weight file one name to one name.
Images in [-1, 1] of any size are resized to 299x299 by bilinear
interpolation (half-pixel centres, no antialiasing), as the PyTorch port does.

The weights are not shipped (about 95 MB, under their own licence):
``python -m launch.convert_inception`` turns the PyTorch weight file into
the ``.npz`` that ``load_weights`` reads.
"""

from __future__ import annotations

import os
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
FEATURES = 2048
BATCH_NORM_EPS = 1e-3


class BasicConv(nn.Module):
    """Convolution without bias, batch norm (running statistics), ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        (ph, pw) = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BATCH_NORM_EPS, name="bn")(x)
        return nn.relu(x)


def _conv(features: int, kernel, strides: int = 1, padding=(0, 0), name=None):
    if isinstance(kernel, int):
        kernel = (kernel, kernel)
    return BasicConv(features, tuple(kernel), strides, tuple(padding), name=name)


def _mean_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 average over real pixels only (the border's mean has fewer terms)."""
    return nn.avg_pool(
        x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False
    )


def _max_pool_3x3(x: jax.Array, strides: int, pad: int = 0) -> jax.Array:
    return nn.max_pool(
        x, (3, 3), strides=(strides, strides), padding=((pad, pad), (pad, pad))
    )


class _BlockA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        one = _conv(64, 1, name="branch1x1")(x)
        five = _conv(48, 1, name="branch5x5_1")(x)
        five = _conv(64, 5, padding=(2, 2), name="branch5x5_2")(five)
        three = _conv(64, 1, name="branch3x3dbl_1")(x)
        three = _conv(96, 3, padding=(1, 1), name="branch3x3dbl_2")(three)
        three = _conv(96, 3, padding=(1, 1), name="branch3x3dbl_3")(three)
        pool = _conv(self.pool_features, 1, name="branch_pool")(_mean_pool_3x3(x))
        return jnp.concatenate([one, five, three, pool], axis=-1)


class _BlockB(nn.Module):
    """35x35 -> 17x17 reduction."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        three = _conv(384, 3, strides=2, name="branch3x3")(x)
        double = _conv(64, 1, name="branch3x3dbl_1")(x)
        double = _conv(96, 3, padding=(1, 1), name="branch3x3dbl_2")(double)
        double = _conv(96, 3, strides=2, name="branch3x3dbl_3")(double)
        return jnp.concatenate([three, double, _max_pool_3x3(x, 2)], axis=-1)


class _BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions of ``channels_7x7`` channels."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.channels_7x7
        wide = {"kernel": (1, 7), "padding": (0, 3)}
        tall = {"kernel": (7, 1), "padding": (3, 0)}
        one = _conv(192, 1, name="branch1x1")(x)
        seven = _conv(c, 1, name="branch7x7_1")(x)
        seven = _conv(c, **wide, name="branch7x7_2")(seven)
        seven = _conv(192, **tall, name="branch7x7_3")(seven)
        double = _conv(c, 1, name="branch7x7dbl_1")(x)
        double = _conv(c, **tall, name="branch7x7dbl_2")(double)
        double = _conv(c, **wide, name="branch7x7dbl_3")(double)
        double = _conv(c, **tall, name="branch7x7dbl_4")(double)
        double = _conv(192, **wide, name="branch7x7dbl_5")(double)
        pool = _conv(192, 1, name="branch_pool")(_mean_pool_3x3(x))
        return jnp.concatenate([one, seven, double, pool], axis=-1)


class _BlockD(nn.Module):
    """17x17 -> 8x8 reduction."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        three = _conv(192, 1, name="branch3x3_1")(x)
        three = _conv(320, 3, strides=2, name="branch3x3_2")(three)
        seven = _conv(192, 1, name="branch7x7x3_1")(x)
        seven = _conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(seven)
        seven = _conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(seven)
        seven = _conv(192, 3, strides=2, name="branch7x7x3_4")(seven)
        return jnp.concatenate([three, seven, _max_pool_3x3(x, 2)], axis=-1)


class _BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches; ``max_pool`` for the last one."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        wide = {"kernel": (1, 3), "padding": (0, 1)}
        tall = {"kernel": (3, 1), "padding": (1, 0)}
        one = _conv(320, 1, name="branch1x1")(x)
        three = _conv(384, 1, name="branch3x3_1")(x)
        three = jnp.concatenate(
            [
                _conv(384, **wide, name="branch3x3_2a")(three),
                _conv(384, **tall, name="branch3x3_2b")(three),
            ],
            axis=-1,
        )
        double = _conv(448, 1, name="branch3x3dbl_1")(x)
        double = _conv(384, 3, padding=(1, 1), name="branch3x3dbl_2")(double)
        double = jnp.concatenate(
            [
                _conv(384, **wide, name="branch3x3dbl_3a")(double),
                _conv(384, **tall, name="branch3x3dbl_3b")(double),
            ],
            axis=-1,
        )
        pooled = _max_pool_3x3(x, 1, pad=1) if self.max_pool else _mean_pool_3x3(x)
        pool = _conv(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([one, three, double, pool], axis=-1)


def resize_to_input(images: jax.Array) -> jax.Array:
    """Bilinear resize to 299x299 (half-pixel centres, no antialiasing).

    Args:
      images: [batch, height, width, 3].
    """
    shape = (images.shape[0], INPUT_SIZE, INPUT_SIZE, images.shape[-1])
    if images.shape == shape:
        return images
    return jax.image.resize(images, shape, "bilinear", antialias=False)


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] -> the 2048 pool3 features of FID.

    Call with ``images: [batch, height, width, 3]``; returns [batch, 2048].
    Its variables are ``{"params": ..., "batch_stats": ...}``; the network
    has no training mode (batch norm always uses the running statistics).
    """

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = resize_to_input(images.astype(jnp.float32))
        x = _conv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
        x = _conv(32, 3, name="Conv2d_2a_3x3")(x)
        x = _conv(64, 3, padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = _conv(80, 1, name="Conv2d_3b_1x1")(x)
        x = _conv(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = _BlockA(32, name="Mixed_5b")(x)
        x = _BlockA(64, name="Mixed_5c")(x)
        x = _BlockA(64, name="Mixed_5d")(x)
        x = _BlockB(name="Mixed_6a")(x)
        x = _BlockC(128, name="Mixed_6b")(x)
        x = _BlockC(160, name="Mixed_6c")(x)
        x = _BlockC(160, name="Mixed_6d")(x)
        x = _BlockC(192, name="Mixed_6e")(x)
        x = _BlockD(name="Mixed_7a")(x)
        x = _BlockE(name="Mixed_7b")(x)
        x = _BlockE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# Flax name -> (PyTorch name, layout change) inside one BasicConv.
_RENAMES = {
    ("params", "conv", "kernel"): ("conv.weight", (2, 3, 1, 0)),  # OIHW -> HWIO
    ("params", "bn", "scale"): ("bn.weight", None),
    ("params", "bn", "bias"): ("bn.bias", None),
    ("batch_stats", "bn", "mean"): ("bn.running_mean", None),
    ("batch_stats", "bn", "var"): ("bn.running_var", None),
}


def variable_shapes() -> dict[str, tuple[int, ...]]:
    """PyTorch name -> shape (PyTorch layout) of every weight the network reads."""
    shapes = jax.eval_shape(
        InceptionFeatures().init,
        jax.random.key(0),
        jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)),
    )
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    return {name: value.shape for name, value in to_arrays(zeros).items()}


def load_weights(path: str) -> dict:
    """Reads a converted weight file into the network's variables.

    Args:
      path: ``.npz`` from ``python -m launch.convert_inception``: one array
        per PyTorch name, in PyTorch layout. Names the network does not read
        (the classifier ``fc.*``, ``*.num_batches_tracked``) are ignored.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` for ``InceptionFeatures().apply``.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: the file is not an ``.npz`` archive, or a weight is missing,
        damaged, not finite or of the wrong shape (named).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no Inception weight file at {path!r}; make one with python -m "
            "launch.convert_inception (see the README, FID)"
        )
    expected = variable_shapes()
    arrays = read_arrays(path, expected, "Inception weight file", np.float32, "f")
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(
                f"weight {name!r} in {path!r} has shape {arrays[name].shape}, "
                f"expected {shape}"
            )
        if name.endswith("running_var") and np.any(arrays[name] < 0):
            raise ValueError(
                f"weight {name!r} in {path!r} holds a negative variance "
                f"({arrays[name].min():.3g}); convert the weights again"
            )
    return _to_variables(arrays)


def read_arrays(
    path: str, names, what: str, dtype, kinds: str = "fiu"
) -> dict[str, np.ndarray]:
    """The named arrays of an ``.npz`` file, as finite real numbers of ``dtype``.

    Args:
      path: the file.
      names: the entries to read (others are ignored).
      what: what the file is, for the messages ("Inception weight file").
      dtype: the type to return them in; each must be finite in it.
      kinds: the numpy dtype kinds accepted ("f" floats, "i"/"u" integers).

    Raises:
      ValueError: naming the file, and the entry where one is at fault, when
        the file is not an ``.npz`` archive, lacks an entry, or an entry is
        damaged, not numbers of those kinds, or not finite in ``dtype``.
    """
    try:
        stored = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise ValueError(f"{what} {path!r} is not a readable .npz archive") from None
    if not isinstance(stored, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{what} {path!r} holds one array (.npy), expected an .npz archive "
            "of named arrays"
        )
    with stored:
        missing = [name for name in names if name not in stored.files]
        if missing:
            raise ValueError(
                f"{what} {path!r} lacks {len(missing)} of the {len(names)} "
                f"arrays it needs, first {missing[:3]} (it holds "
                f"{len(stored.files)}, first {sorted(stored.files)[:3]})"
            )
        arrays = {name: _read_entry(stored, name, what, path, kinds) for name in names}
    for name, value in arrays.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{what} {path!r}: {name!r} holds non-finite values")
        with np.errstate(over="ignore"):
            arrays[name] = value.astype(dtype)
        if not np.all(np.isfinite(arrays[name])):
            raise ValueError(
                f"{what} {path!r}: {name!r} holds values too large for "
                f"{np.dtype(dtype).name} (largest magnitude "
                f"{np.abs(value).max():.3g})"
            )
    return arrays


def _read_entry(stored, name: str, what: str, path: str, kinds: str) -> np.ndarray:
    try:
        value = stored[name]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        value = None
    if value is None or value.dtype.kind not in kinds:
        numbers = "floating-point numbers" if kinds == "f" else "real numbers"
        found = "" if value is None else f" (it holds {value.dtype})"
        raise ValueError(
            f"{what} {path!r}: {name!r} is damaged or not an array of {numbers}{found}"
        )
    return value


def _to_variables(arrays: dict[str, np.ndarray]) -> dict:
    """PyTorch-named arrays -> nested Flax variables."""
    variables: dict = {}
    for (collection, layer, name), (torch_name, layout) in _RENAMES.items():
        suffix = "." + torch_name
        for key, value in arrays.items():
            if not key.endswith(suffix):
                continue
            modules = key[: -len(suffix)].split(".")
            node = variables.setdefault(collection, {})
            for module in modules + [layer]:
                node = node.setdefault(module, {})
            node[name] = jnp.asarray(
                value if layout is None else np.transpose(value, layout)
            )
    return variables


def to_arrays(variables: dict) -> dict[str, np.ndarray]:
    """The inverse of ``load_weights``'s mapping: PyTorch name -> array."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        collection, *modules, layer, name = (p.key for p in path)
        torch_name, layout = _RENAMES[(collection, layer, name)]
        value = np.asarray(leaf)
        if layout is not None:
            value = np.transpose(value, np.argsort(layout))
        out[".".join([*modules, torch_name])] = value
    return out


def save_weights(path: str, variables: dict) -> None:
    """Writes variables as a weight file that ``load_weights`` reads."""
    np.savez(path, **to_arrays(variables))


def parameter_count() -> int:
    """Number of learned weights (convolutions and batch-norm scales and biases)."""
    return int(
        sum(
            np.prod(shape)
            for name, shape in variable_shapes().items()
            if not name.endswith(("running_mean", "running_var"))
        )
    )
