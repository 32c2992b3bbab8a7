"""Test set-up: two CPU devices, so sharded code paths run as on a pod.

XLA compiles at backend optimization level 0: the tests compile far more
programs than they run steps, and level 0 compiles a U-Net in about half the
time (the same XLA programs, with less LLVM optimization of their kernels). Set
``XLA_FLAGS`` yourself to run this process under other settings, e.g.
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` for XLA's defaults;
the workers and launchers the tests start set their own
(``_train_helpers.env``).

Launchers run by the tests keep their compilation cache in a folder of the
test session, not in the user's cache folder.
"""

import os
import signal
import tempfile

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="stochinterp-test-cache-")

# A session started with Ctrl-C ignored (a background job of a shell without
# job control) would pass that on to every child process; the tests of
# Ctrl-C need it delivered, as it is to a run started from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
