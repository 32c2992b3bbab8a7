"""The workdir check shared by the launchers and the training loop.

Imports nothing heavy, so a launcher can call it before jax starts.
"""

from __future__ import annotations

import os


def ensure_writable(workdir: str, subdirs: tuple[str, ...] = ()) -> str:
    """Creates ``workdir`` (and ``subdirs`` in it) and proves it writable.

    Returns:
      The absolute path.

    Raises:
      PermissionError: naming the folder, when it cannot be created or
        written (a file in the way, no permission, a read-only disk).
    """
    path = os.path.abspath(os.path.expanduser(workdir))
    try:
        for sub in ("", *subdirs):
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(
            f"workdir {workdir!r} is not writable ({e.strerror}); choose another "
            "--workdir or fix its permissions"
        ) from e
    return path
