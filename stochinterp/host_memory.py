"""Transparent huge pages for host memory, set before a process starts working.

XLA's CPU runtime takes the temporary buffers of each run of a compiled
program from ``malloc``. glibc serves large blocks with fresh ``mmap`` pages and
returns them on ``free``, so every training step maps, faults in and zeroes its
activations again, 4 KiB at a time: about 145,000 page faults (580 MB) per
step of the benchmark U-Net at batch 32 (``docs/benchmarks/unet.md``). glibc's
tunable ``glibc.malloc.hugetlb=1`` (glibc 2.35 and later) makes ``malloc``
ask the kernel for transparent huge pages on that memory: about 1,300 faults
per step and a 25 % faster step there.

Tunables are read when a process starts, so the launchers call
:func:`restart_with_huge_pages` first: it re-executes the same command (same
process id, arguments and environment) with the tunable added, once. It does
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


def huge_page_environment(
    environ: Mapping[str, str], libc: tuple[str, str], thp: str | None
) -> dict[str, str] | None:
    """The environment to restart with, or None when nothing is to change.

    Args:
      environ: the current environment.
      libc: ``platform.libc_ver()``, e.g. ``("glibc", "2.36")``.
      thp: :func:`transparent_huge_pages`.
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
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join([*tunables, f"{TUNABLE}=1"])
    env[RESTARTED] = "1"
    return env


def restart_with_huge_pages() -> None:
    """Re-executes this command with huge pages for ``malloc``, if that helps.

    Call it first in a script's ``main``: the work done before it is done
    twice. Returns only where nothing is to change (see the module doc).
    """
    env = huge_page_environment(
        os.environ, platform.libc_ver(), transparent_huge_pages()
    )
    if env is None or not sys.executable:  # no interpreter path to exec
        return
    if sys.argv[0] in ("", "-"):  # a program read from stdin cannot be reread
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os.execve(sys.executable, sys.orig_argv, env)
