"""Device mesh, batch sharding and multi-process start-up.

One code path serves one device, many local devices and many processes: the
batch axis of every array is split over the mesh axis ``"data"``; parameters
and optimizer state are replicated.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stochinterp import input_errors

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    """Returns a one-axis data-parallel mesh over ``devices`` (default: all)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def put_whole(tree, target: NamedSharding):
    """Places a pytree of host arrays, which every process holds whole.

    Each device gets its part of ``target`` from this process's copy, and no
    process checks that the copies agree (``jax.device_put`` would, with one
    collective per array: seconds for a network of hundreds of arrays). For
    values every process reads from the same file or computes the same way.
    """

    def put(x):
        x = np.asarray(x)
        if len(target.spec) > x.ndim:
            raise ValueError(
                f"an array of shape {x.shape} cannot be placed as {target.spec}: "
                f"that splits {len(target.spec)} axes"
            )
        return jax.make_array_from_callback(x.shape, target, lambda index: x[index])

    return jax.tree.map(put, tree)


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
    """Raises if ``global_batch`` cannot be split evenly over the mesh."""
    n = mesh.devices.size
    if global_batch <= 0 or global_batch % n:
        raise ValueError(
            f"global batch size {global_batch} must be a positive multiple of "
            f"the number of devices ({n}); choose e.g. {max(n, global_batch // n * n)}"
        )


def local_batch_size(global_batch: int) -> int:
    """The part of the global batch that this process loads."""
    count = jax.process_count()
    if global_batch % count:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the number "
            f"of processes ({count})"
        )
    return global_batch // count


def shard_batch(local_batch, mesh: Mesh):
    """Turns this process's part of a batch into global arrays on the mesh.

    Args:
      local_batch: pytree of host arrays ``[local_batch, ...]``; together the
        processes hold the global batch, process ``i`` holding slice ``i``.
      mesh: the data-parallel mesh.

    Returns:
      The same pytree of ``jax.Array`` of shape ``[global_batch, ...]``, split
      over the mesh's data axis.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
        local_batch,
    )


def host_values(x) -> np.ndarray | None:
    """``x`` as a numpy array when its values can be read here and now.

    None for a traced array (inside jit, vmap, ...) and for one split over
    devices of other processes: value checks skip those.
    """
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def to_host(tree):
    """Copies a pytree of arrays to host numpy arrays, in any process.

    A fully replicated ``jax.Array`` that spans several processes cannot be
    fetched whole with ``jax.device_get``; every process holds a full copy,
    so this reads the local one.

    Raises:
      ValueError: for an array split over devices of other processes.
    """

    def fetch(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        raise ValueError(
            f"cannot read an array of shape {x.shape} sharded as {x.sharding} "
            "on one process; replicate it first"
        )

    return jax.tree.map(fetch, tree)


def gather_to_host(tree):
    """Whole values of a pytree of arrays as numpy arrays, on every process.

    Arrays split over devices of several processes (a sharded batch of
    samples) are gathered from all of them; replicated and local arrays are
    read here. A collective when there is more than one process: every
    process must call it at the same point.
    """
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is True on at least one of them.

    A collective: every process must call it at the same point.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.any(flags))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


@input_errors.checks
def distributed_settings(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> tuple[str | None, int, int]:
    """(coordinator address, process count, this process's index), checked.

    Values left as ``None`` are read from ``STOCHINTERP_COORDINATOR``,
    ``STOCHINTERP_NUM_PROCESSES`` and ``STOCHINTERP_PROCESS_ID`` (default one
    process, index 0).
    """
    if coordinator_address is None:
        coordinator_address = os.environ.get("STOCHINTERP_COORDINATOR")
    if num_processes is None:
        num_processes = _env_int("STOCHINTERP_NUM_PROCESSES", 1)
    if process_id is None:
        process_id = _env_int("STOCHINTERP_PROCESS_ID", 0)
    if not 1 <= num_processes < 2**31:
        raise ValueError(
            f"num_processes must be an integer in [1, 2**31), got {num_processes}"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id={process_id} must lie in [0, {num_processes - 1}] "
            f"for num_processes={num_processes}"
        )
    if num_processes > 1 and not coordinator_address:
        raise ValueError(
            f"num_processes={num_processes} needs a coordinator address "
            "(host:port), from the flag or STOCHINTERP_COORDINATOR"
        )
    if num_processes > 1:
        _check_address(coordinator_address)
    return coordinator_address, num_processes, process_id


# host:port; the host a name, an IPv4 address or a bracketed IPv6 address.
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


def _check_address(address: str) -> None:
    match = _ADDRESS.fullmatch(address)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ValueError(
            f"coordinator address {address!r} must be host:port with a port in "
            "[1, 65535] (--coordinator_address or STOCHINTERP_COORDINATOR)"
        )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts the JAX distributed runtime when more than one process is asked.

    The settings are checked first (:func:`distributed_settings`, which also
    reads them from the environment). With one process (the default) nothing
    is started.

    Returns:
      True when the distributed runtime was started.
    """
    coordinator_address, num_processes, process_id = distributed_settings(
        coordinator_address, num_processes, process_id
    )
    if num_processes == 1:
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True
