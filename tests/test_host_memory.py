"""Host memory settings: when the launchers restart, and what they restart with."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from stochinterp import host_memory
from stochinterp.host_memory import RESTARTED, TUNABLE, huge_page_environment

GLIBC = ("glibc", "2.36")
HEAP = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1099511627776"
OURS = f"{TUNABLE}=1:{HEAP}"
XLA_FLAG = "--xla_multiheap_size_constraint_per_heap=16777216"


def test_adds_the_tunable_and_keeps_the_rest_of_the_environment():
    env = huge_page_environment({"PATH": "/bin", "X": "1"}, GLIBC, "madvise")
    assert env == {
        "PATH": "/bin",
        "X": "1",
        "GLIBC_TUNABLES": OURS,
        "XLA_FLAGS": XLA_FLAG,
        RESTARTED: "1",
    }


@pytest.mark.parametrize(
    "before, after",
    [
        ("glibc.malloc.arena_max=2", f"glibc.malloc.arena_max=2:{OURS}"),
        ("a=1:", f"a=1:{OURS}"),  # empty entries dropped
        (":", OURS),
        # the user's heap thresholds are kept, ours only fill in the others
        (
            "glibc.malloc.mmap_threshold=1024",
            f"glibc.malloc.mmap_threshold=1024:{TUNABLE}=1:"
            "glibc.malloc.trim_threshold=1099511627776",
        ),
        (
            " glibc.malloc.trim_threshold =0",
            f" glibc.malloc.trim_threshold =0:{TUNABLE}=1:"
            "glibc.malloc.mmap_threshold=33554432",
        ),
    ],
)
def test_appends_to_tunables_already_set(before, after):
    env = huge_page_environment({"GLIBC_TUNABLES": before}, GLIBC, "always")
    assert env["GLIBC_TUNABLES"] == after


def test_the_restarted_environment_asks_for_no_second_restart():
    # glibc removes tunables from a privileged program's environment, so the
    # marker, not GLIBC_TUNABLES, must stop a second restart.
    env = huge_page_environment({}, GLIBC, "madvise")
    del env["GLIBC_TUNABLES"]
    assert huge_page_environment(env, GLIBC, "madvise") is None


@pytest.mark.parametrize(
    "environ, libc, thp",
    [
        ({"GLIBC_TUNABLES": f"{TUNABLE}=1"}, GLIBC, "madvise"),  # restarted already
        ({"GLIBC_TUNABLES": f"a=1:{TUNABLE}=0"}, GLIBC, "madvise"),  # user's choice
        ({"GLIBC_TUNABLES": f" {TUNABLE} =0"}, GLIBC, "madvise"),
        ({"STOCHINTERP_HUGE_PAGES": "0"}, GLIBC, "madvise"),
        ({"STOCHINTERP_HUGE_PAGES": " No "}, GLIBC, "always"),
        ({}, GLIBC, "never"),
        ({}, GLIBC, None),  # no such kernel setting
        ({}, ("glibc", "2.34"), "madvise"),  # tunable unknown before 2.35
        ({}, ("glibc", ""), "madvise"),
        ({}, ("", ""), "madvise"),  # musl, macOS
    ],
)
def test_no_restart_where_it_cannot_help_or_was_chosen(environ, libc, thp):
    assert huge_page_environment(environ, libc, thp) is None


def test_a_similar_tunable_name_is_not_taken_for_ours():
    env = huge_page_environment(
        {"GLIBC_TUNABLES": f"{TUNABLE}x=1"}, ("glibc", "2.40"), "madvise"
    )
    assert env["GLIBC_TUNABLES"] == f"{TUNABLE}x=1:{OURS}"


@pytest.mark.parametrize(
    "before, on_cpu, after",
    [
        ("--a=1", True, f"--a=1 {XLA_FLAG}"),
        (f"--a=1 {XLA_FLAG[:-8]}1", True, f"--a=1 {XLA_FLAG[:-8]}1"),  # user's
        ("--a=1", False, "--a=1"),  # XLA runs on an accelerator: not ours to set
        ("--a='x  y'\t", True, f"--a='x  y'\t {XLA_FLAG}"),  # text kept as is
        ("/tmp/flags.txt", True, "/tmp/flags.txt"),  # a flags file: untouched
        (None, False, None),
    ],
)
def test_the_xla_heap_flag_is_added_on_the_cpu_only(before, on_cpu, after):
    environ = {} if before is None else {"XLA_FLAGS": before}
    env = huge_page_environment(environ, GLIBC, "madvise", on_cpu)
    assert env.get("XLA_FLAGS") == after
    assert env["GLIBC_TUNABLES"] == OURS


@pytest.mark.parametrize(
    "platforms, plugin, expected",
    [
        (None, False, True),
        (None, True, False),
        ("cpu", True, True),
        (" CPU ,cuda", True, True),
        ("cuda,cpu", False, False),
        ("tpu", False, False),
        ("", True, False),  # empty: as if unset
    ],
)
def test_xla_runs_on_cpu(platforms, plugin, expected):
    environ = {} if platforms is None else {"JAX_PLATFORMS": platforms}
    assert host_memory.xla_runs_on_cpu(environ, plugin) is expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]\n", "never"),
        ("", None),
    ],
)
def test_reads_the_kernel_setting(tmp_path, text, expected):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert host_memory.transparent_huge_pages(str(path)) == expected
    assert host_memory.transparent_huge_pages(str(tmp_path / "missing")) is None


_SCRIPT = """
import os, platform, sys
from stochinterp.host_memory import restart_with_huge_pages
tunables = os.environ.get("GLIBC_TUNABLES", "")
xla_flags = os.environ.get("XLA_FLAGS", "")
print("run", os.getpid(), tunables, sys.argv[1:], xla_flags, sep="|", flush=True)
restart_with_huge_pages()
print("after", flush=True)
"""


def _run(env_update, args=("-c", _SCRIPT, "a", "--b=1"), stdin=None):
    """Runs the script in a fresh interpreter; its printed lines, split on '|'."""
    env = {**os.environ, **env_update}
    for name in ("GLIBC_TUNABLES", "XLA_FLAGS", RESTARTED):  # as if never restarted
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [line.split("|") for line in out.splitlines()]


def test_restart_runs_the_same_command_once_in_the_same_process():
    useful = huge_page_environment(
        {}, platform.libc_ver(), host_memory.transparent_huge_pages()
    )
    lines = _run({"JAX_PLATFORMS": "cpu"})
    if useful is None:  # this machine cannot use it: one run, unchanged
        assert lines == [["run", lines[0][1], "", "['a', '--b=1']", ""], ["after"]]
        return
    first, second, after = lines
    assert first[0] == second[0] == "run"
    assert first[1] == second[1]  # exec keeps the process id
    assert (first[2], second[2]) == ("", OURS)
    assert first[3] == second[3] == "['a', '--b=1']"
    assert (first[4], second[4]) == ("", XLA_FLAG)
    assert after == ["after"]


def test_a_program_read_from_stdin_runs_once():
    lines = _run({}, args=("-",), stdin=_SCRIPT)
    assert lines == [["run", lines[0][1], "", "[]", ""], ["after"]]


def test_opt_out_runs_once_without_the_tunable():
    lines = _run({"STOCHINTERP_HUGE_PAGES": "0"})
    assert lines == [["run", lines[0][1], "", "['a', '--b=1']", ""], ["after"]]
