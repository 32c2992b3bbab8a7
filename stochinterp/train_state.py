"""Train state, optimizer and the jitted training step."""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from stochinterp import losses


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


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    ema_decay: float,
    ema_warmup: bool = True,
    time_bins: int = 10,
    t_range: tuple[float, float] = (0.0, 1.0),
) -> Callable:
    """Returns ``step(state, batch) -> (state, metrics)``, pure and jittable.

    Args:
      loss_fn: ``loss_fn(params, key, x1, labels) -> (loss, LossTerms)``.
      optimizer: the optax transformation.
      ema_decay: decay of the parameter average.
      ema_warmup: use the warm-up schedule of ``ema_decay_at``.
      time_bins: number of time bins for the loss-by-time metrics.
      t_range: (t_min, t_max) of the time bins.

    A non-finite loss or gradient leaves the state unchanged and records the
    step in ``state.bad_step``; the caller checks it when it logs or saves.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

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
