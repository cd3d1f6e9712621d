"""The device mesh and moving host data onto it."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aurora_loop.errors import UsageError

DATA_AXIS = "data"
SPACE_AXIS = "space"


def make_mesh(num_devices: int | None = None, space: int = 1) -> Mesh:
    """The device mesh over ``num_devices`` devices (all processes' devices together): 1-D
    ``("data",)``, or with ``space`` > 1 ``("data", "space")`` of shape (num_devices / space,
    space), whose ``space`` devices split every example's grid (``--space_parallel``;
    consecutive devices, so a process's devices share examples first).

    Built with ``jax.sharding.Mesh`` directly so the axes are Auto (``jax.make_mesh`` defaults
    to Explicit axes in jax 0.10). ``None`` takes every visible device.
    """
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
    if num_devices > len(devices):
        raise UsageError(
            f"--num_gpus {num_devices} asks for more devices than the {len(devices)} visible "
            f"({devices[0].platform}); pass --num_gpus {len(devices)} or fewer"
        )
    if jax.process_count() > 1 and num_devices != len(devices):
        raise UsageError(
            f"with {jax.process_count()} processes the mesh must span all {len(devices)} devices; "
            f"drop --num_gpus or pass --num_gpus {len(devices)}"
        )
    if space < 1 or num_devices % space:
        divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
        raise UsageError(f"--space_parallel {space} does not divide the {num_devices} devices of the mesh; "
                         f"choose one of {', '.join(map(str, divisors))}")
    if space == 1:
        return Mesh(np.asarray(devices[:num_devices]), (DATA_AXIS,))
    return Mesh(np.asarray(devices[:num_devices]).reshape(num_devices // space, space), (DATA_AXIS, SPACE_AXIS))


def data_size(mesh: Mesh) -> int:
    """Devices along the ``data`` axis: how many ways a batch is split."""
    return int(mesh.shape[DATA_AXIS])


def space_size(mesh: Mesh) -> int:
    """Devices along the ``space`` axis (1 without one): how many bands every example's grid has."""
    return int(dict(mesh.shape).get(SPACE_AXIS, 1))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    """NamedShardings for a batch pytree: its own ``partition_specs()`` if it has one, else
    every leaf split on its first axis over ``data``."""
    if hasattr(batch, "partition_specs"):
        specs = batch.partition_specs(DATA_AXIS)
    else:
        specs = jax.tree.map(lambda _: PartitionSpec(DATA_AXIS), batch)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
    n = data_size(mesh)
    if global_batch_size % n:
        where = f"{n} devices of the mesh" if n == mesh.size else f"{n} data-parallel groups of the mesh ({mesh.size} devices, space {space_size(mesh)})"
        raise UsageError(
            f"batch size {global_batch_size} is not divisible by the {where}; "
            f"use a multiple of {n} for --batch_size or change --num_gpus"
        )


def process_groups(mesh: Mesh, process_index: int | None = None) -> tuple[int, int]:
    """(first, count): the ``data`` groups (rows of the mesh) whose devices this process
    holds, consecutive. A process holds several groups when ``space`` is below its device
    count, and shares one with other processes when ``space`` spans processes."""
    index = jax.process_index() if process_index is None else process_index
    rows = [r for r in range(mesh.devices.shape[0]) if any(d.process_index == index for d in np.asarray(mesh.devices[r]).reshape(-1))]
    if not rows:
        return 0, 0
    return rows[0], rows[-1] - rows[0] + 1


def global_batch_size(mesh: Mesh, local_batch_size: int) -> int:
    """The global batch of which this process's batch of ``local_batch_size`` examples is
    its share (:func:`process_groups`)."""
    _, groups = process_groups(mesh)
    return local_batch_size * data_size(mesh) // max(groups, 1)


def place_batch(local_batch: Any, shardings: Any, global_examples: int | None = None) -> Any:
    """Turn this process's share of a batch (numpy) into global ``jax.Array``s on the mesh.

    Leaves that are already ``jax.Array``s with the right sharding pass through untouched.
    ``global_examples``: the global batch size, when processes share examples (a ``space``
    axis spanning processes: each process holds its group's examples whole).
    """

    def place(x: Any, sharding: NamedSharding) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        shape = None
        spec = tuple(sharding.spec)
        if global_examples is not None and DATA_AXIS in spec:  # the examples' axis (1 for stacked micro-batches)
            axis = spec.index(DATA_AXIS)
            shape = (*x.shape[:axis], global_examples, *x.shape[axis + 1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(place, local_batch, shardings)
