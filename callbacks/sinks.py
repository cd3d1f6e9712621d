"""Scalar sinks: how one callback hands numbers to the loggers of a run.

A *logger* is any callback with a ``log_metrics(trainer, step, metrics)`` method
(:class:`~aurora_loop.callbacks.TensorBoardLogger`, :class:`~aurora_loop.callbacks.WandbLogger`).
Producers such as :class:`~aurora_loop.callbacks.LearningRateMonitor` and
:class:`~aurora_loop.callbacks.Throughput` call :func:`log_to_loggers`, so they work with
whichever loggers a run script composes, and with none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class ScalarLogger(Protocol):
    """A callback that accepts scalars by full tag (``train/learning_rate``, ``perf/steps_per_sec``)."""

    def log_metrics(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None: ...


def loggers(trainer: Any) -> list[ScalarLogger]:
    """The trainer's callbacks that accept scalars."""
    return [cb for cb in trainer.callbacks if callable(getattr(cb, "log_metrics", None))]


def log_to_loggers(trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
    """Hand ``metrics`` (tag -> float) at ``step`` to every logger of the run (process 0 only)."""
    if not trainer.is_main_process or not metrics:
        return
    for sink in loggers(trainer):
        sink.log_metrics(trainer, step, metrics)


def learning_rate_left_to_monitor(trainer: Any) -> bool:
    """Whether a LearningRateMonitor hands ``train/learning_rate`` to the run's loggers, so a
    logger should not write it again itself."""
    from aurora_loop.callbacks.lr_monitor import LearningRateMonitor

    return any(isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks)
