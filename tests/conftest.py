"""Test set-up: two CPU devices, so sharded code paths run as on a pod.

Launchers run by the tests keep their compilation cache in a folder of the
test session, not in the user's cache folder.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="stochinterp-test-cache-")
