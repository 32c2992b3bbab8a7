"""Sampler overhead: wall time per model call against one forward pass.

For each sampler of ``stochinterp.samplers`` on a small U-Net velocity field,
prints

    ratio = sampler wall time / (nfe x wall time of one forward pass)

A ratio of 1 means the integrator costs nothing beyond the network calls.
A hand-written ``lax.fori_loop`` of Euler steps is timed as a baseline: it
shows what running the network inside a compiled loop costs by itself.
The forward pass is timed as its own jitted program on the same batch, run
20 times back to back (a window as long as a sampler's run: the fastest of
many single 20 ms calls would be a luckier minimum than a sampler's); the
sampler as one jitted program (parameters passed as arguments). Rounds
alternate between the programs so that load from other jobs falls on all of
them alike. Two ratios are printed: from the fastest round of each program
(on a shared machine the minimum is the least disturbed estimate), and the
median over rounds of each round's own ratio (sampler against the forward
passes of the same round).

    .venv/bin/python benchmarks/sampler_overhead.py [--rounds 7]
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from stochinterp import fields, interpolants, samplers  # noqa: E402
from stochinterp.models import UNet  # noqa: E402

Settings = samplers.SamplerSettings

# The field: a small U-Net on a batch of 16x16 RGB images.
BATCH, SIDE, CHANNELS = 16, 16, 3
MODEL = UNet(dim=16, dim_mults=(1, 2), out_channels=CHANNELS)

FORWARD_CALLS = 20

SAMPLERS = {
    "euler (N=20)": Settings("euler", num_steps=20),
    "heun (N=10)": Settings("heun", num_steps=10),
    "dopri5 (tol 1e-3)": Settings(rtol=1e-3, atol=1e-3),
    "euler_maruyama (N=20)": Settings("euler_maruyama", num_steps=20),
}


def network_setup(seed: int = 0):
    """(params, x0, velocity(params, t, x)) for the benchmark field."""
    x0 = jax.random.normal(jax.random.key(seed), (BATCH, SIDE, SIDE, CHANNELS))
    params = MODEL.init(jax.random.key(seed + 1), x0, jnp.zeros(BATCH))

    def velocity(params, t, x):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        return MODEL.apply(params, x, t)

    return params, x0, velocity


def sampler_program(velocity, settings: Settings):
    """A jitted ``sample(params, x0, key) -> (x1, info)``."""

    def sample(params, x0, key):
        field = lambda t, x, xi: velocity(params, t, x)  # noqa: E731
        score = fields.score_from_velocity(
            field, interpolants.linear(), jnp.zeros_like(x0), 1.0
        )
        return samplers.integrate(field, x0, {}, settings, score=score, key=key)

    return jax.jit(sample)


def plain_euler_program(velocity, num_steps: int = 20):
    """Baseline: the shortest possible jitted Euler loop, 20 calls."""

    def sample(params, x0, key):
        h = 1.0 / num_steps

        def step(i, x):
            return x + h * velocity(params, i * h, x)

        return jax.lax.fori_loop(0, num_steps, step, x0)

    return jax.jit(sample)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def environment() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, jax {jax.__version__}, "
        f"flax {flax.__version__}, devices {jax.devices()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    params, x0, velocity = network_setup()
    key = jax.random.key(2)
    forward = jax.jit(velocity)
    programs = {name: sampler_program(velocity, s) for name, s in SAMPLERS.items()}
    timed(forward, params, 0.5, x0)
    nfe = {}
    for name, program in programs.items():
        _, info = program(params, x0, key)
        nfe[name] = int(info.nfe)
    programs["plain fori_loop euler (baseline)"] = plain_euler_program(velocity)
    nfe["plain fori_loop euler (baseline)"] = 20
    jax.block_until_ready(programs["plain fori_loop euler (baseline)"](params, x0, key))

    def forward_calls() -> float:
        start = time.perf_counter()
        for _ in range(FORWARD_CALLS):
            out = forward(params, 0.5, x0)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / FORWARD_CALLS

    times = {name: [] for name in ["forward", *programs]}
    for _ in range(args.rounds):
        times["forward"].append(forward_calls())
        for name, program in programs.items():
            times[name].append(timed(program, params, x0, key))
    forward_s = min(times["forward"])

    print(environment())
    print(f"UNet(dim=16, dim_mults=(1, 2)), batch {BATCH}x{SIDE}x{SIDE}x{CHANNELS}")
    print(
        f"forward pass: {1e3 * forward_s:.2f} ms ({FORWARD_CALLS} calls back to "
        f"back, best of {args.rounds} rounds)"
    )
    print("| sampler | nfe | wall time (ms) | ratio | median round ratio |")
    print("|---|---|---|---|---|")
    for name in programs:
        wall = min(times[name])
        ratio = wall / (nfe[name] * forward_s)
        paired = np.median(
            [
                w / (nfe[name] * f)
                for w, f in zip(times[name], times["forward"], strict=True)
            ]
        )
        print(
            f"| {name} | {nfe[name]} | {1e3 * wall:.1f} | {ratio:.3f} | {paired:.3f} |"
        )


if __name__ == "__main__":
    main()
