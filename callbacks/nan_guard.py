"""TerminateOnNaN: stop at the first non-finite training loss or gradient norm.

Every ``every_n_steps`` steps (default: every step) it reads the step's ``loss`` and
``grad_norm``. The read happens in the step's deferred hook, one step behind the device, so
the pipeline stays one step deep; the metrics are replicated, so every process sees the
same values and stops alike.

On a non-finite value it records the step (:attr:`TerminateOnNaN.nonfinite_step`) and asks
for a stop that neither validates nor saves (``trainer.request_stop(validate=False,
checkpoint=False)``): the loop ends at this step boundary, and
:class:`~aurora_loop.callbacks.ModelCheckpoint` saves nothing from then on (it also refuses non-finite parameters on its own), so the
newest checkpoint on disk is the last good one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from aurora_loop.callbacks.base import Callback


class TerminateOnNaN(Callback):
    """Stop the run at the first NaN/inf among ``keys`` of the training metrics.

    Args:
      keys: training metrics to check (those present in a step's metrics).
      every_n_steps: check cadence; 1 catches the first bad step (one fetch per step).
      verbose: print the step and the bad values (process 0).
    """

    def __init__(self, keys: Sequence[str] = ("loss", "grad_norm"), every_n_steps: int = 1, verbose: bool = True) -> None:
        self.keys = tuple(keys)
        self.every_n_steps = every_n_steps
        self.verbose = verbose
        self.nonfinite_step: int | None = None
        self.values: dict[str, float] = {}

    def on_fit_start(self, trainer: Any) -> None:
        # A new fit (e.g. a rerun that resumed from the last good checkpoint) starts clean.
        self.nonfinite_step, self.values = None, {}

    def wants_metrics(self, trainer: Any, step: int) -> bool:
        return self.nonfinite_step is None and step % self.every_n_steps == 0

    def on_step(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if not self.wants_metrics(trainer, step):
            return
        bad = {k: metrics[k] for k in self.keys if k in metrics and not math.isfinite(metrics[k])}
        if not bad:
            return
        self.nonfinite_step, self.values = step, bad
        trainer.request_stop(f"the non-finite step {step}", validate=False, checkpoint=False)
        if self.verbose and trainer.is_main_process:
            shown = ", ".join(f"{k} = {v}" for k, v in bad.items())
            print(f"Step {step}: {shown}; stopping. The last checkpoint before this step is the last good one.", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_step": self.nonfinite_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # informational only: a resumed run starts from a good checkpoint
