"""Host memory settings for XLA's CPU runtime, set before a process starts working.

XLA's CPU runtime takes the temporary buffers of each run of a compiled
program from ``malloc``: for the benchmark U-Net at batch 32
(``docs/benchmarks/unet.md``), one block of about 300 MB per device and step.
glibc serves blocks that large with fresh ``mmap`` pages and returns them on
``free``, so every training step maps, faults in and zeroes its activations
again, 4 KiB at a time: about 145,000 page faults (580 MB) per step. Three
settings remove that work:

- glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc 2.35 and later) makes
  ``malloc`` ask for transparent huge pages: about 1,300 faults per step and
  a 25 % faster step there, but the kernel still zeroes 2 MiB pages every
  step and, when free huge pages run short, compacts memory first (steps
  then took 10-20 % longer, at random);
- ``--xla_multiheap_size_constraint_per_heap`` (16 MiB) makes XLA split
  that block into pieces of at most 16 MiB;
- ``glibc.malloc.mmap_threshold`` (32 MiB) and ``glibc.malloc.trim_threshold``
  (1 TiB) make glibc serve those pieces from its heaps and keep freed memory
  there, so the next step reuses the same pages: no faults and no zeroing.

The XLA flag is added only where XLA runs on the CPU (no accelerator plugin
installed, or ``JAX_PLATFORMS`` starting with ``cpu``) and not to an
``XLA_FLAGS`` that names a flags file; a value the user already gave for any
of these settings is kept. XLA logs a warning for each buffer larger than
16 MiB (it gets a heap of its own).

Tunables are read when a process starts, so the launchers call
:func:`restart_with_huge_pages` first: it re-executes the same command (same
process id, arguments and environment) with the settings added, once. It does
nothing where it cannot help (not glibc, glibc older than 2.35, transparent
huge pages set to ``never``), where ``GLIBC_TUNABLES`` already chooses
``glibc.malloc.hugetlb``, where ``STOCHINTERP_HUGE_PAGES=0``, in the restarted
process itself, and for a program read from stdin. Nothing here
imports jax.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
# Blocks up to 32 MiB (the largest threshold glibc accepts) from the heap, and
# freed heap memory kept for reuse.
HEAP_TUNABLES = {
    "glibc.malloc.mmap_threshold": str(32 << 20),
    "glibc.malloc.trim_threshold": str(1 << 40),
}
XLA_HEAP_FLAG = "--xla_multiheap_size_constraint_per_heap"
XLA_HEAP_SIZE = 16 << 20  # below the mmap threshold
# Distributions whose presence means XLA may run on an accelerator.
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")
OPT_OUT = "STOCHINTERP_HUGE_PAGES"
# Set in the restarted process: glibc drops tunables from the environment of
# privileged programs (setuid, file capabilities), so GLIBC_TUNABLES alone
# cannot tell that the restart happened.
RESTARTED = "STOCHINTERP_HUGE_PAGES_RESTARTED"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
_OFF = ("0", "false", "no", "off")


def transparent_huge_pages(path: str = THP_SETTING) -> str | None:
    """The kernel's setting (``always``, ``madvise`` or ``never``), None if unknown."""
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return None
    chosen = [w[1:-1] for w in words if w.startswith("[") and w.endswith("]")]
    return chosen[0] if chosen else None


def _glibc_at_least(version: str, wanted: tuple[int, int]) -> bool:
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= wanted


def accelerator_plugin_installed() -> bool:
    """Whether a jax plugin for CUDA or ROCm, or libtpu, is installed."""
    from importlib import metadata

    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(_ACCELERATOR_PLUGINS):
            return True
    return False


def xla_runs_on_cpu(environ: Mapping[str, str], plugin_installed: bool) -> bool:
    """Whether XLA will run on the host CPU, judged before jax is imported."""
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not plugin_installed


def huge_page_environment(
    environ: Mapping[str, str],
    libc: tuple[str, str],
    thp: str | None,
    on_cpu: bool = True,
) -> dict[str, str] | None:
    """The environment to restart with, or None when nothing is to change.

    Args:
      environ: the current environment.
      libc: ``platform.libc_ver()``, e.g. ``("glibc", "2.36")``.
      thp: :func:`transparent_huge_pages`.
      on_cpu: :func:`xla_runs_on_cpu`; without it the XLA flag is not added.
    """
    if environ.get(OPT_OUT, "").strip().lower() in _OFF or RESTARTED in environ:
        return None
    name, version = libc
    if name != "glibc" or not _glibc_at_least(version, (2, 35)):
        return None
    if thp not in ("always", "madvise"):
        return None
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    if any(t.split("=")[0].strip() == TUNABLE for t in tunables):
        return None  # the user's choice
    chosen = {t.split("=")[0].strip() for t in tunables}
    ours = [f"{TUNABLE}=1"]
    ours += [f"{k}={v}" for k, v in HEAP_TUNABLES.items() if k not in chosen]
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join([*tunables, *ours])
    xla_flags = environ.get("XLA_FLAGS", "").strip()
    # XLA reads a value not starting with "-" as the name of a flags file:
    # left as it is. Otherwise the flag is appended to the text unchanged
    # (quoted values keep their spacing).
    is_file = bool(xla_flags) and not xla_flags.startswith("-")
    given = any(f.split("=")[0] == XLA_HEAP_FLAG for f in xla_flags.split())
    if on_cpu and not is_file and not given:
        flag = f"{XLA_HEAP_FLAG}={XLA_HEAP_SIZE}"
        env["XLA_FLAGS"] = f"{environ['XLA_FLAGS']} {flag}" if xla_flags else flag
    env[RESTARTED] = "1"
    return env


def restart_with_huge_pages() -> None:
    """Re-executes this command with the memory settings above, if they help.

    Call it first in a script's ``main``: the work done before it is done
    twice. Returns only where nothing is to change (see the module doc).
    """
    on_cpu = xla_runs_on_cpu(os.environ, accelerator_plugin_installed())
    env = huge_page_environment(
        os.environ, platform.libc_ver(), transparent_huge_pages(), on_cpu
    )
    if env is None or not sys.executable:  # no interpreter path to exec
        return
    if sys.argv[0] in ("", "-"):  # a program read from stdin cannot be reread
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os.execve(sys.executable, sys.orig_argv, env)
