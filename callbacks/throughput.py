"""Throughput: steps/s, samples/s, compile time and, when FLOPs are known, MFU.

Through the :meth:`~aurora_loop.callbacks.base.Callback.wrap_train_step` hook it wraps the
trainer's jitted train step so that the first call
compiles it ahead of time (``lower(...).compile()``), timing the compilation and reading
XLA's cost analysis (FLOPs per step *per device*: the partitioned program's); later calls
run that executable (the same one ``jit`` would have built, so nothing compiles twice).

``perf/compile_time_s`` is logged once, at the first step of a fit (as soon as it is known,
so that a run of a few steps records it too). Every ``every_n_steps`` steps it reports, over
the steps since the last report (the first step, which includes compilation, excluded):

- ``perf/steps_per_sec`` and ``perf/samples_per_sec`` (global batch),
- ``perf/tflops_per_device`` and ``perf/mfu`` = achieved FLOP/s per device / peak FLOP/s per
  device, when the FLOPs are known (cost analysis, or ``flops_per_step``) and the peak is
  known (``peak_flops_per_device``, or the table below for the device kind).

Wall-clock rates need no device sync: over a window of steps the host cannot run more
than the dispatch queue ahead of the device. Values go to the run's loggers and to
:attr:`Throughput.history`; the last report is :attr:`Throughput.last`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import jax

from aurora_loop.callbacks.base import Callback
from aurora_loop.callbacks.sinks import log_to_loggers

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device (vendor figures), matched against ``device_kind``.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "V100": 125e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops(device: Any) -> float | None:
    """Peak FLOP/s of ``device`` from :data:`PEAK_FLOPS`, or ``None`` (e.g. CPUs)."""
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def _flops_of(compiled: Any) -> float | None:
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend offers it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    flops = float(analysis["flops"])
    return flops if flops > 0 else None


def examples_per_step(batch: Any) -> int:
    """Examples one train step consumes: the global batch, times the micro-batches of an
    accumulated step (:class:`aurora_loop.accumulation.MicroBatches`, leaves (n, b, ...))."""
    stacked = getattr(batch, "stacked_leaves", None)
    if stacked:
        return int(stacked[0].shape[0] * stacked[0].shape[1])
    return int(jax.tree.leaves(batch)[0].shape[0])


class _TimedStep:
    """Wraps a jitted train step: AOT-compiles on the first call, then calls the executable."""

    def __init__(self, jitted: Any, owner: Throughput) -> None:
        self.jitted = jitted
        self.owner = owner
        self.compiled = None

    def __call__(self, state: Any, batch: Any) -> Any:
        if self.compiled is None:
            start = time.perf_counter()
            try:
                self.compiled = self.jitted.lower(state, batch).compile()
            except Exception:  # noqa: BLE001 - fall back to plain jit; only the figures are lost
                log.warning("Throughput: ahead-of-time compilation failed; no compile time or FLOPs", exc_info=True)
                self.compiled = self.jitted
            else:
                self.owner.compile_time = time.perf_counter() - start
                self.owner.flops_from_cost_analysis = _flops_of(self.compiled)
            self.owner.batch_size = examples_per_step(batch)
        try:
            return self.compiled(state, batch)
        except TypeError:  # a batch of another shape: let jit handle it
            return self.jitted(state, batch)


class Throughput(Callback):
    """Measure training speed every ``every_n_steps`` steps.

    Args:
      every_n_steps: report cadence.
      flops_per_step: FLOPs of one training step per device, if you know better than XLA's
        cost analysis (which counts the compiled program, including rematerialisation).
      peak_flops_per_device: the device's peak FLOP/s for MFU (default: from the table for
        known accelerators; none on CPU, so no MFU there unless given).
      verbose: print each report (process 0).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        flops_per_step: float | None = None,
        peak_flops_per_device: float | None = None,
        verbose: bool = False,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.flops_per_step = flops_per_step
        self.peak_flops_per_device = peak_flops_per_device
        self.verbose = verbose
        self.compile_time: float | None = None
        self.flops_from_cost_analysis: float | None = None
        self.batch_size: int | None = None
        self.history: list[dict[str, float]] = []
        self.last: dict[str, float] = {}
        self._window: tuple[int, float] | None = None
        self._compile_reported = False

    @property
    def flops(self) -> float | None:
        """FLOPs per step per device (given, or from the cost analysis)."""
        return self.flops_per_step if self.flops_per_step is not None else self.flops_from_cost_analysis

    def wrap_train_step(self, trainer: Any, step: Any) -> Any:
        self.compile_time = None  # this fit's step compiles anew (or comes from the cache)
        return _TimedStep(step, self) if hasattr(step, "lower") else step

    def on_fit_start(self, trainer: Any) -> None:
        if self.peak_flops_per_device is None and trainer.mesh is not None:
            self.peak_flops_per_device = peak_flops(trainer.mesh.devices.reshape(-1)[0])
        self._window = None
        self._compile_reported = False

    def on_step(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        now = time.perf_counter()
        if self._window is None:  # the first step of this fit (compiles): start the clock after it
            self._window = (step, now)
            if self.compile_time is not None and not self._compile_reported:
                self._compile_reported = True
                log_to_loggers(trainer, step, {"perf/compile_time_s": self.compile_time})
            return
        first, start = self._window
        if step % self.every_n_steps or step == first:
            return
        steps_per_sec = (step - first) / max(now - start, 1e-12)
        report = {"perf/steps_per_sec": steps_per_sec}
        if self.batch_size is not None:
            report["perf/samples_per_sec"] = steps_per_sec * self.batch_size
        if self.flops is not None:
            achieved = self.flops * steps_per_sec
            report["perf/tflops_per_device"] = achieved / 1e12
            if self.peak_flops_per_device:
                report["perf/mfu"] = achieved / self.peak_flops_per_device
        self._window = (step, now)
        self.last = report
        self.history.append({"step": float(step), **report})
        log_to_loggers(trainer, step, report)
        if self.verbose and trainer.is_main_process:
            shown = ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in report.items())
            print(f"Throughput at step {step}: {shown}", flush=True)
