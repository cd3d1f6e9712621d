"""TensorBoardLogger: scalars to event files under ``output_dir/tensorboard`` (tensorboardX).

Tags: ``train/loss``, ``train/grad_norm``, ``train/learning_rate`` and any other training
metric as ``train/<name>``; validation scores as ``val/<name>`` (``val/loss``,
``val/mae/<var>``, ``val/rmse/<var>``). Only process 0 writes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from aurora_loop.callbacks.base import Callback


class TensorBoardLogger(Callback):
    """Write training scalars every ``log_every_n_steps`` steps and every validation.

    Args:
      log_dir: directory for the event files (``output_dir/tensorboard``).
      log_every_n_steps: training scalars cadence; reading them is the only sync it causes.
      flush_secs: how often tensorboardX's writer thread flushes to disk.
    """

    def __init__(self, log_dir: str, log_every_n_steps: int = 10, flush_secs: int = 30) -> None:
        self.log_dir = os.path.abspath(log_dir)
        self.log_every_n_steps = log_every_n_steps
        self.flush_secs = flush_secs
        self._writer = None

    def writer(self, trainer: Any):
        if self._writer is None and trainer.is_main_process:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=self.log_dir, flush_secs=self.flush_secs)
        return self._writer

    def wants_metrics(self, trainer: Any, step: int) -> bool:
        return trainer.is_main_process and step % self.log_every_n_steps == 0

    def on_step(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if not self.wants_metrics(trainer, step):
            return
        writer = self.writer(trainer)
        for name in metrics:
            writer.add_scalar(f"train/{name}", metrics[name], step)
        lr = trainer.learning_rate(step)
        if lr is not None:
            writer.add_scalar("train/learning_rate", lr, step)

    def on_validate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        writer = self.writer(trainer)
        if writer is None:
            return
        for name, value in metrics.items():
            writer.add_scalar(f"val/{name}", value, step)
        writer.flush()

    def on_fit_end(self, trainer: Any) -> None:
        self.close()

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
