"""Couplings: how the base sample x0 is drawn from the data x1.

A coupling is a callable ``coupling(key, x1, labels) -> CouplingSample``. It
builds ``x0 = center + sigma * zeta`` with ``zeta ~ N(0, I)`` and returns what
the network is conditioned on. Write your own by returning a
``CouplingSample``; nothing else in the library needs to change.

Conventions: images are NHWC in [-1, 1]; ``mask`` is ``[batch, H, W, 1]`` with
1 = known pixel, 0 = missing pixel.

Example, a user-defined colourisation coupling (the base sample is the grey
image plus noise, and the network sees the grey image as one extra channel):

    def colourise(key, x1, labels=None, sigma=0.5):
        grey = jnp.mean(x1, axis=-1, keepdims=True)        # [B, H, W, 1]
        center = jnp.broadcast_to(grey, x1.shape)           # [B, H, W, C]
        zeta = jax.random.normal(key, x1.shape, x1.dtype)
        return CouplingSample(
            x0=center + sigma * zeta, center=center, sigma=sigma,
            cond=grey, labels=labels,
        )

    loss_fn = losses.make_loss_fn(model.apply, interpolants.linear(),
                                  colourise, t_min=0.0, t_max=1.0)

The network must accept ``cond`` with one channel; ``mask`` stays None
because every pixel moves. ``tests/test_couplings.py`` runs this example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from stochinterp import sharding
from stochinterp.checks import (
    as_array,
    check_noise_scale,
    check_positive_int,
    check_probability,
)


@flax.struct.dataclass
class CouplingSample:
    """One draw of a coupling for a batch.

    Attributes:
      x0: [batch, H, W, C] base samples.
      center: [batch, H, W, C] the known part c of x0 = c + sigma * zeta.
      sigma: noise scale of x0 around ``center``; a float or an array that
        broadcasts against x0 (per pixel for in-painting).
      cond: [batch, H, W, k] image-shaped conditioning concatenated to x_t at
        the network input, or None.
      mask: [batch, H, W, 1] output mask (1 = known pixel: the velocity there is
        exactly zero), or None.
      labels: [batch] int32 class labels fed to the network (after any
        classifier-free-guidance drop), or None.
    """

    x0: jax.Array
    center: jax.Array
    sigma: jax.Array | float
    cond: jax.Array | None = None
    mask: jax.Array | None = None
    labels: jax.Array | None = None

    @property
    def xi(self) -> dict:
        """The conditioning a velocity field needs, as a pytree."""
        return {"cond": self.cond, "mask": self.mask, "labels": self.labels}


Coupling = Callable[[jax.Array, jax.Array, "jax.Array | None"], CouplingSample]


def _as_images(x1) -> jax.Array:
    """Raises unless x1 is non-empty and floating-point; returns it as an array."""
    x1 = as_array("x1", x1)
    if not jnp.issubdtype(x1.dtype, jnp.floating):
        raise ValueError(
            f"x1 must be floating-point images in [-1, 1], got dtype {x1.dtype}"
        )
    if x1.size == 0:
        raise ValueError(
            f"x1 of shape {x1.shape} is empty; expected at least one image with "
            "at least one pixel"
        )
    return x1


def _check_divisible(x_shape: tuple, n: int, what: str) -> None:
    if len(x_shape) != 4:
        raise ValueError(f"expected images [batch, H, W, C], got shape {x_shape}")
    if 0 in x_shape[:3]:
        raise ValueError(
            f"expected images [batch, H, W, C] with batch, H and W >= 1, got shape "
            f"{x_shape}"
        )
    height, width = x_shape[1], x_shape[2]
    if height % n or width % n:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the {what} {n}"
        )


def tile_mask(key: jax.Array, shape: tuple, grid: int = 8, p: float = 0.3) -> jax.Array:
    """Draws an in-painting mask of grid x grid equal tiles.

    Each tile is hidden independently with probability p; the mask is shared
    by all channels of a pixel.

    Args:
      key: PRNG key.
      shape: image batch shape (batch, H, W, C); H and W divisible by grid.
      grid: tiles per side.
      p: probability that a tile is hidden.

    Returns:
      [batch, H, W, 1] float32 mask, 1 = known pixel, 0 = hidden pixel.
    """
    check_positive_int("tile grid", grid)
    check_probability("hidden-tile probability p", p)
    _check_divisible(tuple(shape), grid, "tile grid")
    batch, height, width = shape[0], shape[1], shape[2]
    hidden = jax.random.bernoulli(key, p, (batch, grid, grid))
    tiles = 1.0 - hidden.astype(jnp.float32)
    tiles = jnp.repeat(tiles, height // grid, axis=1)
    tiles = jnp.repeat(tiles, width // grid, axis=2)
    return tiles[..., None]


def box_downsample(x: jax.Array, factor: int) -> jax.Array:
    """Averages factor x factor blocks: [B, H, W, C] -> [B, H/f, W/f, C]."""
    check_positive_int("super-resolution factor", factor)
    _check_divisible(x.shape, factor, "super-resolution factor")
    b, h, w, c = x.shape
    blocks = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return blocks.mean(axis=(2, 4))


def nearest_upsample(x: jax.Array, factor: int) -> jax.Array:
    """Repeats each pixel factor x factor times: [B, h, w, C] -> [B, fh, fw, C]."""
    check_positive_int("super-resolution factor", factor)
    if jnp.ndim(x) != 4:
        raise ValueError(f"expected images [batch, h, w, C], got shape {jnp.shape(x)}")
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


@dataclasses.dataclass(frozen=True)
class IndependentCoupling:
    """The uncoupled baseline: x0 ~ N(0, I), independent of x1.

    Attributes:
      condition_like: optionally an ``InpaintingCoupling`` or a
        ``SuperResolutionCoupling`` (no other coupling) whose conditioning
        inputs the baseline receives, so that a comparison isolates the
        coupling. For in-painting the network gets the mask and the masked
        image as channels; for super-resolution the upsampled low-resolution
        image. The baseline never masks the network output.
    """

    condition_like: InpaintingCoupling | SuperResolutionCoupling | None = None

    def __post_init__(self):
        # Only these two are mirrored; another coupling's conditioning (and
        # its channel count) would not be.
        like = (InpaintingCoupling, SuperResolutionCoupling, type(None))
        if not isinstance(self.condition_like, like):
            raise ValueError(
                "condition_like must be an InpaintingCoupling, a "
                f"SuperResolutionCoupling or None, got {self.condition_like!r}"
            )

    def check_image_shape(self, shape: tuple) -> None:
        if self.condition_like is not None:
            self.condition_like.check_image_shape(shape)

    def __call__(
        self, key: jax.Array, x1: jax.Array, labels: jax.Array | None = None
    ) -> CouplingSample:
        x1 = _as_images(x1)
        # The split of InpaintingCoupling: from the same key the baseline gets
        # the same mask and the same noise, so both are evaluated alike.
        key_cond, key_noise = jax.random.split(key)
        x0 = jax.random.normal(key_noise, x1.shape, x1.dtype)
        cond = None
        if isinstance(self.condition_like, InpaintingCoupling):
            mask = tile_mask(
                key_cond, x1.shape, self.condition_like.grid, self.condition_like.p
            )
            cond = jnp.concatenate([mask, mask * x1], axis=-1)
        elif self.condition_like is not None:
            cond = self.condition_like(key_cond, x1, labels).cond
        return CouplingSample(
            x0=x0, center=jnp.zeros_like(x1), sigma=1.0, cond=cond, labels=labels
        )

    @property
    def cond_channels_per_image_channel(self) -> tuple[int, int]:
        """(constant, per image channel) counts of conditioning channels."""
        if isinstance(self.condition_like, InpaintingCoupling):
            return 1, 1
        if isinstance(self.condition_like, SuperResolutionCoupling):
            return 0, 1
        return 0, 0


@dataclasses.dataclass(frozen=True)
class InpaintingCoupling:
    """x0 = mask * x1 + (1 - mask) * zeta, tiles hidden with probability p.

    The mask goes to the network as one input channel and the network output
    is multiplied by (1 - mask): known pixels never move. ``losses`` holds x_t
    at x1 on known pixels for every interpolant (for the linear path with
    gamma = 0 the interpolant does so by itself), matching the samplers.

    Attributes:
      grid: tiles per image side; H and W must be divisible by it.
      p: probability that a tile is hidden, in [0, 1].
    """

    grid: int = 8
    p: float = 0.3

    def __post_init__(self):
        check_positive_int("tile grid", self.grid)
        check_probability("hidden-tile probability p", self.p)

    def check_image_shape(self, shape: tuple) -> None:
        _check_divisible(tuple(shape), self.grid, "tile grid")

    def __call__(
        self, key: jax.Array, x1: jax.Array, labels: jax.Array | None = None
    ) -> CouplingSample:
        x1 = _as_images(x1)
        key_mask, key_noise = jax.random.split(key)
        mask = tile_mask(key_mask, x1.shape, self.grid, self.p).astype(x1.dtype)
        zeta = jax.random.normal(key_noise, x1.shape, x1.dtype)
        center = mask * x1
        x0 = center + (1.0 - mask) * zeta
        return CouplingSample(
            x0=x0,
            center=center,
            sigma=1.0 - mask,
            cond=mask,
            mask=mask,
            labels=labels,
        )

    cond_channels_per_image_channel = (1, 0)


@dataclasses.dataclass(frozen=True)
class SuperResolutionCoupling:
    """x0 = U(D(x1)) + sigma * zeta with box-average D and nearest-neighbour U.

    The clean U(D(x1)) goes to the network as extra channels at every step.
    """

    factor: int = 4
    sigma: float = 1.0

    def __post_init__(self):
        check_positive_int("super-resolution factor", self.factor)
        check_noise_scale("super-resolution sigma", self.sigma)

    def check_image_shape(self, shape: tuple) -> None:
        _check_divisible(tuple(shape), self.factor, "super-resolution factor")

    def low_resolution(self, x1: jax.Array) -> jax.Array:
        """U(D(x1)): [B, H, W, C] -> [B, H, W, C]."""
        return nearest_upsample(box_downsample(x1, self.factor), self.factor)

    def __call__(
        self, key: jax.Array, x1: jax.Array, labels: jax.Array | None = None
    ) -> CouplingSample:
        x1 = _as_images(x1)
        center = self.low_resolution(x1)
        zeta = jax.random.normal(key, x1.shape, x1.dtype)
        return CouplingSample(
            x0=center + self.sigma * zeta,
            center=center,
            sigma=self.sigma,
            cond=center,
            labels=labels,
        )

    cond_channels_per_image_channel = (0, 1)


@dataclasses.dataclass(frozen=True)
class ClassConditioning:
    """Adds class labels to any coupling, with classifier-free-guidance drops.

    Each label is replaced by the null class ``num_classes`` with probability
    ``p_uncond``. How labels enter the network (a learned embedding, or a
    constant class channel) is the network's choice (``UNet.class_channel``).
    """

    base: Coupling
    num_classes: int
    p_uncond: float = 0.0

    def __post_init__(self):
        check_positive_int("num_classes", self.num_classes)
        check_probability("label drop probability p_uncond", self.p_uncond)

    def check_image_shape(self, shape: tuple) -> None:
        check = getattr(self.base, "check_image_shape", None)
        if check is not None:
            check(shape)

    def __call__(
        self, key: jax.Array, x1: jax.Array, labels: jax.Array | None = None
    ) -> CouplingSample:
        x1 = as_array("x1", x1)
        self.check_labels(labels, jnp.shape(x1)[0])
        key_base, key_drop = jax.random.split(key)
        sample = self.base(key_base, x1, None)
        labels = jnp.asarray(labels).astype(jnp.int32)
        if self.p_uncond > 0:
            drop = jax.random.bernoulli(key_drop, self.p_uncond, labels.shape)
            labels = jnp.where(drop, self.num_classes, labels)
        return sample.replace(labels=labels)

    def check_labels(self, labels, batch: int) -> None:
        """Raises unless ``labels`` are [batch] integers in [0, num_classes).

        Shape and dtype are always checked, values when they can be read
        (not inside jit): check host labels before a jitted call.
        """
        if labels is None:
            raise ValueError("a class-conditional coupling needs labels, got None")
        if not isinstance(labels, jax.Array):
            labels = np.asarray(labels)  # in numpy, values beyond int32 are kept
        dtype = labels.dtype
        if not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"class labels must be integers, got dtype {dtype}")
        if jnp.shape(labels) != (batch,):
            raise ValueError(
                f"class labels of shape {jnp.shape(labels)} do not match a batch "
                f"of {batch} images; expected shape ({batch},)"
            )
        _check_label_values(labels, self.num_classes)

    @property
    def cond_channels_per_image_channel(self) -> tuple[int, int]:
        return self.base.cond_channels_per_image_channel


def _check_label_values(labels: jax.Array, num_classes: int) -> None:
    """Raises unless concrete labels lie in [0, num_classes) (traced ones pass).

    ``num_classes`` itself is the null class: it is what the label drop
    writes, never a label of the data.
    """
    values = sharding.host_values(labels)
    if values is None:
        return
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise ValueError(
            f"class labels must lie in [0, num_classes = {num_classes}) "
            f"({num_classes} is the null class), got {np.unique(bad)[:5].tolist()}"
        )


def without_label_drop(coupling: Coupling) -> Coupling:
    """The same coupling for sampling: given labels are kept, never dropped.

    Classifier-free guidance drops labels in training only; at sampling time
    the guidance scale decides how much the label counts.
    """
    if isinstance(coupling, ClassConditioning) and coupling.p_uncond > 0:
        return dataclasses.replace(coupling, p_uncond=0.0)
    return coupling


def cond_channels(coupling, image_channels: int) -> int:
    """Number of image-shaped conditioning channels a coupling produces."""
    const, per = coupling.cond_channels_per_image_channel
    return const + per * image_channels


def from_config(config) -> Coupling:
    """Builds a coupling from ``config.coupling`` (an ml_collections ConfigDict).

    Fields: ``name`` in {'independent', 'inpainting', 'superres'}; ``grid``,
    ``p`` (in-painting); ``factor``, ``sigma`` (super-resolution);
    ``baseline_condition`` ('none', 'inpainting' or 'superres', independent
    only); ``num_classes`` (0 = unconditional), ``p_uncond``. (The field
    ``class_channel`` configures the network, not the coupling.)
    """
    _check_fields(config)
    by_name = {
        "inpainting": InpaintingCoupling(grid=config.grid, p=config.p),
        "superres": SuperResolutionCoupling(factor=config.factor, sigma=config.sigma),
    }
    if config.name == "independent":
        like = by_name.get(config.baseline_condition)  # None for 'none'
        coupling = IndependentCoupling(condition_like=like)
    else:
        coupling = by_name[config.name]
    if config.num_classes:
        coupling = ClassConditioning(coupling, config.num_classes, config.p_uncond)
    return coupling


def _check_fields(config) -> None:
    """Checks every field of ``config.coupling``, also those the chosen
    coupling does not read: a bad value there is a mistake that would
    otherwise pass unnoticed."""
    name = config.name
    if name not in ("independent", "inpainting", "superres"):
        raise ValueError(
            f"coupling {name!r} is not known; choose 'independent', 'inpainting' "
            "or 'superres'"
        )
    check_probability("coupling.p_uncond", config.p_uncond)
    check_noise_scale("coupling.sigma", config.sigma)
    check_positive_int("coupling.grid", config.grid)
    check_probability("coupling.p", config.p)
    check_positive_int("coupling.factor", config.factor)
    conditions = ["inpainting", "none", "superres"]
    if config.baseline_condition not in conditions:
        raise ValueError(
            f"coupling.baseline_condition {config.baseline_condition!r} is not one "
            f"of {conditions}"
        )
    if name != "independent" and config.baseline_condition != "none":
        raise ValueError(
            f"coupling.baseline_condition={config.baseline_condition!r} belongs to "
            f"the uncoupled baseline (coupling.name='independent'); the {name!r} "
            "coupling has its own conditioning: leave it 'none'"
        )
    if "superres" in (name, config.baseline_condition) and config.factor < 2:
        raise ValueError(
            f"coupling.factor={config.factor} would give the network x1 itself "
            "as conditioning (U(D(x1)) = x1); super-resolution needs a factor >= 2"
        )


def base_noise_scale(coupling: Coupling) -> float | None:
    """The noise scale sigma of x0 on the pixels that move, when it is known.

    In-painting (hidden pixels) and the independent baseline: 1;
    super-resolution: its ``sigma``; a class-conditional coupling: that of its
    base. None for other (user-written) couplings.
    """
    if isinstance(coupling, ClassConditioning):
        return base_noise_scale(coupling.base)
    if isinstance(coupling, InpaintingCoupling | IndependentCoupling):
        return 1.0
    if isinstance(coupling, SuperResolutionCoupling):
        return float(coupling.sigma)
    return None
