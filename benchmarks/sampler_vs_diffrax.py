"""Our Heun and Dopri5 against diffrax's on the same U-Net field.

For each pair prints the compile time (trace and lower, then XLA compile, of
the whole jitted sampler, each measured in a fresh process after one forward
pass of the network has been compiled there; best of ``--compile-repeats``),
the run time (fastest of several rounds, alternating
between the two implementations), the number of field calls (counted by a
callback in a separate run, for both libraries) and the largest difference
between the two results.

diffrax is a benchmark-only dependency (``pip install -e '.[bench]'``);
the library never imports it.

    .venv/bin/python benchmarks/sampler_vs_diffrax.py [--rounds 5]
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from sampler_overhead import environment, network_setup, timed  # noqa: E402

from stochinterp import samplers  # noqa: E402

Settings = samplers.SamplerSettings
HEUN_STEPS = 10
TOLERANCE = 1e-5
CASES = {
    f"heun (N={HEUN_STEPS})": Settings("heun", num_steps=HEUN_STEPS),
    f"dopri5 (rtol=atol={TOLERANCE})": Settings(rtol=TOLERANCE, atol=TOLERANCE),
}


def ours(velocity, settings: Settings):
    def sample(params, x0):
        field = lambda t, x, xi: velocity(params, t, x)  # noqa: E731
        return samplers.integrate(field, x0, {}, settings)[0]

    return sample


def theirs(velocity, settings: Settings):
    term = diffrax.ODETerm(lambda t, y, params: velocity(params, t, y))
    if settings.method == "heun":
        solver = diffrax.Heun()
        controller = diffrax.ConstantStepSize()
        dt0 = (settings.t_max - settings.t_min) / settings.num_steps
    else:
        solver = diffrax.Dopri5()
        controller = diffrax.PIDController(rtol=settings.rtol, atol=settings.atol)
        dt0 = None

    def sample(params, x0):
        solution = diffrax.diffeqsolve(
            term,
            solver,
            settings.t_min,
            settings.t_max,
            dt0,
            x0,
            args=params,
            stepsize_controller=controller,
            saveat=diffrax.SaveAt(t1=True),
            max_steps=settings.max_steps,
        )
        return solution.ys[0]

    return sample


def floor(velocity, settings: Settings):
    """The least any sampler can compile: the network once, in a loop."""

    def sample(params, x0):
        def step(i, x):
            return x + 0.1 * velocity(params, 0.1 * i, x)

        return jax.lax.fori_loop(0, 10, step, x0)

    return sample


def counted(velocity, log):
    def wrapped(params, t, x):
        jax.debug.callback(lambda: log.append(1))
        return velocity(params, t, x)

    return wrapped


def compile_here(case: str, library: str) -> None:
    """Prints 'lower_s compile_s' for one sampler, in this (fresh) process."""
    params, x0, velocity = network_setup()
    jax.block_until_ready(jax.jit(velocity)(params, 0.5, x0))
    make = {"stochinterp": ours, "diffrax": theirs, "floor": floor}[library]
    start = time.perf_counter()
    lowered = jax.jit(make(velocity, CASES[case])).lower(params, x0)
    middle = time.perf_counter()
    lowered.compile()
    print(f"{middle - start} {time.perf_counter() - middle}")


def compile_seconds(case: str, library: str, repeats: int) -> tuple[float, float]:
    """Best (lower, compile) seconds over fresh processes."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--compile", case, library],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        lower, compile_ = float(out[-2]), float(out[-1])
        if lower + compile_ < sum(best):
            best = (lower, compile_)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile-repeats", type=int, default=2)
    parser.add_argument("--compile", nargs=2, metavar=("CASE", "LIBRARY"))
    args = parser.parse_args()
    if args.compile:
        compile_here(*args.compile)
        return

    params, x0, velocity = network_setup()
    jax.block_until_ready(jax.jit(velocity)(params, 0.5, x0))  # warm up XLA
    implementations = {"stochinterp": ours, "diffrax": theirs}

    print(environment())
    print(f"diffrax {diffrax.__version__}, equinox {eqx.__version__}")
    print(
        "| sampler | library | trace+lower (s) | XLA compile (s) | run (ms) "
        "| field calls | max diff |"
    )
    print("|---|---|---|---|---|---|---|")
    lower, compile_ = compile_seconds(next(iter(CASES)), "floor", args.compile_repeats)
    print(
        f"| floor: the network in a plain fori_loop | - | {lower:.2f} | "
        f"{compile_:.2f} | - | - | - |"
    )
    for case, settings in CASES.items():
        compiled, programs, calls, results = {}, {}, {}, {}
        for name, make in implementations.items():
            compiled[name] = compile_seconds(case, name, args.compile_repeats)
            log = []
            jax.block_until_ready(
                jax.jit(make(counted(velocity, log), settings))(params, x0)
            )
            jax.effects_barrier()
            calls[name] = len(log)
            programs[name] = jax.jit(make(velocity, settings))
            results[name] = programs[name](params, x0)
        runs = {name: [] for name in programs}
        for _ in range(args.rounds):
            for name, program in programs.items():
                runs[name].append(timed(program, params, x0))
        first, second = results.values()
        difference = float(jnp.abs(first - second).max())
        for name in programs:
            lower, compile_ = compiled[name]
            print(
                f"| {case} | {name} | {lower:.2f} | {compile_:.2f} | "
                f"{1e3 * min(runs[name]):.1f} | {calls[name]} | {difference:.1e} |"
            )


if __name__ == "__main__":
    main()
