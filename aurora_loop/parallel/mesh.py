"""The device mesh and moving host data onto it."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aurora_loop.errors import UsageError

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``("data",)`` mesh over ``num_devices`` devices (all processes' devices together).

    Built with ``jax.sharding.Mesh`` directly so the axis is Auto (``jax.make_mesh`` defaults
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
    return Mesh(np.asarray(devices[:num_devices]), (DATA_AXIS,))


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
    if global_batch_size % mesh.size:
        raise UsageError(
            f"batch size {global_batch_size} is not divisible by the {mesh.size} devices of the mesh; "
            f"use a multiple of {mesh.size} for --batch_size or change --num_gpus"
        )


def place_batch(local_batch: Any, shardings: Any) -> Any:
    """Turn this process's share of a batch (numpy) into global ``jax.Array``s on the mesh.

    Leaves that are already ``jax.Array``s with the right sharding pass through untouched.
    """

    def place(x: Any, sharding: NamedSharding) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(place, local_batch, shardings)
