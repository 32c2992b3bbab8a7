"""Train state, optimizer and the jitted training step."""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, PartitionSpec

from stochinterp import losses, sharding


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes.

    Attributes:
      step: int32 scalar, number of updates applied.
      params: network parameters (float32).
      ema_params: exponential moving average of ``params``.
      opt_state: optimizer state (float32).
      key: PRNG key; the key of step n is ``fold_in(key, n)``, so a resumed
        run draws the same numbers as an uninterrupted one.
      bad_step: -1, or the first step whose loss or gradient was not finite.
        From that step on no update is applied, so the state stays finite.
    """

    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: optax.OptState
    key: jax.Array
    bad_step: jax.Array


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with a staircase exponential decay and global-norm clipping."""
    if not 0 < config.learning_rate < float("inf"):
        raise ValueError(
            f"optim.learning_rate must be finite and > 0, got {config.learning_rate}"
        )
    if not 0 < config.grad_clip < float("inf"):
        raise ValueError(
            f"optim.grad_clip (the global-norm bound) must be finite and > 0, got "
            f"{config.grad_clip}"
        )
    for name in ("b1", "b2"):
        if not 0 <= config[name] < 1:
            raise ValueError(f"optim.{name} must lie in [0, 1), got {config[name]}")
    if not 0 < config.decay_rate <= 1:
        raise ValueError(
            f"optim.decay_rate must lie in (0, 1], got {config.decay_rate}"
        )
    if config.decay_steps < 1:
        raise ValueError(f"optim.decay_steps must be >= 1, got {config.decay_steps}")
    schedule = optax.exponential_decay(
        config.learning_rate,
        transition_steps=config.decay_steps,
        decay_rate=config.decay_rate,
        staircase=True,
    )
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adam(schedule, b1=config.b1, b2=config.b2),
    )


def create_train_state(
    params: dict, optimizer: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    """A fresh state at step 0 from initialised parameters."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        key=key,
        bad_step=jnp.full((), -1, jnp.int32),
    )


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The EMA decay used at ``step``: min(decay, (1 + n) / (10 + n)) with warm-up."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    n = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def _check_micro_batch_count(micro_batches) -> None:
    if (
        isinstance(micro_batches, bool)
        or not isinstance(micro_batches, int)
        or micro_batches < 1
    ):
        raise ValueError(
            f"train.micro_batches must be an integer >= 1, got {micro_batches!r}"
        )


def check_micro_batches(micro_batches, global_batch: int, devices: int) -> None:
    """Raises unless each device's part of the batch splits into ``micro_batches``."""
    _check_micro_batch_count(micro_batches)
    if global_batch % (devices * micro_batches):
        raise ValueError(
            f"train.global_batch={global_batch} must be a multiple of the number "
            f"of devices ({devices}) times train.micro_batches ({micro_batches})"
        )


def per_device_gradients(loss_fn: Callable, mesh: Mesh, micro_batches: int) -> Callable:
    """``value_and_grad(loss_fn, has_aux=True)``, computed device by device.

    Each device takes the gradient of the loss on its own part of the batch,
    in ``micro_batches`` passes of equal size (their mean), and the devices
    average once at the end: one all-reduce per step. (Not less memory: the
    compiled step's buffers are about as large for any count.) The loss must
    be a mean over examples, so that the mean over equal parts is the loss of
    the whole batch; the per-example terms come back in device order, each
    device's micro-batches in turn.

    Randomness: pass ``i`` on device ``d`` calls ``loss_fn`` with
    ``fold_in(fold_in(key, d), i)``, so every example still gets its own
    draws, though other draws than the step without micro-batches makes.

    Returns:
      ``grad_fn(params, key, x1, labels) -> ((loss, terms), grads)``, for use
      inside ``jax.jit`` with the batch split over ``mesh``'s data axis.
      ``x1`` and ``labels`` (or None) may be arrays or pytrees of arrays,
      all with the batch as their first axis; so may ``terms``.

    Raises:
      ValueError: here, unless ``micro_batches`` is an integer >= 1; when
        traced, unless each device's part of the batch splits into
        ``micro_batches`` equal passes.
    """
    _check_micro_batch_count(micro_batches)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    axis = sharding.DATA_AXIS

    def local(params, key, x1, labels):
        key = jax.random.fold_in(key, jax.lax.axis_index(axis))
        share = jax.tree.leaves(x1)[0].shape[0]
        if share % micro_batches:
            raise ValueError(
                f"each device's part of the batch ({share} examples) must split "
                f"into micro_batches={micro_batches} equal passes"
            )
        size = share // micro_batches
        total = None
        terms = []
        for i in range(micro_batches):
            part = slice(i * size, (i + 1) * size)
            (loss, part_terms), grads = grad_fn(
                params,
                jax.random.fold_in(key, i),
                *jax.tree.map(lambda a, part=part: a[part], (x1, labels)),
            )
            terms.append(part_terms)
            total = (
                (loss, grads)
                if total is None
                else jax.tree.map(jnp.add, total, (loss, grads))
            )
        loss, grads = jax.lax.pmean(
            jax.tree.map(lambda a: a / micro_batches, total), axis
        )
        terms = jax.tree.map(lambda *parts: jnp.concatenate(parts), *terms)
        return (loss, terms), grads

    batch, whole = PartitionSpec(axis), PartitionSpec()
    # check_vma=False: with it on, the gradient with respect to the replicated
    # parameters would already be summed over the devices by autodiff; here
    # each device's gradient stays its own until the one explicit pmean.
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(whole, whole, batch, batch),
        out_specs=((whole, batch), whole),
        check_vma=False,
    )


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    ema_decay: float,
    ema_warmup: bool = True,
    time_bins: int = 10,
    t_range: tuple[float, float] = (0.0, 1.0),
    *,
    mesh: Mesh | None = None,
    micro_batches: int = 1,
) -> Callable:
    """Returns ``step(state, batch) -> (state, metrics)``, pure and jittable.

    Args:
      loss_fn: ``loss_fn(params, key, x1, labels) -> (loss, LossTerms)``.
      optimizer: the optax transformation.
      ema_decay: decay of the parameter average.
      ema_warmup: use the warm-up schedule of ``ema_decay_at``.
      time_bins: number of time bins for the loss-by-time metrics.
      t_range: (t_min, t_max) of the time bins.
      mesh: the data-parallel mesh; needed when ``micro_batches > 1``.
      micro_batches: 1: the gradient of the whole batch as one program that
        XLA partitions over the devices. More: each device computes its
        gradient alone in that many passes (``per_device_gradients``).

    A non-finite loss or gradient leaves the state unchanged and records the
    step in ``state.bad_step``; the caller checks it when it logs or saves.
    """
    _check_micro_batch_count(micro_batches)
    if micro_batches == 1:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    elif mesh is None:
        raise ValueError(f"micro_batches={micro_batches} needs the mesh")
    else:
        grad_fn = per_device_gradients(loss_fn, mesh, micro_batches)

    def step(state: TrainState, batch: dict):
        key = jax.random.fold_in(state.key, state.step)
        (loss, terms), grads = grad_fn(
            state.params, key, batch["image"], batch.get("label")
        )
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, ema_decay, ema_warmup)
        ema = jax.tree.map(
            lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params
        )

        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.bad_step < 0)
        new = state.replace(
            step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state
        )
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
        bad_step = jnp.where(ok | (state.bad_step >= 0), state.bad_step, state.step)
        new = new.replace(bad_step=bad_step)

        bin_sums, bin_counts = losses.loss_by_time_bin(
            terms.t, terms.velocity_mse, time_bins, *t_range
        )
        metrics = {
            "loss": loss,
            "mse": jnp.mean(terms.velocity_mse),
            "grad_norm": grad_norm,
            "mse_bin_sums": bin_sums,
            "mse_bin_counts": bin_counts,
        }
        return new, metrics

    return step
