"""LearningRateMonitor: the learning rate the optimizer used, logged as ``train/learning_rate``.

The rate comes from the Trainer's ``learning_rate`` (the optax schedule evaluated at the
step: step ``s`` (1-based) used ``schedule(s - 1)``), or, when the trainer was given none,
from an ``optax.inject_hyperparams`` optimizer state (a device read on log steps only).
Values go to every logger of the run (see ``aurora_loop.callbacks.sinks``) and to
:attr:`LearningRateMonitor.history`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from aurora_loop.callbacks.base import Callback
from aurora_loop.callbacks.sinks import log_to_loggers


def injected_learning_rate(opt_state: Any) -> float | None:
    """``learning_rate`` from the first ``optax.inject_hyperparams`` state inside ``opt_state``."""
    found: list[Any] = []

    def visit(node: Any) -> None:
        if found:
            return
        hyper = getattr(node, "hyperparams", None)
        if isinstance(hyper, Mapping) and "learning_rate" in hyper:
            found.append(hyper["learning_rate"])
            return
        if isinstance(node, (tuple, list)):
            for child in node:
                visit(child)

    visit(opt_state)
    if not found:
        return None
    value = found[0]
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = value.addressable_data(0)
    return float(jax.device_get(value))


class LearningRateMonitor(Callback):
    """Log the learning rate every ``every_n_steps`` steps (no device sync with a schedule).

    With a LearningRateMonitor in the run, TensorBoardLogger leaves ``train/learning_rate``
    to it.
    """

    def __init__(self, every_n_steps: int = 10, tag: str = "train/learning_rate") -> None:
        self.every_n_steps = every_n_steps
        self.tag = tag
        self.history: list[tuple[int, float]] = []

    def learning_rate(self, trainer: Any, step: int) -> float | None:
        """The rate used at ``step`` (1-based), or ``None`` when it cannot be known."""
        lr = trainer.learning_rate(step)
        if lr is None and trainer.state is not None:
            lr = injected_learning_rate(trainer.state.opt_state)
        return lr

    def on_step(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if step % self.every_n_steps:
            return
        lr = self.learning_rate(trainer, step)
        if lr is None:
            return
        self.history.append((step, lr))
        log_to_loggers(trainer, step, {self.tag: lr})
