"""LearningRateMonitor: the learning rate the optimizer used, logged as ``train/learning_rate``.

The rate comes from the Trainer's ``learning_rate`` (the optax schedule evaluated at the
step: step ``s`` (1-based) used ``schedule(s - 1)``), or, when the trainer was given none,
from the step's own ``learning_rate`` metric, which the train step reports for an
``optax.inject_hyperparams`` optimizer (fetched with the step's other metrics on log steps
only, so it is the rate of that very step and costs no extra sync).
Values go to every logger of the run (see ``aurora_loop.callbacks.sinks``) and to
:attr:`LearningRateMonitor.history`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aurora_loop.callbacks.base import Callback
from aurora_loop.callbacks.sinks import log_to_loggers


class LearningRateMonitor(Callback):
    """Log the learning rate every ``every_n_steps`` steps (no device sync with a schedule).

    With a LearningRateMonitor in the run, TensorBoardLogger leaves ``train/learning_rate``
    to it.
    """

    def __init__(self, every_n_steps: int = 10, tag: str = "train/learning_rate") -> None:
        self.every_n_steps = every_n_steps
        self.tag = tag
        self.history: list[tuple[int, float]] = []

    def learning_rate(self, trainer: Any, step: int, metrics: Mapping[str, float] | None = None) -> float | None:
        """The rate used at ``step`` (1-based), or ``None`` when it cannot be known."""
        lr = trainer.learning_rate(step)
        if lr is None and metrics is not None and "learning_rate" in metrics:
            lr = float(metrics["learning_rate"])
        return lr

    def wants_metrics(self, trainer: Any, step: int) -> bool:
        # Only an injected rate needs the step's metrics; a schedule is known on the host.
        return step % self.every_n_steps == 0 and trainer.learning_rate(step) is None

    def on_step(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if step % self.every_n_steps:
            return
        lr = self.learning_rate(trainer, step, metrics)
        if lr is None:
            return
        self.history.append((step, lr))
        log_to_loggers(trainer, step, {self.tag: lr})
