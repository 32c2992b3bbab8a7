"""Training throughput of the Flax UNet against the PyTorch ``Unet`` reference.

Times one training step (forward, backward, Adam update) of

- ``ours``: ``stochinterp.models.UNet`` in JAX, the batch split over a mesh of
  XLA CPU devices (2 by default, one per core);
- ``torch-package``: the ``Unet`` of ``denoising-diffusion-pytorch`` as it
  ships, in the closest configuration (learned sinusoidal time features of
  width 32, 4 heads x 32);
- ``torch-paper``: the same class with its layers swapped for the paper's
  layout (GroupNorm(8) in the ResNet blocks, 4x4 stride-2 downsampling, no
  memory key/values, 4 x 64 middle attention). Its parameters are copied from
  ours and its output is compared with ours before timing: the two networks
  compute the same function.

Each network trains in a worker process of its own (``--one-process``: all in
this one), so that each library has its ``malloc`` to itself. Rounds alternate
between the networks so that load from other jobs falls on all of them alike;
each round starts with one untimed step (the first step after another network
ran is slower, for torch and XLA alike), and the median round is reported.
Like the launchers, the script first restarts itself with the host memory
settings of ``stochinterp.host_memory`` (transparent huge pages and heap
thresholds for ``malloc``, which the worker processes inherit, so both
libraries get them; XLA's temporary buffers in heaps of 16 MiB);
``STOCHINTERP_HUGE_PAGES=0`` keeps the defaults. Run in the benchmark
environment (``pip install -e '.[bench]'`` or as docs/benchmarks/unet.md says):

    .venv-bench/bin/python benchmarks/unet_throughput.py
"""

from __future__ import annotations

import os

from stochinterp.host_memory import restart_with_huge_pages

restart_with_huge_pages()  # before any work; both libraries get the setting

# Must precede the first jax import.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from stochinterp import sharding  # noqa: E402
from stochinterp import train_state as train_state_lib  # noqa: E402
from stochinterp.models import UNet, count_params  # noqa: E402

# ---------------------------------------------------------------------------
# The reference, imported without its training-only dependencies.
# ---------------------------------------------------------------------------

_STUBBED = ("torchvision", "accelerate", "ema_pytorch")
# Suffix of the runner kinds whose gradient is taken in --micro-batches passes.
MICRO = "-mb"


class _Stub(types.ModuleType):
    """A module whose every attribute is a placeholder (never called here)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def load_reference():
    """Imports ``denoising_diffusion_pytorch.denoising_diffusion_pytorch``.

    The package ``__init__`` (which imports every model of the package) is not
    run, and torchvision, accelerate and ema_pytorch, which only its Trainer
    uses, are replaced by placeholder modules. Other imports (einops, scipy,
    PIL, tqdm, packaging) must be installed.
    """
    module = "denoising_diffusion_pytorch.denoising_diffusion_pytorch"
    if module in sys.modules:  # imported before by this function
        return sys.modules[module]
    spec = importlib.util.find_spec("denoising_diffusion_pytorch")
    if spec is None:
        raise SystemExit(
            "denoising-diffusion-pytorch is not installed; see "
            "docs/benchmarks/unet.md for the benchmark environment"
        )
    package = types.ModuleType("denoising_diffusion_pytorch")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["denoising_diffusion_pytorch"] = package
    for name in _STUBBED:
        if name not in sys.modules:
            sys.modules[name] = _Stub(name)
    return importlib.import_module(module)


def package_version() -> str:
    from importlib import metadata

    return metadata.version("denoising-diffusion-pytorch")


def make_reference(ref, dim: int, dim_mults: tuple[int, ...], paper: bool):
    """The reference Unet; with ``paper`` its layers follow the paper's layout."""
    import torch.nn as tnn

    net = ref.Unet(
        dim=dim,
        dim_mults=dim_mults,
        channels=3,
        learned_sinusoidal_cond=True,
        learned_sinusoidal_dim=32,
        full_attn=(False,) * len(dim_mults) if paper else None,
    )
    if not paper:
        return net
    for module in net.modules():
        if isinstance(module, ref.Block):
            module.norm = tnn.GroupNorm(8, module.proj.out_channels)
    for level in net.downs[:-1]:
        conv = level[3][1]
        level[3] = tnn.Conv2d(conv.in_channels // 4, conv.out_channels, 4, 2, 1)
    for level in [*net.downs, *net.ups]:
        width = level[2].to_out[0].out_channels
        level[2] = ref.LinearAttention(width, heads=4, dim_head=32, num_mem_kv=0)
    net.mid_attn = ref.Attention(
        dim * dim_mults[-1], heads=4, dim_head=64, num_mem_kv=0
    )
    return net


def copy_params_into(net, params) -> None:
    """Copies our Flax parameters into the paper-layout reference (NHWC -> NCHW)."""
    import torch

    def put(target, value):
        value = np.asarray(value)
        if value.ndim == 4:  # conv kernel [kh, kw, in, out] -> [out, in, kh, kw]
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:  # dense kernel [in, out] -> [out, in]
            value = value.T
        with torch.no_grad():
            target.copy_(torch.from_numpy(value.copy()).reshape(target.shape))

    def conv(module, p):
        put(module.weight, p["conv"]["kernel"])
        if "bias" in p["conv"]:
            put(module.bias, p["conv"]["bias"])

    def dense(module, p):
        put(module.weight, p["dense"]["kernel"])
        put(module.bias, p["dense"]["bias"])

    def resnet(module, p):
        dense(module.mlp[1], p["mlp"])
        for name in ("block1", "block2"):
            block = getattr(module, name)
            conv(block.proj, p[name]["proj"])
            put(block.norm.weight, p[name]["norm"]["scale"])
            put(block.norm.bias, p[name]["norm"]["bias"])
        if "res_conv" in p:
            conv(module.res_conv, p["res_conv"])

    def attention(module, p, linear: bool):
        put(module.norm.g, p["norm"]["g"])
        conv(module.to_qkv, p["to_qkv"])
        conv(module.to_out[0] if linear else module.to_out, p["to_out"])
        if linear:
            put(module.to_out[1].g, p["out_norm"]["g"])

    conv(net.init_conv, params["stem"])
    put(net.time_mlp[0].weights, params["time_features"]["weights"])
    dense(net.time_mlp[1], params["time_mlp1"])
    dense(net.time_mlp[3], params["time_mlp2"])
    for i, level in enumerate(net.downs):
        resnet(level[0], params[f"down{i}_block1"])
        resnet(level[1], params[f"down{i}_block2"])
        attention(level[2], params[f"down{i}_attn"], linear=True)
        conv(level[3], params[f"down{i}_down"])
    resnet(net.mid_block1, params["mid_block1"])
    attention(net.mid_attn, params["mid_attn"], linear=False)
    resnet(net.mid_block2, params["mid_block2"])
    for j, level in enumerate(net.ups):
        resnet(level[0], params[f"up{j}_block1"])
        resnet(level[1], params[f"up{j}_block2"])
        attention(level[2], params[f"up{j}_attn"], linear=True)
        up = level[3]
        conv(up[1] if hasattr(up, "__getitem__") else up, params[f"up{j}_up"])
    resnet(net.final_res_block, params["final_block"])
    conv(net.final_conv, params["final_conv"])


# ---------------------------------------------------------------------------
# Training steps.
# ---------------------------------------------------------------------------


def make_jax_step(model: UNet, optimizer, mesh, micro_batches: int = 1):
    """A jitted train step with the batch split over the mesh.

    With ``micro_batches > 1`` the gradient is taken as the library's training
    step takes it with ``train.micro_batches``: each device alone, in that
    many passes, averaged once (``train_state.per_device_gradients``).
    """

    def loss_fn(params, x_t, t, target):
        out = model.apply({"params": params}, x_t, t)
        return jnp.mean(jnp.square(out - target))

    def split_loss(params, key, batch, labels):
        return loss_fn(params, *batch), ()

    def step(params, opt_state, x_t, t, target):
        if micro_batches == 1:
            loss, grads = jax.value_and_grad(loss_fn)(params, x_t, t, target)
        else:
            grad_fn = train_state_lib.per_device_gradients(
                split_loss, mesh, micro_batches
            )
            key = jax.random.key(0)  # unused by this loss
            (loss, _), grads = grad_fn(params, key, (x_t, t, target), None)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(rep, rep, data, data, data),
        out_shardings=(rep, rep, rep),
        donate_argnums=(0, 1),
    )


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def jax_forward_flops(model: UNet, params, x_t, t) -> float:
    """FLOPs of one forward pass on one device, from XLA's cost analysis."""
    fwd = jax.jit(lambda p, x, s: model.apply({"params": p}, x, s))
    return _flops(fwd.lower(params, x_t, t).compile())


def torch_flops(net, x, t, train: bool) -> float:
    """FLOPs counted by torch's FlopCounterMode (forward, or forward+backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = net(x, t)
        if train:
            out.square().mean().backward()
    net.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


class TorchRunner:
    """Adam training steps of a torch network on fixed random data."""

    def __init__(self, net, batch, side, seed, micro_batches: int = 1):
        import torch

        self.micro_batches = micro_batches
        self.torch = torch
        gen = torch.Generator().manual_seed(seed)
        self.net = net.train()
        self.x = torch.randn(batch, 3, side, side, generator=gen)
        self.t = torch.rand(batch, generator=gen)
        self.target = torch.randn(batch, 3, side, side, generator=gen)
        self.opt = torch.optim.Adam(net.parameters(), lr=2e-4)

    def steps(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.opt.zero_grad(set_to_none=True)
            m = self.micro_batches
            parts = (a.chunk(m) for a in (self.x, self.t, self.target))
            for x, t, target in zip(*parts, strict=True):
                loss = (self.net(x, t) - target).square().mean() / m
                loss.backward()
            self.opt.step()
        return time.perf_counter() - start


class JaxRunner:
    """Adam training steps of our network on fixed random data."""

    def __init__(self, model, params, batch, side, seed, mesh, micro_batches=1):
        optimizer = optax.adam(2e-4)
        rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        self.params = jax.device_put(params, rep)
        self.opt_state = jax.device_put(optimizer.init(params), rep)
        kx, kt, ky = jax.random.split(jax.random.key(seed), 3)
        self.batch = jax.device_put(
            (
                jax.random.normal(kx, (batch, side, side, 3)),
                jax.random.uniform(kt, (batch,)),
                jax.random.normal(ky, (batch, side, side, 3)),
            ),
            data,
        )
        step = make_jax_step(model, optimizer, mesh, micro_batches)
        start = time.perf_counter()
        lowered = step.lower(self.params, self.opt_state, *self.batch)
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - start
        self.step_flops_per_device = _flops(self.compiled)

    def steps(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.params, self.opt_state, loss = self.compiled(
                self.params, self.opt_state, *self.batch
            )
        loss.block_until_ready()
        return time.perf_counter() - start


def _build_runner(kind: str, args, params) -> tuple[object, dict]:
    """One network's runner, and what is known only after building it."""
    mults = tuple(args.dim_mults)
    micro_batches = args.micro_batches if kind.endswith(MICRO) else 1
    kind = kind.removesuffix(MICRO)
    if kind == "ours":
        mesh = sharding.make_mesh()
        model = UNet(dim=args.dim, dim_mults=mults, out_channels=3)
        params = jax.tree.map(jnp.asarray, params)
        runner = JaxRunner(model, params, args.batch, args.side, 0, mesh, micro_batches)
        flops = runner.step_flops_per_device * mesh.devices.size / args.batch
        return runner, dict(compile_s=runner.compile_s, train_flops=flops)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = make_reference(load_reference(), args.dim, mults, kind == "torch-paper")
    if kind == "torch-paper":
        copy_params_into(net, params)
    return TorchRunner(net, args.batch, args.side, 0, micro_batches), {}


def _serve(conn, kind: str, args, params) -> None:
    """A worker process: builds one runner, then times the steps asked for."""
    runner, info = _build_runner(kind, args, params)
    conn.send(info)
    while (n := conn.recv()) is not None:
        conn.send(runner.steps(n))


class WorkerRunner:
    """A network trained in a process of its own; ``steps`` as the runners'.

    Each library then has its process's ``malloc`` to itself: in one process,
    torch's allocations between our rounds made our next steps fault their
    memory in again (8,000-30,000 page faults per step against almost none,
    and 5-10 % slower steps).
    """

    def __init__(self, kind: str, args, params):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a fresh interpreter
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(child, kind, args, params), daemon=True
        )
        self.process.start()
        child.close()
        self.info = self.conn.recv()

    def steps(self, n: int) -> float:
        self.conn.send(n)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def check_equivalence(model, params, net, side: int) -> float:
    """Max |ours - reference| on random inputs, relative to max |ours|."""
    import torch

    kx, kt = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (2, side, side, 3))
    t = jax.random.uniform(kt, (2,))
    ours = np.asarray(model.apply({"params": params}, x, t))
    with torch.no_grad():
        theirs = net.eval()(
            torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(np.array(t)),
        )
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(ours)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--dim-mults", type=int, nargs="+", default=[1, 2, 2])
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="train all networks in this process (default: one process each)",
    )
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=2,
        help="also time ours and torch-package with the gradient taken in this "
        "many passes per device (rows ending in '-mb'; 1: no such rows)",
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = load_reference()
    mults = tuple(args.dim_mults)
    mesh = sharding.make_mesh()
    sharding.check_global_batch(args.batch, mesh)
    train_state_lib.check_micro_batches(
        args.micro_batches, args.batch, mesh.devices.size
    )

    model = UNet(dim=args.dim, dim_mults=mults, out_channels=3)
    x1 = jnp.zeros((1, args.side, args.side, 3))
    t1 = jnp.zeros((1,))
    params = model.init(jax.random.key(0), x1, t1)["params"]

    nets = {
        "torch-package": make_reference(ref, args.dim, mults, paper=False),
        "torch-paper": make_reference(ref, args.dim, mults, paper=True),
    }
    copy_params_into(nets["torch-paper"], params)
    rel_err = check_equivalence(model, params, nets["torch-paper"], args.side)

    xt = torch.zeros(1, 3, args.side, args.side)
    tt = torch.zeros(1)
    info = {
        "ours": dict(
            params=count_params(model, (args.side, args.side, 3)),
            fwd_flops=jax_forward_flops(model, params, x1, t1),
        )
    }
    for name, net in nets.items():
        info[name] = dict(
            params=sum(p.numel() for p in net.parameters()),
            fwd_flops=torch_flops(net, xt, tt, train=False),
            train_flops=torch_flops(net, xt, tt, train=True),
        )

    kinds = ["ours", *nets]
    if args.micro_batches > 1:
        kinds[1:1] = ["ours" + MICRO]
        kinds.insert(kinds.index("torch-package") + 1, "torch-package" + MICRO)
        for name in ("ours", "torch-package"):
            info[name + MICRO] = dict(info[name])
    host_params = jax.tree.map(np.asarray, params)
    if args.one_process:
        built = {n: _build_runner(n, args, host_params) for n in kinds}
        runners = {name: runner for name, (runner, _) in built.items()}
        extra = {name: found for name, (_, found) in built.items()}
    else:
        runners = {name: WorkerRunner(name, args, host_params) for name in kinds}
        extra = {name: runner.info for name, runner in runners.items()}
    for name, found in extra.items():
        info[name].update(found)

    for runner in runners.values():  # warm-up (torch allocator, first calls)
        runner.steps(2)
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            runner.steps(1)
            times[name].append(runner.steps(args.steps))
    for runner in runners.values():
        if isinstance(runner, WorkerRunner):
            runner.close()

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    )
    print(
        f"python {platform.python_version()}, jax {jax.__version__}, "
        f"flax {flax.__version__}, optax {optax.__version__}, torch "
        f"{torch.__version__}, denoising-diffusion-pytorch {package_version()}"
    )
    print(
        f"devices: {len(jax.devices())} XLA CPU devices; torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(
        "each network trained in "
        + ("this process" if args.one_process else "a process of its own")
    )
    print(
        f"setting: dim {args.dim}, dim_mults {mults}, {args.side}x{args.side}x3, "
        f"batch {args.batch}, Adam; {args.rounds} rounds x {args.steps} steps"
    )
    if args.micro_batches > 1:
        print(
            f"rows ending in {MICRO!r}: the gradient in {args.micro_batches} "
            "passes per device (ours) or per step (torch)"
        )
    print(f"torch-paper vs ours, max relative output difference: {rel_err:.2e}")
    print(
        f"{'network':<17} {'params':>10} {'fwd GFLOP/img':>14} "
        f"{'train GFLOP/img':>16} {'img/s (median)':>15} {'min..max':>14}"
    )
    rates = {}
    for name, ts in times.items():
        per_round = [args.batch * args.steps / s for s in ts]
        rates[name] = statistics.median(per_round)
        i = info[name]
        print(
            f"{name:<17} {i['params']:>10,} {i['fwd_flops'] / 1e9:>14.3f} "
            f"{i['train_flops'] / 1e9:>16.3f} {rates[name]:>15.1f} "
            f"{min(per_round):>6.1f}..{max(per_round):<6.1f}"
        )
    for name in rates:
        if name.startswith("ours"):
            seconds = info[name]["compile_s"]
            print(f"{name}: compile time of the train step {seconds:.1f} s")
    best = max((name for name in rates if name.startswith("ours")), key=rates.get)
    for name in nets:
        theirs = max((n for n in rates if n.startswith(name)), key=rates.get)
        print(
            f"speed-up of {best} over {name} (its faster row, {theirs}): "
            f"{rates[best] / rates[theirs]:.2f}x"
        )


if __name__ == "__main__":
    main()
