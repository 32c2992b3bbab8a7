"""Samplers: integrate the generative ODE or SDE from t_min to t_max.

One entry point, :func:`integrate`, runs one of four integrators on a field
``velocity(t, x, xi) -> b`` (``t`` a scalar, float32 unless the state is
float64; ``x`` ``[batch, ...]``; ``xi`` any conditioning pytree):

- ``'euler'``: N steps on the grid ``t_i = t_min + i (t_max - t_min) / N``,
  N model calls. The field is evaluated at ``t_0 .. t_{N-1}``, never at t_max.
- ``'heun'``: the explicit trapezoidal rule on the same grid, with an Euler
  last step: ``2N - 1`` model calls. The last step being Euler keeps the
  field away from t_max (where a gamma > 0 path has an unbounded gamma') and
  leaves the global error second order (one O(h^2) step).
- ``'dopri5'``: Dormand-Prince 5(4) with an adaptive step-size controller
  (rtol, atol; RMS error norm over the whole batch, as in torchdiffeq and
  diffrax), first-same-as-last, the last step clipped to end at t_max
  exactly. Model calls: 1 (at t_min) + 1 (automatic first step, unless
  ``first_step`` is given) + 6 per attempted step. The last stage of each
  step is evaluated at its end time, so t_max itself is evaluated. A NaN or
  inf from the field rejects the attempt and shrinks the step (by
  ``min_factor``); ``success`` is False if t_max is not reached within
  ``max_steps`` attempts.
- ``'euler_maruyama'``: ``dX = [b + eps(t) score] dt + sqrt(2 eps(t)) dW`` on
  the Euler grid; the last step is a plain Euler step of the ODE (no noise,
  no score term). Field calls: N velocity + N score calls (no score calls
  when ``eps_scale == 0``), all at t_0 .. t_{N-1}: the score is never
  evaluated at t_max. The last step's score call is made and discarded, so
  that no branch separates it from the velocity call at the same (t, x): XLA
  then merges a score built from the same network (``score_from_velocity``,
  or a denoiser head of the velocity network) with the velocity call, and the
  network runs N times, not 2N.

The diffusion coefficient ``eps(t)`` (``eps_schedule``, scaled by
``eps_scale = s``): ``'constant'``: s; ``'decay'``: s (1 - t), vanishing at
t = 1 where the score of a gamma = 0 coupling is singular; ``'bump'``:
4 s t (1 - t), peaking at s for t = 1/2 and vanishing at both ends.

``nfe`` counts calls of the fields passed in: one call of ``velocity`` or of
``score`` counts one. A score built by ``fields.score_from_velocity`` calls
the velocity once inside, so a counter on the velocity sees ``nfe`` calls
(the compiled program may run the network fewer times, see above). A
classifier-free-guided field (``fields.guided``) counts one per call: it makes
one network call on a batch of twice the size.

Every sampler traces each field once: the loops run over model calls (Heun's
predictor and corrector, and the Dopri5 stages and first-step probe, share one
call site), so the compiled program holds one copy of the network and
compiles about as fast as the network alone.

Example:

    settings = SamplerSettings(method='heun', num_steps=50)
    sample = make_sampler(velocity, settings)           # jitted
    x1, info = sample(coupling_sample.x0, coupling_sample.xi,
                      mask=coupling_sample.mask)
    info.nfe                                              # 99

A large batch runs data-parallel with ``make_sampler(..., mesh=make_mesh())``:
the batch is split over the mesh and the result equals the one-device run to
float tolerance.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from stochinterp import checks, sharding
from stochinterp.interpolants import check_time_range

Field = Callable[[jax.Array, jax.Array, object], jax.Array]

METHODS = ("euler", "heun", "dopri5", "euler_maruyama")
_FIXED = ("num_steps", "t_min", "t_max")
_FIELDS_READ = {
    "euler": _FIXED,
    "heun": _FIXED,
    "euler_maruyama": (*_FIXED, "eps_schedule", "eps_scale"),
    "dopri5": (
        "t_min",
        "t_max",
        "rtol",
        "atol",
        "max_steps",
        "first_step",
        "safety",
        "min_factor",
        "max_factor",
    ),
}
FIXED_STEP_METHODS = ("euler", "heun", "euler_maruyama")
EPS_SCHEDULES = ("constant", "decay", "bump")
# The fixed-step time grid is a constant of the compiled program.
MAX_FIXED_STEPS = 2**20


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A plain real number: int or float (NumPy scalars too), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not (
        isinstance(value, (bool, np.bool_))
    )


# Settings that must be real numbers (first_step may also be None).
_REAL_SETTINGS = (
    "t_min",
    "t_max",
    "rtol",
    "atol",
    "first_step",
    "safety",
    "min_factor",
    "max_factor",
    "eps_scale",
)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """What to integrate and how; hashable, so it can be a static jit argument.

    Attributes:
      method: 'euler', 'heun', 'dopri5' or 'euler_maruyama'.
      num_steps: steps N of the fixed-step methods (required there); must be
        None for 'dopri5', whose steps are chosen by the controller.
      t_min: start time (the base sample x0 is taken to be X at t_min).
      t_max: end time; the result is X at t_max.
      rtol: Dopri5 relative tolerance (>= 0).
      atol: Dopri5 absolute tolerance (> 0).
      max_steps: Dopri5 limit on attempted (accepted + rejected) steps.
      first_step: Dopri5 first step size, or None to choose it automatically
        (one extra model call).
      safety: Dopri5 controller safety factor.
      min_factor: smallest step-size change factor per step.
      max_factor: largest step-size change factor per step.
      eps_schedule: Euler-Maruyama diffusion shape: 'constant', 'decay'
        (s (1 - t)) or 'bump' (4 s t (1 - t)).
      eps_scale: s >= 0, the scale of eps(t); 0 makes Euler-Maruyama the
        Euler ODE solver (no score calls, no noise).
    """

    method: str = "dopri5"
    num_steps: int | None = None
    t_min: float = 1e-3
    t_max: float = 1.0 - 1e-3
    rtol: float = 1e-5
    atol: float = 1e-5
    max_steps: int = 4096
    first_step: float | None = None
    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    eps_schedule: str = "decay"
    eps_scale: float = 1.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(
                f"sampler method {self.method!r} is not known; choose one of "
                f"{list(METHODS)}"
            )
        for name in _REAL_SETTINGS:
            value = getattr(self, name)
            if not (_is_real(value) or (name == "first_step" and value is None)):
                raise ValueError(f"{name} must be a real number, got {value!r}")
        check_time_range(self.t_min, self.t_max)
        self._check_steps()
        self._check_controller()
        if self.eps_schedule not in EPS_SCHEDULES:
            raise ValueError(
                f"eps_schedule {self.eps_schedule!r} is not known; choose one of "
                f"{list(EPS_SCHEDULES)}"
            )
        if not 0 <= self.eps_scale < np.inf:
            raise ValueError(f"eps_scale must be finite and >= 0, got {self.eps_scale}")

    def _check_steps(self):
        if self.method == "dopri5":
            if self.num_steps is not None:
                raise ValueError(
                    f"num_steps={self.num_steps} has no meaning for method "
                    "'dopri5' (the controller chooses the steps); leave it None "
                    "and set rtol, atol, max_steps"
                )
            return
        steps = self.num_steps
        if not _is_integer(steps):
            raise ValueError(
                f"method {self.method!r} needs an integer num_steps >= 1, got {steps!r}"
            )
        if not 1 <= steps <= MAX_FIXED_STEPS:
            raise ValueError(
                f"num_steps must lie in [1, {MAX_FIXED_STEPS}] (the time grid is a "
                f"constant of the compiled program), got {steps}"
            )

    def _check_controller(self):
        if not (0 <= self.rtol < np.inf and 0 < self.atol < np.inf):
            raise ValueError(
                f"tolerances must be finite, rtol >= 0 and atol > 0 (with atol = 0 "
                f"a state entry of 0 makes the error test 0/0), got "
                f"rtol={self.rtol}, atol={self.atol}"
            )
        if not _is_integer(self.max_steps) or self.max_steps < 1:
            raise ValueError(
                f"max_steps must be an integer >= 1, got {self.max_steps!r}"
            )
        if self.first_step is not None and not (
            0 < self.first_step <= self.t_max - self.t_min
        ):
            raise ValueError(
                f"first_step must lie in (0, t_max - t_min = "
                f"{self.t_max - self.t_min}], got {self.first_step}"
            )
        if not 0 < self.safety <= 1:
            raise ValueError(f"safety must lie in (0, 1], got {self.safety}")
        if not 0 < self.min_factor < 1 < self.max_factor < np.inf:
            raise ValueError(
                "step factors must satisfy 0 < min_factor < 1 < max_factor < inf, got "
                f"min_factor={self.min_factor}, max_factor={self.max_factor}"
            )

    @property
    def needs_score(self) -> bool:
        """Whether ``integrate`` must be given a score field."""
        return self.method == "euler_maruyama" and self.eps_scale > 0

    def fields_read(self) -> dict:
        """The settings this method reads, by name (``method`` first)."""
        names = _FIELDS_READ[self.method]
        return {"method": self.method, **{n: getattr(self, n) for n in names}}

    @classmethod
    def from_config(cls, config) -> SamplerSettings:
        """Builds settings from ``config.sampler`` (a ConfigDict or mapping).

        Reads the fields of this class that the config holds (see the class
        attributes); absent fields keep their defaults, other keys are
        ignored. ``num_steps`` is read by the fixed-step methods only, so a
        config can switch to ``method='dopri5'`` without unsetting it.
        """
        names = [field.name for field in dataclasses.fields(cls)]
        values = {name: config[name] for name in names if name in config}
        if values.get("method") == "dopri5":
            values.pop("num_steps", None)
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"config.sampler: {e}") from None


@flax.struct.dataclass
class SamplerInfo:
    """What a sampler did. All fields are arrays (a jittable pytree).

    Attributes:
      nfe: [] int32 field calls made (velocity and score together).
      nfe_score: [] int32 of which score calls.
      t_final: [] time reached (float32; float64 for a float64 state); t_max
        exactly when ``success``.
      accepted_steps: [] int32 steps taken.
      rejected_steps: [] int32 steps rejected by the controller (Dopri5).
      success: [] bool, False when Dopri5 ran out of ``max_steps`` before
        t_max (see :func:`check_info`).
    """

    nfe: jax.Array
    nfe_score: jax.Array
    t_final: jax.Array
    accepted_steps: jax.Array
    rejected_steps: jax.Array
    success: jax.Array


def eps_schedule(name: str, scale: float) -> Callable[[jax.Array], jax.Array]:
    """The diffusion coefficient eps(t) of Euler-Maruyama (see module doc)."""
    if name == "constant":
        return lambda t: jnp.full_like(t, scale)
    if name == "decay":
        return lambda t: scale * (1.0 - t)
    if name == "bump":
        return lambda t: 4.0 * scale * t * (1.0 - t)
    raise ValueError(
        f"eps_schedule {name!r} is not known; choose one of {list(EPS_SCHEDULES)}"
    )


def time_grid(
    settings: SamplerSettings, dtype=np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """The fixed-step grid, computed in float64 from the step index.

    Returns:
      times: [N + 1] in ``dtype``, ``t_min + i (t_max - t_min) / N``; the last
        entry is t_max exactly.
      steps: [N] in ``dtype``, the step sizes ``t_{i+1} - t_i``.
    """
    n = settings.num_steps
    span = settings.t_max - settings.t_min
    times = settings.t_min + np.arange(n + 1, dtype=np.float64) * span / n
    times[-1] = settings.t_max
    return times.astype(dtype), np.diff(times).astype(dtype)


def integrate(
    velocity: Field,
    x0: jax.Array,
    xi,
    settings: SamplerSettings,
    *,
    score: Field | None = None,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, SamplerInfo]:
    """Integrates from X(t_min) = x0 to X(t_max).

    Pure and traceable: jit it with ``settings`` (and the fields) static, or
    use :func:`make_sampler`.

    Args:
      velocity: b(t, x, xi) with t a scalar of the time precision (below).
      x0: [batch, ...] start points, finite (checked when x0 is a concrete
        array). Dopri5's norms (first step, error) are taken over the
        entries that move: known entries neither loosen the tolerance nor,
        inside jit where x0 is not checked, upset it with a non-finite value
        (a field that mixes entries, such as a network, still sees that
        value).
      xi: conditioning pytree handed to the fields unchanged.
      settings: the integrator and its parameters.
      score: score(t, x, xi); required by 'euler_maruyama' with eps_scale > 0
        (``fields.score_from_denoiser`` when gamma > 0,
        ``fields.score_from_velocity`` for gamma = 0 couplings); ignored by
        the ODE methods.
      key: PRNG key for the Euler-Maruyama noise; ignored by the ODE methods.
      mask: 1 = known, 0 = to generate, broadcasting against x0
        (``[batch, H, W, 1]`` for images); no other values (checked when the
        mask is a concrete array, i.e. outside jit). Known entries get no
        update: they stay bit-identical to x0.

    Returns:
      x1: [batch, ...] the samples at t_max, in the dtype of x0. A float32 or
        float64 x0 is integrated in its own precision; bfloat16 and float16
        are integrated in float32 and the result cast back. Time runs in the
        same precision (float64 only for a float64 state); field outputs are
        cast to it.
      info: a :class:`SamplerInfo`.

    Raises:
      ValueError: on a bad x0, mask, key or missing score; while tracing, when
        a field returns an array whose shape is not the state's.
    """
    x0 = jnp.asarray(x0)  # NumPy arrays and nested lists too
    mask = None if mask is None else jnp.asarray(mask)
    _check_inputs(x0, settings, score, key, mask)
    work = jnp.promote_types(x0.dtype, jnp.float32)
    # The integrators work on [batch, features]: XLA's CPU kernels run
    # element-wise passes over a narrow last axis (3 colour channels) more
    # slowly; the reshapes are free.
    shape = x0.shape
    flat = (shape[0], math.prod(shape[1:]))
    # A where, not a product: a non-finite update must not reach known pixels.
    known = None if mask is None else mask > 0
    frozen = None if known is None else jnp.broadcast_to(known, shape).reshape(flat)

    def checked(fn, name, t, x):
        state = x.reshape(shape)
        b = _checked_output(fn(t, state, xi), state, name)
        return b.astype(work).reshape(flat)

    def field(t, x):
        b = checked(velocity, "velocity", t, x)
        return b if frozen is None else jnp.where(frozen, 0.0, b).astype(work)

    def score_field(t, x):
        return checked(score, "score", t, x)

    start = x0.astype(work).reshape(flat)
    if settings.method == "euler":
        x1, info = _euler(field, start, settings)
    elif settings.method == "heun":
        x1, info = _heun(field, start, settings)
    elif settings.method == "dopri5":
        x1, info = _dopri5(field, start, settings, frozen)
    else:
        x1, info = _euler_maruyama(field, score_field, start, settings, key, frozen)
    x1 = x1.reshape(shape).astype(x0.dtype)
    if known is not None:  # x0's own bits: x + 0 turns -0.0 into +0.0
        x1 = jnp.where(known, x0, x1)
    return x1, info


def make_sampler(
    velocity: Field,
    settings: SamplerSettings,
    *,
    score: Field | None = None,
    mesh: Mesh | None = None,
) -> Callable[..., tuple[jax.Array, SamplerInfo]]:
    """A jitted ``sample(x0, xi, key=None, mask=None) -> (x1, info)``.

    With a mesh, x0, mask and every ``xi`` leaf whose leading axis is the
    batch are split over the mesh's data axis (the batch must be a multiple of
    the device count); x1 comes back split the same way, info replicated.
    Fields closing over parameters embed them in the program; to pass
    parameters as arguments, jit your own function that builds the field and
    calls :func:`integrate`.
    """
    _check_fields(settings, score)

    def sample(x0, xi, key=None, mask=None):
        return integrate(velocity, x0, xi, settings, score=score, key=key, mask=mask)

    if mesh is None:
        jitted_sample = jax.jit(sample)

        def checked_sample(x0, xi, key=None, mask=None):
            _check_finite_x0(x0)
            checks.check_binary_mask("mask", mask)
            return jitted_sample(x0, xi, key, mask)

        return checked_sample
    batch_sharding = sharding.batch_sharding(mesh)
    jitted = jax.jit(sample, out_shardings=(batch_sharding, sharding.replicated(mesh)))

    def sharded_sample(x0, xi, key=None, mask=None):
        # NumPy arrays of nested lists, as integrate takes them.
        x0 = x0 if hasattr(x0, "shape") else np.asarray(x0)
        mask = mask if mask is None or hasattr(mask, "shape") else np.asarray(mask)
        sharding.check_global_batch(x0.shape[0], mesh)
        _check_finite_x0(x0)
        checks.check_binary_mask("mask", mask)

        def place(a):
            split = jnp.ndim(a) >= 1 and a.shape[0] == x0.shape[0]
            target = batch_sharding if split else sharding.replicated(mesh)
            return jax.device_put(a, target)

        xi, mask = jax.tree.map(place, (xi, mask))
        key = None if key is None else jax.device_put(key, sharding.replicated(mesh))
        return jitted(place(x0), xi, key, mask)

    return sharded_sample


def check_info(info: SamplerInfo) -> SamplerInfo:
    """Raises on the host if a sampler stopped before t_max.

    Reads the device values (a synchronisation point); call it once per
    sampled batch, not inside a jitted function.

    Raises:
      RuntimeError: when ``info.success`` is False (Dopri5 out of max_steps).
    """
    if not bool(np.all(info.success)):
        raise RuntimeError(
            f"sampler stopped at t={float(np.min(info.t_final))} before t_max "
            f"after {int(np.max(info.accepted_steps))} accepted and "
            f"{int(np.max(info.rejected_steps))} rejected steps "
            f"({int(np.max(info.nfe))} field calls); raise max_steps or loosen "
            "rtol/atol"
        )
    return info


def _check_fields(settings: SamplerSettings, score) -> None:
    if not isinstance(settings, SamplerSettings):
        raise ValueError(
            f"settings must be a SamplerSettings, got {type(settings).__name__}"
        )
    if settings.needs_score and score is None:
        raise ValueError(
            f"method 'euler_maruyama' with eps_scale={settings.eps_scale} needs a "
            "score field: fields.score_from_denoiser (gamma > 0) or "
            "fields.score_from_velocity (gamma = 0 couplings); or set eps_scale=0"
        )


def _check_inputs(x0, settings, score, key, mask) -> None:
    _check_fields(settings, score)
    if jnp.ndim(x0) < 1:
        raise ValueError(f"x0 must be [batch, ...], got shape {jnp.shape(x0)}")
    if jnp.size(x0) == 0:
        raise ValueError(f"x0 of shape {jnp.shape(x0)} is empty")
    if not jnp.issubdtype(jnp.result_type(x0), jnp.floating):
        raise ValueError(
            f"x0 must be a floating-point array, got dtype {jnp.result_type(x0)}"
        )
    _check_finite_x0(x0)
    if settings.needs_score and key is None:
        raise ValueError(
            "method 'euler_maruyama' with eps_scale > 0 needs a PRNG key, got None"
        )
    if settings.method == "euler_maruyama" and key is not None:
        _check_key(key)
    if mask is not None:
        checks.check_mask("mask", mask, jnp.shape(x0), "x0")


def _check_key(key) -> None:
    """Raises unless ``key`` is one PRNG key: ``jax.random.key(seed)`` or a
    raw ``uint32[2]`` one (``jax.random.PRNGKey``)."""
    dtype, shape = getattr(key, "dtype", None), jnp.shape(key)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == jnp.uint32 and shape == (2,)
    if not ((typed and shape == ()) or raw):
        raise ValueError(
            "key must be one PRNG key (jax.random.key(seed)), got "
            f"{type(key).__name__} of dtype {dtype} and shape {shape}"
        )


def _check_finite_x0(x0) -> None:
    """Raises unless a concrete x0 is finite everywhere (traced x0 passes).

    Checked as the sampler will see it (a float64 NumPy array becomes float32
    without x64, where 1e39 is inf); counted where x0 lives, and x0 itself
    comes to the host only to name the first bad entry.
    """
    if isinstance(x0, jax.core.Tracer):
        return
    if isinstance(x0, jax.Array) and not x0.is_fully_addressable:
        return
    if jnp.ndim(x0) < 1:  # the shape check names that first
        return
    x0 = jnp.asarray(x0)
    bad = int(jnp.sum(~jnp.isfinite(x0)))
    if bad:
        values = np.asarray(x0)
        first = tuple(int(i) for i in np.argwhere(~np.isfinite(values))[0])
        raise ValueError(
            f"x0 must be finite, got {bad} NaN or infinite values as {x0.dtype} "
            f"(the first at index {first}: {values[first]})"
        )


def _checked_output(b, x: jax.Array, name: str) -> jax.Array:
    """The field's output, if it has the state's shape and a float dtype."""
    if not (hasattr(b, "shape") and hasattr(b, "dtype")):
        raise ValueError(
            f"the {name} field returned a {type(b).__name__}; it must return an "
            f"array of the state's shape {x.shape}"
        )
    if jnp.shape(b) != x.shape:
        raise ValueError(
            f"the {name} field returned shape {jnp.shape(b)} for a state of "
            f"shape {x.shape}; it must return the state's shape"
        )
    if not jnp.issubdtype(jnp.result_type(b), jnp.floating):
        raise ValueError(
            f"the {name} field returned dtype {jnp.result_type(b)}; expected a "
            "floating-point array"
        )
    return b


def _info(nfe, nfe_score, t_final, accepted, rejected, success) -> SamplerInfo:
    return SamplerInfo(
        nfe=jnp.asarray(nfe, jnp.int32),
        nfe_score=jnp.asarray(nfe_score, jnp.int32),
        t_final=jnp.asarray(t_final),
        accepted_steps=jnp.asarray(accepted, jnp.int32),
        rejected_steps=jnp.asarray(rejected, jnp.int32),
        success=jnp.asarray(success, jnp.bool_),
    )


def _fixed_info(settings: SamplerSettings, dtype, nfe: int, nfe_score: int = 0):
    t_final = np.asarray(settings.t_max, dtype)
    return _info(nfe, nfe_score, t_final, settings.num_steps, 0, True)


def _euler(field, x0, settings):
    times, steps = map(jnp.asarray, time_grid(settings, x0.dtype))

    def step(i, x):
        return x + steps[i] * field(times[i], x)

    x1 = jax.lax.fori_loop(0, settings.num_steps, step, x0)
    return x1, _fixed_info(settings, x0.dtype, settings.num_steps)


def _heun(field, x0, settings):
    """Heun's method, looping over the 2N - 1 model calls.

    Call j = 2i (predictor) evaluates at (t_i, x_i) and proposes
    y = x_i + h_i k1; call j = 2i + 1 (corrector) evaluates at (t_{i+1}, y)
    and sets x_{i+1} = x_i + h_i (k1 + k2) / 2. The loop ends with the
    predictor of step N - 1, whose proposal is the Euler last step.
    """
    times, steps = map(jnp.asarray, time_grid(settings, x0.dtype))
    nfe = 2 * settings.num_steps - 1

    def call(j, state):
        x, y, k1 = state
        i = j // 2
        predictor = j % 2 == 0
        k = field(jnp.where(predictor, times[i], times[i + 1]), y)
        corrected = x + (0.5 * steps[i]) * (k1 + k)
        x = jnp.where(predictor, x, corrected)
        y = jnp.where(predictor, x + steps[i] * k, corrected)
        k1 = jnp.where(predictor, k, k1)
        return x, y, k1

    _, x1, _ = jax.lax.fori_loop(0, nfe, call, (x0, x0, jnp.zeros_like(x0)))
    return x1, _fixed_info(settings, x0.dtype, nfe)


def _euler_maruyama(field, score, x0, settings, key, frozen):
    """Euler-Maruyama; the last step is an Euler step of the ODE.

    The score is evaluated on every step, at the same (t, x) as the velocity,
    and its term dropped on the last step: with no branch around it, XLA
    merges a score built from the same network call (``score_from_velocity``,
    or a denoiser head of the velocity network) with the velocity call.
    """
    times, steps = map(jnp.asarray, time_grid(settings, x0.dtype))
    n = settings.num_steps
    if not settings.needs_score:
        x1, _ = _euler(field, x0, settings)
        return x1, _fixed_info(settings, x0.dtype, n)
    eps = eps_schedule(settings.eps_schedule, settings.eps_scale)

    def step(i, x):
        t, h = times[i], steps[i]
        b, s = field(t, x), score(t, x)
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        e = eps(t)
        stochastic = (e * h) * s + jnp.sqrt(2.0 * e * h) * noise
        stochastic = jnp.where(i < n - 1, stochastic, 0.0)
        if frozen is not None:
            stochastic = jnp.where(frozen, 0.0, stochastic).astype(x.dtype)
        return x + h * b + stochastic

    x1 = jax.lax.fori_loop(0, n, step, x0)
    return x1, _fixed_info(settings, x0.dtype, 2 * n, n)


# Dormand-Prince 5(4). Row s of _DP_A gives the point of stage s from the
# earlier stages, _DP_C its time node; the 5th-order weights equal the last
# row (first same as last); _DP_E is the 5th- minus the 4th-order weights.
# Row _PROBE (appended) is the one extra call of the automatic first step,
# at (t0 + h0, x0 + h0 k0).
_PROBE = 7
_DP_C = np.array([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0, 1.0])
_DP_A = np.zeros((8, 7))
_DP_A[1, :1] = [1 / 5]
_DP_A[2, :2] = [3 / 40, 9 / 40]
_DP_A[3, :3] = [44 / 45, -56 / 15, 32 / 9]
_DP_A[4, :4] = [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729]
_DP_A[5, :5] = [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]
_DP_A[6, :6] = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]
_DP_A[_PROBE, 0] = 1.0
_DP_E = np.array(
    [71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40]
)
# What follows a call of each row: 0 start, 1 probe, 2 next stage, 3 finish.
_DP_BRANCH = np.array([0, 2, 2, 2, 2, 2, 3, 1])


class _Dopri5State(NamedTuple):
    t: jax.Array  # [] time of the last accepted step (the state's dtype)
    x: jax.Array  # [batch, ...] state at t
    h: jax.Array  # [] step size of the current attempt (the state's dtype)
    k0: jax.Array  # [batch, ...] field at (t, x)
    stages: jax.Array  # [6, batch, ...] stages 1..6 of the current attempt
    error: jax.Array  # [batch, ...] sum_s _DP_E[s] k_s over the stages so far
    row: jax.Array  # [] int32 which row of _DP_A the next call evaluates
    accepted: jax.Array  # [] int32
    rejected: jax.Array  # [] int32
    calls: jax.Array  # [] int32 model calls made


def _rms(x: jax.Array, count=None) -> jax.Array:
    """Root mean square over ``count`` entries (default all; the others are 0)."""
    if count is None:
        return jnp.sqrt(jnp.mean(jnp.square(x)))
    return jnp.sqrt(jnp.sum(jnp.square(x)) / count)


def _dopri5(field, x0, settings, frozen=None):
    """Dormand-Prince 5(4) as one loop over model calls.

    Every iteration makes exactly one call, at row ``state.row`` of the
    tableau, then starts the step size (row 0 and the probe), moves to the next
    stage, or finishes the step (row 6): error estimate, accept or reject,
    new step size. The field is traced once.

    Only scalars come out of the step-size branch (start, probe, next stage,
    finish), and the stage buffer is written once per call (the new stage)
    and never passed into it: k0 and the running error sum are separate
    arrays. So no iteration copies the stage buffer, which on a cheap field
    would cost more than the call. The point where a row evaluates is formed
    in one pass with that row's weights, read from the tableau at run time:
    one kernel for all rows compiles faster than a branch per row, and runs
    as fast.
    """
    dtype = x0.dtype  # of the state and of time
    t1 = jnp.asarray(settings.t_max, dtype)
    c = jnp.asarray(_DP_C, dtype)
    # Error weight of the stage a row evaluates (none for row 0 and the probe).
    error_weights = jnp.asarray(np.append(_DP_E, 0.0), dtype).at[0].set(0.0)
    k0_error_weight = jnp.asarray(_DP_E[0], dtype)
    branch = jnp.asarray(_DP_BRANCH)
    no = jnp.bool_(False)

    a = jnp.asarray(_DP_A, dtype)

    def point(x, k0, stages, h, row):
        # x + h sum_s a[row, s] k_s in one pass over k0 and stages 1-5 (no
        # row weights stage 6). Stages a row does not weight may be left from
        # a rejected attempt: they are stored finite (below), so their zero
        # weights give zeros.
        weights = a[row]
        total = weights[0] * k0
        for s in range(1, 6):
            total = total + weights[s] * stages[s - 1]
        return x + h.astype(dtype) * total

    # Norms are taken over the entries that move (frozen, of x0's shape, is
    # True where an entry is known): known ones may hold anything, and
    # counting them would loosen the tolerance by the share of the state
    # they take.
    if frozen is None:
        count = None
    else:
        count = jnp.maximum(jnp.sum(~frozen, dtype=jnp.int32), 1).astype(dtype)

    def moving(x):
        return x if frozen is None else jnp.where(frozen, 0.0, x).astype(dtype)

    # Each branch returns (new h, next row, accepted), reading arrays only.
    def start(x, k0, y, k, error, h, row):
        if settings.first_step is not None:
            return jnp.asarray(settings.first_step, dtype), jnp.int32(1), no
        return _first_step_guess(moving(x), k, settings, count), jnp.int32(_PROBE), no

    def probe(x, k0, y, k, error, h, row):
        return _first_step(moving(x), k0, k, h, settings, count), jnp.int32(1), no

    def next_stage(x, k0, y, k, error, h, row):
        return h, row + 1, no

    def finish(x, k0, y, k, error, h, row):
        scale = settings.atol + settings.rtol * jnp.maximum(jnp.abs(x), jnp.abs(y))
        ok, factor = _controller(_rms(moving(h * error / scale), count), settings)
        return (h * factor).astype(dtype), jnp.int32(1), ok

    def call(state):
        row = state.row
        clipped = state.h >= t1 - state.t  # this attempt ends at t_max
        h = jnp.where(row == _PROBE, state.h, jnp.minimum(state.h, t1 - state.t))
        # At most t_max: t + c h may round one ulp past it (the probe's h0
        # is at most t_max - t_min, computed apart).
        t = jnp.where((row == 6) & clipped, t1, jnp.minimum(state.t + c[row] * h, t1))
        y = point(state.x, state.k0, state.stages, h, row)
        k = field(t, y)
        # A non-finite stage is stored as 0; the attempt is still rejected,
        # since the error sum takes every stage raw (weight 0 included), and
        # NaN times 0 is NaN.
        finite_k = jnp.where(jnp.isfinite(k), k, 0)
        stages = state.stages.at[jnp.clip(row - 1, 0, 5)].set(finite_k)
        error = jnp.where(row == 1, k0_error_weight * state.k0, state.error)
        error = error + error_weights[row] * k
        new_h, new_row, ok = jax.lax.switch(
            branch[row],
            [start, probe, next_stage, finish],
            state.x,
            state.k0,
            y,
            k,
            error,
            h,
            row,
        )
        done = branch[row] == 3
        accept = done & ok
        # First same as last: an accepted step's last stage is the next k0.
        return state._replace(
            t=jnp.where(accept, jnp.where(clipped, t1, state.t + h), state.t),
            x=jnp.where(accept, y, state.x),
            h=new_h,
            k0=jnp.where(accept | (row == 0), k, state.k0),
            stages=stages,
            error=error,
            row=new_row,
            accepted=state.accepted + accept.astype(jnp.int32),
            rejected=state.rejected + (done & ~ok).astype(jnp.int32),
            calls=state.calls + 1,
        )

    def running(state):
        attempts = state.accepted + state.rejected
        return (state.t < t1) & (attempts < settings.max_steps)

    zero = jnp.int32(0)
    state = _Dopri5State(
        t=jnp.asarray(settings.t_min, dtype),
        x=x0,
        h=jnp.asarray(0.0, dtype),
        k0=jnp.zeros_like(x0),
        stages=jnp.zeros((6,) + x0.shape, dtype),
        error=jnp.zeros_like(x0),
        row=zero,
        accepted=zero,
        rejected=zero,
        calls=zero,
    )
    state = jax.lax.while_loop(running, call, state)
    return state.x, _info(
        state.calls, 0, state.t, state.accepted, state.rejected, state.t >= t1
    )


def _controller(err: jax.Array, settings) -> tuple[jax.Array, jax.Array]:
    """Accept when err <= 1; the step factor safety * err^(-1/5), clipped.

    After a rejection the step may not grow; a NaN error rejects and shrinks.
    """
    ok = err <= 1.0
    # err = 0 grows the step the most; a NaN error shrinks it the most.
    limit = jnp.where(err == 0, settings.max_factor, settings.min_factor)
    factor = jnp.where(err > 0, settings.safety * err**-0.2, limit)
    factor = jnp.clip(
        factor, settings.min_factor, jnp.where(ok, settings.max_factor, 1.0)
    )
    return ok, factor


def _first_step_guess(x0, k0, settings, count=None) -> jax.Array:
    """Hairer's h0 = 0.01 |x0| / |k0| (scaled norms), at most t_max - t_min."""
    scale = settings.atol + settings.rtol * jnp.abs(x0)
    d0, d1 = _rms(x0 / scale, count), _rms(k0 / scale, count)
    h0 = 0.01 * d0 / d1
    # Hairer's 1e-6 for tiny norms, and where a norm overflowed (h0 = 0 or
    # NaN).
    use_default = (d0 < 1e-5) | (d1 < 1e-5) | ~(h0 > 0)
    h0 = jnp.where(use_default, 1e-6, h0)
    return jnp.minimum(h0, settings.t_max - settings.t_min).astype(x0.dtype)


def _first_step(x0, k0, k_probe, h0, settings, count=None) -> jax.Array:
    """Hairer's first step from the probe k_probe = f(t0 + h0, x0 + h0 k0)."""
    scale = settings.atol + settings.rtol * jnp.abs(x0)
    d1 = _rms(k0 / scale, count)
    d2 = _rms((k_probe - k0) / scale, count) / h0
    biggest = jnp.maximum(d1, d2)
    h1 = jnp.where(
        biggest <= 1e-15,
        jnp.maximum(1e-6, h0 * 1e-3),
        (0.01 / jnp.maximum(biggest, 1e-15)) ** 0.2,
    )
    # A non-finite probe or an overflowed norm (h1 NaN or 0): start from the
    # guess h0; the error test shrinks it from there if it must.
    h1 = jnp.where(h1 > 0, h1, h0)
    h = jnp.minimum(jnp.minimum(100.0 * h0, h1), settings.t_max - settings.t_min)
    return h.astype(x0.dtype)
