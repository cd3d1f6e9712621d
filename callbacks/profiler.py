"""Profiler: a ``jax.profiler`` trace over a window of training steps.

The trace covers steps ``start_step + 1`` to ``start_step + num_steps``: the boundaries are
sync steps, so the trace starts when the state after ``start_step`` is ready (nothing of
earlier steps leaks in) and stops once the last traced step finished on the device.
Traces land in ``log_dir/plugins/profile/<run>/`` (``*.xplane.pb``), where TensorBoard's
profile plugin (``pip install tensorboard-plugin-profile``) or XProf/Perfetto read them;
point ``log_dir`` at the run's TensorBoard directory to see them next to the scalars.
Each process writes its own trace.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from aurora_loop.callbacks.base import Callback

log = logging.getLogger(__name__)


class Profiler(Callback):
    """Trace ``num_steps`` steps after step ``start_step`` into ``log_dir``.

    Args:
      log_dir: trace directory (e.g. ``output_dir/tensorboard``).
      start_step: the trace begins after this step (past compilation and warm-up).
      num_steps: steps to trace.
      create_perfetto_trace: also write a Perfetto ``.trace.json.gz``.
    """

    def __init__(self, log_dir: str, start_step: int = 10, num_steps: int = 5, create_perfetto_trace: bool = False) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        self.log_dir = os.path.abspath(log_dir)
        self.start_step = start_step
        self.num_steps = num_steps
        self.create_perfetto_trace = create_perfetto_trace
        self.active = False
        self.traced: tuple[int, int] | None = None

    @property
    def stop_step(self) -> int:
        return self.start_step + self.num_steps

    def wants_sync(self, trainer: Any, step: int) -> bool:
        return step in (self.start_step, self.stop_step)

    def on_fit_start(self, trainer: Any) -> None:
        if self.start_step == trainer.global_step and self.traced is None:
            self._start(trainer)

    def on_sync(self, trainer: Any, step: int) -> None:
        if step == self.start_step and not self.active and self.traced is None:
            self._start(trainer)
        elif self.active and step >= self.stop_step:
            self._stop(trainer, step)

    def _start(self, trainer: Any) -> None:
        jax.block_until_ready(trainer.state)
        os.makedirs(self.log_dir, exist_ok=True)
        jax.profiler.start_trace(self.log_dir, create_perfetto_trace=self.create_perfetto_trace)
        self.active = True

    def _stop(self, trainer: Any, step: int) -> None:
        jax.block_until_ready(trainer.state)
        jax.profiler.stop_trace()
        self.active = False
        self.traced = (self.start_step + 1, step)
        if trainer.is_main_process:
            print(f"Profiler: traced steps {self.start_step + 1}-{step} into {self.log_dir}", flush=True)

    def on_fit_end(self, trainer: Any) -> None:
        if self.active:  # the run ended inside the window
            self._stop(trainer, trainer.global_step)

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        if self.active:
            try:
                jax.profiler.stop_trace()
            finally:
                self.active = False
