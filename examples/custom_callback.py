"""How to write a callback: a gradient-norm watchdog with resumable state.

A callback subclasses ``aurora_loop.callbacks.Callback`` and overrides the hooks it needs
(every hook receives the trainer first). Rules of thumb:

- ``on_step`` gets *lazy* metrics: reading a value fetches that step's scalars from the
  device. Read them only on the steps you need, and say which through ``wants_metrics`` so
  the trainer starts the copy early.
- Need the exact state after a step (to save or inspect parameters)? Return True from
  ``wants_sync`` for that step and do the work in ``on_sync``.
- Stop the run with ``trainer.should_stop = True``; the loop saves and ends at the next step
  boundary.
- Return JSON-able ``state_dict()`` and restore it in ``load_state_dict()``: it is saved in
  every checkpoint under ``state_key`` and restored on resume.
- Write files and print on process 0 only (``trainer.is_main_process``).
- Hand scalars to the run's loggers (TensorBoard, W&B) with
  ``aurora_loop.callbacks.sinks.log_to_loggers(trainer, step, {"tag": value})``.

Use it from Python::

    from examples.custom_callback import GradNormWatchdog
    Trainer(callbacks=[GradNormWatchdog(threshold=50.0)], ...)

or from the command line (the module must be importable, e.g. on PYTHONPATH)::

    aurora-train ... --callback 'examples.custom_callback:GradNormWatchdog={"threshold": 50}'

or publish it from your package under the entry-point group ``aurora_loop.callbacks``::

    [options.entry_points]
    aurora_loop.callbacks =
        grad_watchdog = my_package.callbacks:GradNormWatchdog

and select it with ``--callback grad_watchdog`` (``--callback 'grad_watchdog={"threshold": 50}'``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aurora_loop.callbacks import Callback
from aurora_loop.callbacks.sinks import log_to_loggers


class GradNormWatchdog(Callback):
    """Count steps whose gradient norm exceeds ``threshold``; stop after ``patience`` in a row.

    Args:
      threshold: gradient norms above this count as spikes.
      patience: consecutive spikes that stop the run (``None``: never stop, only count).
      every_n_steps: check cadence (each check reads that step's metrics).
    """

    def __init__(self, threshold: float = 100.0, patience: int | None = None, every_n_steps: int = 1) -> None:
        self.threshold = threshold
        self.patience = patience
        self.every_n_steps = every_n_steps
        self.spikes = 0  # total, survives resume
        self.in_a_row = 0

    def wants_metrics(self, trainer: Any, step: int) -> bool:
        return step % self.every_n_steps == 0

    def on_step(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if not self.wants_metrics(trainer, step):
            return
        norm = metrics["grad_norm"]  # the device-to-host fetch happens here
        if norm > self.threshold:
            self.spikes += 1
            self.in_a_row += 1
            log_to_loggers(trainer, step, {"train/grad_spikes": self.spikes})
        else:
            self.in_a_row = 0
        if self.patience is not None and self.in_a_row >= self.patience:
            if trainer.is_main_process:
                print(f"GradNormWatchdog: {self.in_a_row} gradient-norm spikes in a row at step {step}; stopping", flush=True)
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"spikes": self.spikes, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spikes = int(state.get("spikes", 0))
        self.in_a_row = int(state.get("in_a_row", 0))
