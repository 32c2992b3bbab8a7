"""The workdir check shared by the launchers and the training loop.

Imports nothing heavy, so a launcher can call it before jax starts.
"""

from __future__ import annotations

import json
import os

# Linux's limits on a path and on one name in it (bytes).
_PATH_MAX, _NAME_MAX = 4096, 255


def _folder_path(workdir: str) -> str:
    """The absolute path of ``workdir``; raises if a file is in its place."""
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(
            f"workdir {workdir!r} is a file, not a folder; choose another --workdir"
        )
    if os.path.islink(path) and not os.path.exists(path):
        raise NotADirectoryError(
            f"workdir {workdir!r} is a symbolic link to {os.readlink(path)!r}, "
            "which does not exist; make that folder or choose another --workdir"
        )
    longest = max(len(os.fsencode(part)) for part in path.split(os.sep))
    if len(os.fsencode(path)) >= _PATH_MAX or longest > _NAME_MAX:
        raise PermissionError(
            f"workdir path of {len(path)} characters (a name of {longest}) is "
            f"longer than the system allows ({_PATH_MAX - 1}, names {_NAME_MAX}); "
            "choose a shorter --workdir"
        )
    return path


def ensure_writable(workdir: str, subdirs: tuple[str, ...] = ()) -> str:
    """Creates ``workdir`` (and ``subdirs`` in it) and proves it writable.

    Returns:
      The absolute path.

    Raises:
      NotADirectoryError: when ``workdir`` is a file.
      PermissionError: naming the folder, when it cannot be created or
        written (a file in the way, no permission, a read-only disk).
    """
    path = _folder_path(workdir)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(
            f"workdir {workdir!r} is not writable ({e.strerror}); choose another "
            "--workdir or fix its permissions"
        ) from e
    for sub in subdirs:
        folder = os.path.join(path, sub)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise PermissionError(
                f"cannot make the folder {folder!r} in the workdir ({e.strerror}); "
                "move what is in the way, or choose another --workdir"
            ) from e
    return path


def check_usable(workdir: str, must_exist: bool) -> str:
    """Checks ``workdir`` without creating anything; returns its absolute path.

    With ``must_exist`` (sampling, evaluation) it must be an existing folder;
    otherwise (training, which creates it after checking its config) it must
    be a writable folder or not exist yet below a writable folder.

    Raises:
      FileNotFoundError, NotADirectoryError, PermissionError: naming the path.
    """
    path = _folder_path(workdir)
    if must_exist:
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"workdir {workdir!r} does not exist; train into it first"
            )
        return path
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"workdir {workdir!r} cannot be created or written ({parent!r} is not a "
            "writable folder); choose another --workdir or fix its permissions"
        )
    return path


def write_text(path: str, text: str) -> None:
    """Replaces the file ``path`` with ``text`` atomically: a kill meanwhile
    leaves the old file or the new one, never a part of the new one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, record: dict) -> None:
    """Writes ``record`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(record, indent=2))
