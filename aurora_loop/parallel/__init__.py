"""Devices and processes: the device mesh and batch placement (:mod:`~aurora_loop.parallel.mesh`,
whose names are importable from here too) and multi-process start-up and host agreement
(:mod:`~aurora_loop.parallel.distributed`).

The mesh names load lazily, so that importing ``aurora_loop.parallel.distributed`` (the command
line does, before it configures JAX from its flags) does not import JAX.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DATA_AXIS", "SPACE_AXIS", "batch_shardings", "check_batch_divisible", "data_size", "global_batch_size", "make_mesh",
           "place_batch", "process_groups", "replicated", "space_size"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from aurora_loop.parallel import mesh

        return getattr(mesh, name)
    raise AttributeError(f"module 'aurora_loop.parallel' has no attribute {name!r}")
