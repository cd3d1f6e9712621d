"""What one device needs to run a train step, from the compiled program itself.

The step is compiled on abstract arguments (``jax.ShapeDtypeStruct``s with their
shardings): no parameter is materialised, so the 1.3 B Aurora at 0.25° compiles on a laptop.
XLA's ``memory_analysis()`` of the compiled program gives, per device:

- ``argument``: what the step's inputs hold (parameters, optimizer state, EMA, the task's
  state, this device's share of the batch), split here by role from the shardings;
- ``temp``: the temporary allocation (activations kept for the backward pass, gradients,
  the update's intermediates), at its peak;
- ``output - alias``: outputs that do not reuse a donated input's memory (the metrics).

:class:`MemoryEstimate` holds these, and, with ``breakdown=True``, where the temporaries go
(:mod:`aurora_loop.memory.buffers`).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from typing import Any

import jax
import numpy as np

from aurora_loop.memory.buffers import Breakdown, read_dump

GiB = 2**30

#: Usual accelerator cards and the memory one device of each reports (GiB, ``nvidia-smi``).
CARDS: dict[str, float] = {"24 GB": 22.5, "40 GB": 40.0, "48 GB": 45.0, "80 GB": 79.6, "141 GB": 140.4}
#: Share of a card's memory a step may plan for: the rest is the runtime's (CUDA context,
#: cuDNN and collective workspaces, fragmentation).
USABLE_FRACTION = 0.9


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes per device of one compiled train step (the most loaded device).

    ``params`` / ``optimizer`` / ``ema`` / ``task_state`` / ``batch``: the argument bytes by
    role, from the abstract arguments' shardings; ``argument``, ``temp``, ``output`` and
    ``alias``: ``compiled.memory_analysis()``.
    """

    devices: int
    platform: str
    params: int
    optimizer: int
    ema: int
    task_state: int
    batch: int
    argument: int
    temp: int
    output: int
    alias: int
    compile_seconds: float
    breakdown: Breakdown | None = None

    @property
    def total(self) -> int:
        """Peak bytes per device: arguments, temporaries and outputs that do not reuse a
        donated argument's memory."""
        return self.argument + self.temp + max(self.output - self.alias, 0)

    def fits(self, capacity_gib: float) -> bool:
        """Whether the step fits a device of ``capacity_gib`` GiB, leaving the runtime its share."""
        return self.total <= USABLE_FRACTION * capacity_gib * GiB

    def cards(self) -> tuple[list[str], list[str]]:
        """(:data:`CARDS` it fits, those it does not)."""
        fit = [name for name, gib in CARDS.items() if self.fits(gib)]
        return fit, [name for name in CARDS if name not in fit]


def per_device_bytes(tree: Any) -> int:
    """Bytes the largest shard of every leaf of ``tree`` (``ShapeDtypeStruct``s or arrays
    with ``sharding``) puts on one device, summed."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None and shape:
            shape = tuple(sharding.shard_shape(shape))
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def compile_step(step: Any, state: Any, batch: Any, dump_dir: str | None = None) -> tuple[Any, float]:
    """``(step.lower(state, batch).compile(), seconds)``; with ``dump_dir``, XLA writes its
    buffer assignment there (what :func:`aurora_loop.memory.buffers.read_dump` reads)."""
    options = {"xla_dump_to": dump_dir, "xla_dump_hlo_module_re": ".*train_step.*"} if dump_dir else None
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile(compiler_options=options)
    return compiled, time.perf_counter() - start


def estimate(step: Any, state: Any, batch: Any, breakdown: bool = False, dump_dir: str | None = None) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of ``step(state, batch)``: a jitted train step with
    abstract ``state`` (a ``TrainState`` of ``ShapeDtypeStruct``s with shardings) and
    ``batch`` (likewise), e.g. from :meth:`aurora_loop.trainer.Trainer.abstract_train_step`.
    ``breakdown``: also read where the temporaries go from XLA's dump, written to
    ``dump_dir`` (kept) or to a temporary directory (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="aurora-loop-memory-") as scratch:
        where = dump_dir or scratch
        compiled, seconds = compile_step(step, state, batch, where if breakdown else None)
        parts = read_dump(where) if breakdown else None
    analysis = compiled.memory_analysis()
    devices = np.asarray(state.step.sharding.mesh.devices).reshape(-1)
    return MemoryEstimate(
        devices=int(devices.size),
        platform=str(devices[0].platform),
        params=per_device_bytes(state.params),
        optimizer=per_device_bytes(state.opt_state),
        ema=per_device_bytes(state.ema_params),
        task_state=per_device_bytes(state.task_state),
        batch=per_device_bytes(batch),
        argument=int(analysis.argument_size_in_bytes),
        temp=int(analysis.temp_size_in_bytes),
        output=int(analysis.output_size_in_bytes),
        alias=int(analysis.alias_size_in_bytes),
        compile_seconds=seconds,
        breakdown=parts,
    )


def environment_note(platform: str, bf16: bool) -> str | None:
    """A caveat for figures compiled on ``platform``: XLA:CPU computes bfloat16 in float32
    and keeps float32 copies of bfloat16 operands, so a GPU needs less temporary memory."""
    if platform == "cpu" and bf16:
        return ("compiled for the CPU: XLA:CPU keeps float32 copies of bfloat16 operands, so the bfloat16 parts of "
                "these temporaries are up to 2x what a GPU needs")
    return None


def device_capacity_gib() -> float | None:
    """The memory of this machine's first accelerator in GiB (``None`` on a CPU, or when
    the backend does not say); honours ``XLA_PYTHON_CLIENT_MEM_FRACTION``."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    stats = getattr(device, "memory_stats", lambda: None)() or {}
    limit = stats.get("bytes_limit")
    return None if not limit else float(limit) / GiB


__all__ = ["CARDS", "MemoryEstimate", "USABLE_FRACTION", "compile_step", "device_capacity_gib", "environment_note", "estimate",
           "per_device_bytes"]
