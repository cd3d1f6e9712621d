"""Multi-process start-up on JAX's distributed runtime (multi-controller JAX)."""

from __future__ import annotations

from typing import Any


def initialize_distributed(config: Any) -> None:
    """Call ``jax.distributed.initialize`` when the config asks for several processes.

    Must run before anything touches devices. Single-process runs do nothing.
    """
    if getattr(config, "coordinator_address", None) is None:
        return
    import jax

    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
    )
