"""Evaluation of in-painting: sampling fixed test images, PSNR, image grids.

PSNR is pooled: one mean squared error over all hidden pixels (and channels)
of all test images, on images in [-1, 1] (peak-to-peak range 2). Pooling is
steadier than averaging per-image PSNRs, which near-flat images inflate.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from stochinterp import (
    couplings,
    fields,
    input_errors,
    interpolants,
    samplers,
    sharding,
)
from stochinterp.data import transforms


def is_inpainting(config) -> bool:
    """In-painting, coupled or the uncoupled baseline with the same inputs."""
    cc = config.coupling
    return cc.name == "inpainting" or (
        cc.name == "independent" and cc.baseline_condition == "inpainting"
    )


def inpainting_mask(sample) -> np.ndarray:
    """The mask of a coupled draw, or the uncoupled baseline's first channel."""
    return sample.mask if sample.mask is not None else sample.cond[..., :1]


def psnr_from_mse(mse: float, data_range: float = 2.0) -> float:
    """10 log10(range^2 / mse) in dB."""
    return float(10.0 * np.log10(data_range**2 / mse))


def hidden_mse(prediction: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared error over hidden pixels (mask 0), pooled over the batch.

    Args:
      prediction, truth: [batch, H, W, C].
      mask: [batch, H, W, 1], 1 = known.
    """
    error, hidden = _hidden_sums(prediction, truth, mask)
    return _pooled(error, hidden)


def _hidden_sums(prediction, truth, mask) -> tuple[float, float]:
    """(squared error summed over hidden pixel values, their number)."""
    hidden = np.broadcast_to(1.0 - mask, truth.shape)
    return float((np.square(prediction - truth) * hidden).sum()), float(hidden.sum())


def _pooled(error: float, hidden: float) -> float:
    if hidden == 0:
        raise ValueError("no hidden pixels in the evaluation set: PSNR is undefined")
    return error / hidden


def mean_fill(x1: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Baseline: every hole gets the mean of its image's known pixels (per channel).

    An image with no known pixel is filled with 0, the middle of [-1, 1].
    """
    known = np.broadcast_to(mask, x1.shape)
    count = known.sum(axis=(1, 2), keepdims=True)
    mean = (x1 * known).sum(axis=(1, 2), keepdims=True) / np.maximum(count, 1)
    return np.where(known > 0, x1, np.broadcast_to(mean, x1.shape))


def save_grid(path: str, rows: list[np.ndarray], scale: int = 4, pad: int = 2) -> None:
    """Writes rows of images as one PNG.

    Args:
      path: output file.
      rows: list of [n, H, W, C] arrays in [-1, 1], C in {1, 3}; one row each.
      scale: nearest-neighbour magnification (small patches are hard to see).
      pad: white pixels between images.
    """
    n, height, width, _ = rows[0].shape
    cell_h, cell_w = height * scale + pad, width * scale + pad
    canvas = np.full((len(rows) * cell_h + pad, n * cell_w + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        pixels = transforms.from_unit_range(row)
        if pixels.shape[-1] == 1:
            pixels = np.repeat(pixels, 3, axis=-1)
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
        for i in range(n):
            top, left = pad + r * cell_h, pad + i * cell_w
            canvas[top : top + height * scale, left : left + width * scale] = pixels[i]
    Image.fromarray(canvas).save(path)


def _fields_for(apply_fn, variables, sample, interpolant, settings, guidance):
    """Velocity (guided if asked) and, for the SDE, the score of a coupling draw."""
    channels = sample.x0.shape[-1]
    velocity = fields.velocity_field(apply_fn, variables, channels)
    if guidance is not None:
        scale, null_label = guidance
        velocity = fields.guided(velocity, scale, null_label)
    if not settings.needs_score:
        return velocity, None
    if interpolant.has_noise:
        outputs = fields.network_fields(apply_fn, variables, channels)

        def denoiser(t, x, xi):
            g = outputs(t, x, xi)[1]
            if g is None:
                raise ValueError(
                    "Euler-Maruyama with gamma > 0 needs a denoiser: train with "
                    "train.denoiser=True"
                )
            return g

        return velocity, fields.score_from_denoiser(denoiser, interpolant)
    score = fields.score_from_velocity(
        velocity, interpolant, sample.center, sample.sigma
    )
    return velocity, score


def check_sde_steps(
    settings: samplers.SamplerSettings,
    interpolant: interpolants.Interpolant,
    coupling: couplings.Coupling,
    guidance_scale: float = 1.0,
) -> None:
    """Refuses Euler-Maruyama settings a score from the velocity would break.

    Applies ``fields.check_velocity_score_steps`` when the score comes from
    the velocity (gamma = 0) and the coupling's base noise is known.
    """
    if settings.needs_score and not interpolant.has_noise:
        sigma = couplings.base_noise_scale(coupling)
        if sigma is not None:
            fields.check_velocity_score_steps(
                settings, interpolant, sigma, guidance_scale
            )


def sample_coupling(
    apply_fn,
    variables,
    x1: np.ndarray,
    labels: np.ndarray | None,
    coupling: couplings.Coupling,
    interpolant: interpolants.Interpolant,
    settings: samplers.SamplerSettings,
    key: jax.Array,
    mesh=None,
    guidance: tuple[float, int] | None = None,
):
    """Draws the coupling for x1 and integrates from x0 to a sample.

    Args:
      apply_fn, variables: the network.
      x1: [n, H, W, C] images in [-1, 1] the coupling conditions on (for the
        independent coupling only their shape matters); n divisible by the
        number of devices.
      labels: [n] int32 labels (class-conditional couplings) or None.
      coupling: the coupling used in training (its training-time label drop
        for guidance is switched off: sampling keeps the given labels).
      interpolant: the path used in training.
      settings: sampler settings.
      key: PRNG key for the coupling (masks, noise) and the SDE noise.
      mesh: device mesh; the batch is split over it.
      guidance: (scale, null_label) for classifier-free guidance, or None.

    Returns:
      (samples [n, H, W, C] numpy, the CouplingSample as numpy, SamplerInfo).

    Raises:
      ValueError: before sampling, for labels that are missing, not [n]
        integers or outside [0, num_classes) (class-conditional couplings),
        and for Euler-Maruyama settings that the score of a gamma = 0 path
        makes unstable (``fields.check_velocity_score_steps``).
      RuntimeError: when the sampler stopped before t_max (Dopri5's
        max_steps).
      FloatingPointError: when a sample holds a non-finite value.
      Both are marked as input errors (``stochinterp.input_errors``): the
      launchers print them as one line.
    """
    mesh = sharding.make_mesh() if mesh is None else mesh
    sharding.check_global_batch(x1.shape[0], mesh)
    # Values are checked here, on the host: inside the jitted program below
    # the coupling and the network see traced labels and cannot.
    if isinstance(coupling, couplings.ClassConditioning):
        coupling.check_labels(
            np.asarray(labels) if labels is not None else None, len(x1)
        )
    check_sde_steps(
        settings, interpolant, coupling, 1.0 if guidance is None else guidance[0]
    )
    put = lambda a: jax.device_put(jnp.asarray(a), sharding.batch_sharding(mesh))  # noqa: E731
    x1 = put(np.asarray(x1, np.float32))
    labels = None if labels is None else put(np.asarray(labels, np.int32))
    coupling = couplings.without_label_drop(coupling)  # given labels are kept
    run = _sampling_program(
        apply_fn, coupling, interpolant, settings, guidance, jax.random.key_impl(key)
    )
    # The key travels as its raw words: every process holds the same ones.
    key_data = jax.device_put(
        np.asarray(jax.random.key_data(key)), sharding.replicated(mesh)
    )
    # Every process gets the whole batch (it is split over all devices).
    out, sample, info = sharding.gather_to_host(run(variables, x1, labels, key_data))
    # Both failures below come from the settings (a step budget, a scale),
    # so they are reported like input errors: one line naming what to change.
    try:
        samplers.check_info(info)
    except RuntimeError as error:
        input_errors.mark(error)
        raise
    bad = int(np.sum(~np.all(np.isfinite(out.reshape(len(out), -1)), axis=1)))
    if bad:
        fixes = ["more steps", "another sampler"]
        if settings.needs_score:
            fixes.append(f"a smaller eps_scale (now {settings.eps_scale})")
        if guidance is not None:
            fixes.append(f"a guidance scale nearer 1 (now {guidance[0]})")
        raise input_errors.mark(
            FloatingPointError(
                f"{bad} of {len(out)} samples hold non-finite values (sampler "
                f"{settings.method!r}): the network or the sampler settings "
                f"diverge; try {', '.join(fixes[:-1])} or {fixes[-1]}"
            )
        )
    return out, sample, info


def _sampling_program(*setting):
    """The jitted ``run(variables, x1, labels, key_data) -> (samples, sample, info)``.

    ``setting`` is (apply_fn, coupling, interpolant, settings, guidance,
    key_impl). The program is kept, so that batch after batch of one sampling
    reuses one compiled program, when the coupling and the interpolant cannot
    change (frozen dataclasses, as all of stochinterp's are); a coupling of
    one's own that is not gets a new program on every call, so that a change
    to it is seen. Parameters and the key are arguments, not constants baked
    into the program: large networks compile faster and one program serves
    any checkpoint and seed.
    """
    _, coupling, interpolant, *_ = setting
    if _unchanging(coupling) and _unchanging(interpolant):
        return _kept_program(*setting)
    return _new_program(*setting)


def _unchanging(value) -> bool:
    """Whether ``value`` is a hashable frozen dataclass."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return False
    if not value.__dataclass_params__.frozen:
        return False
    try:
        hash(value)
    except TypeError:  # a frozen dataclass holding a list, say
        return False
    return True


def _new_program(apply_fn, coupling, interpolant, settings, guidance, key_impl):
    @jax.jit
    def run(variables, x1, labels, key_data):
        key = jax.random.wrap_key_data(key_data, impl=key_impl)
        key_couple, key_noise = jax.random.split(key)
        sample = coupling(key_couple, x1, labels)
        velocity, score = _fields_for(
            apply_fn, variables, sample, interpolant, settings, guidance
        )
        out, info = samplers.integrate(
            velocity,
            sample.x0,
            sample.xi,
            settings,
            score=score,
            key=key_noise if settings.method == "euler_maruyama" else None,
            mask=sample.mask,
        )
        return out, sample, info

    return run


_kept_program = functools.lru_cache(maxsize=8)(_new_program)


class InpaintingErrors:
    """Squared errors on hidden pixels, summed over batches of test images.

    ``metrics()`` gives what ``inpainting_metrics`` gives for all the batches
    at once: MSEs pooled over every hidden pixel of every batch.
    """

    def __init__(self):
        self.sample_error = 0.0  # summed over hidden pixel values
        self.mean_fill_error = 0.0
        self.hidden = 0.0  # hidden pixel values
        self.mask_sum = 0.0
        self.mask_size = 0
        self.known_exact = True

    def update(self, samples: np.ndarray, x1: np.ndarray, mask: np.ndarray) -> None:
        error, hidden = _hidden_sums(samples, x1, mask)
        self.sample_error += error
        self.mean_fill_error += _hidden_sums(mean_fill(x1, mask), x1, mask)[0]
        self.hidden += hidden
        self.mask_sum += float(mask.sum())
        self.mask_size += mask.size
        known = np.broadcast_to(mask, x1.shape) > 0
        self.known_exact &= bool(np.array_equal(samples[known], x1[known]))

    def metrics(self) -> dict:
        model_mse = _pooled(self.sample_error, self.hidden)
        baseline_mse = _pooled(self.mean_fill_error, self.hidden)
        return {
            "psnr_hidden_sample": psnr_from_mse(model_mse),
            "psnr_hidden_mean_fill": psnr_from_mse(baseline_mse),
            "psnr_gain_db": psnr_from_mse(model_mse) - psnr_from_mse(baseline_mse),
            "mse_hidden_sample": model_mse,
            "mse_hidden_mean_fill": baseline_mse,
            "hidden_fraction": 1.0 - self.mask_sum / self.mask_size,
            "known_pixels_exact": self.known_exact,
        }


def inpainting_metrics(samples: np.ndarray, x1: np.ndarray, mask: np.ndarray) -> dict:
    """PSNR on hidden pixels for the samples and the mean-fill baseline."""
    errors = InpaintingErrors()
    errors.update(samples, x1, mask)
    return errors.metrics()


def masked_input(x1: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Known pixels as they are, holes shown mid-grey (0 in [-1, 1])."""
    return x1 * mask
