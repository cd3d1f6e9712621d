"""EarlyStopping: stop when a validation score stops improving.

After each validation the monitored score is compared with the best so far; an
improvement (by more than ``min_delta``) resets the patience counter, anything else counts
one bad validation. After ``patience`` bad validations in a row the run stops
(``trainer.should_stop``), i.e. the loop saves and ends at this step boundary. The best
score, the counter and the stop step are part of the checkpoint, so a resumed run keeps
counting where it left off. Validation scores are the same on every process, so all
processes decide alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from aurora_loop.callbacks.base import Callback


class EarlyStopping(Callback):
    """Stop training when ``monitor`` has not improved for ``patience`` validations.

    Args:
      monitor: a validation score (``val/loss``, ``val/rmse/z500``; ``val/`` optional).
      min_delta: the smallest change that counts as an improvement.
      patience: validations without improvement before stopping.
      mode: ``min`` (lower is better) or ``max``.
      stop_on_nonfinite: stop at once when the score is NaN or infinite.
      verbose: print a line when stopping (process 0).
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        min_delta: float = 0.0,
        patience: int = 3,
        mode: str = "min",
        stop_on_nonfinite: bool = True,
        verbose: bool = True,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.monitor = monitor
        self.min_delta = abs(min_delta)
        self.patience = patience
        self.mode = mode
        self.stop_on_nonfinite = stop_on_nonfinite
        self.verbose = verbose
        self.best: float | None = None
        self.wait = 0
        self.stopped_step: int | None = None

    @property
    def key(self) -> str:
        return self.monitor[4:] if self.monitor.startswith("val/") else self.monitor

    def improved(self, value: float) -> bool:
        """Is ``value`` better than the best so far by more than ``min_delta``?"""
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_validate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if self.key not in metrics:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r} but validation reported only: {', '.join(sorted(metrics))}")
        value = float(metrics[self.key])
        reason = None
        if not math.isfinite(value):
            if self.stop_on_nonfinite:
                reason = f"{self.monitor} is {value}"
            else:
                self.wait += 1
        elif self.improved(value):
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        if reason is None and self.wait >= self.patience:
            reason = f"{self.monitor} did not improve on {self.best:.6g} for {self.wait} validations"
        if reason is not None:
            self.stopped_step = step
            trainer.should_stop = True
            if self.verbose and trainer.is_main_process:
                print(f"Early stopping at step {step}: {reason}", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "stopped_step": self.stopped_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.wait = int(state.get("wait", 0))
        self.stopped_step = state.get("stopped_step")
