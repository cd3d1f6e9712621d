"""ProgressBar: a live bar on a terminal, periodic log lines otherwise; validation scorecards.

On a TTY it redraws one line (step / total, loss, steps/s, time left); when stdout is not a TTY (CI,
``nohup``, SLURM logs) it prints a line every ``every_n_steps`` steps instead. It says when the
first step is being compiled, and afterwards whether the train step was compiled or loaded
from JAX's persistent compilation cache. The rate and the ETA count only steps after that
first one, and leave out validation and checkpoint time (the trainer's
:class:`~aurora_loop.timing.PhaseClock`); the ETA adds the validations still to come at their
measured length. After each validation it prints a table of scores
(:mod:`aurora_loop.callbacks.val_table`). Only process 0 prints.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from aurora_loop.callbacks.base import Callback
from aurora_loop.callbacks.val_table import VAL_TABLE_MODES, validation_lines


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _rate(steps_per_sec: float) -> str:
    """``12.3 steps/s``, or ``4.1 s/step`` for slow steps (easier to read)."""
    return f"{steps_per_sec:.2f} steps/s" if steps_per_sec >= 1 else f"{1 / steps_per_sec:.2f} s/step"


def validations_left(trainer: Any, step: int, total: int) -> int:
    """Validations the run will still make after ``step`` (every ``val_every_n_steps`` steps or
    at each epoch end, and one at the end of the run)."""
    if getattr(trainer, "val_data", None) is None:
        return 0
    every = getattr(trainer, "val_every_n_steps", None) or getattr(trainer, "steps_per_epoch", None)
    if not every:
        return 1 if step < total else 0
    return total // every - step // every + (1 if total % every else 0)


class ProgressBar(Callback):
    """Console progress.

    Args:
      every_n_steps: refresh cadence (reading the loss syncs then).
      stream: where to write (default: stdout).
      val_table: after each validation, ``compact`` (RMSE by variable and level, at the levels
        that fit ``width``; an ensemble's CRPS and spread/skill too), ``full`` (every metric,
        every level) or ``none`` (the loss alone).
      width: characters a compact table fits in.
    """

    def __init__(self, every_n_steps: int = 10, stream: TextIO | None = None, val_table: str = "compact",
                 width: int = 80) -> None:
        if val_table not in VAL_TABLE_MODES:
            raise ValueError(f"val_table must be one of {', '.join(VAL_TABLE_MODES)}, got {val_table!r}")
        self.every_n_steps = every_n_steps
        self.stream = stream
        self.val_table = val_table
        self.width = width
        self._window: tuple[int, float] | None = None  # (first step after compilation, its stepping seconds)
        self._live = False

    @property
    def _out(self) -> TextIO:
        return self.stream or sys.stdout

    def _is_tty(self) -> bool:
        return hasattr(self._out, "isatty") and self._out.isatty()

    @staticmethod
    def _stepping_seconds(trainer: Any) -> float:
        clock = getattr(trainer, "clock", None)
        return clock.stepping() if clock is not None and clock.started else time.perf_counter()

    def on_fit_start(self, trainer: Any) -> None:
        self._window = None
        if trainer.is_main_process:
            text = f"Step {trainer.global_step + 1}: compiling the train step (or loading it from the compilation cache)"
            if self._is_tty():  # replaced by the outcome
                self._out.write(text)
                self._live = True
            else:
                self._out.write(text + "\n")
            self._out.flush()

    def wants_metrics(self, trainer: Any, step: int) -> bool:
        return trainer.is_main_process and step % self.every_n_steps == 0

    def _first_step(self, trainer: Any, step: int) -> None:
        """The first step of the fit: it was compiled; the rate counts from here."""
        self._window = (step, self._stepping_seconds(trainer))
        record = getattr(trainer, "train_step_compile", None)
        if record is not None and trainer.is_main_process:
            how = "loaded from the compilation cache" if record.from_cache else "compiled"
            text = f"Step {record.step}: train step {how} in {record.seconds:.1f} s"
            self._out.write(f"\r{text:<80}\n" if self._live else text + "\n")
            self._live = False
            self._out.flush()

    def on_step(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if self._window is None:
            self._first_step(trainer, step)
        if not self.wants_metrics(trainer, step):
            return
        first, start = self._window
        total = trainer.total_steps
        where = f"step {step}/{total}" if total else f"step {step}"
        loss = f"  loss {metrics['loss']:.4f}" if "loss" in metrics else ""
        speed = eta = ""
        elapsed = self._stepping_seconds(trainer) - start
        if step > first and elapsed > 0:
            rate = (step - first) / elapsed
            speed = f"  {_rate(rate)}"
            if total and step < total:
                eta = f"  ETA {_clock((total - step) / rate + self._validation_seconds(trainer, step, total))}"
        text = f"epoch {trainer.epoch} {where}{loss}{speed}{eta}"
        if self._is_tty():
            width = 24
            done = int(width * step / total) if total else 0
            self._out.write(f"\r[{'#' * done}{'.' * (width - done)}] {text}")
            self._live = True
        else:
            self._out.write(text + "\n")
        self._out.flush()

    @staticmethod
    def _validation_seconds(trainer: Any, step: int, total: int) -> float:
        """The validations still to come, at the mean length of those so far (none yet: 0)."""
        clock = getattr(trainer, "clock", None)
        if clock is None or not clock.count("validation"):
            return 0.0
        return validations_left(trainer, step, total) * clock.seconds()["validation"] / clock.count("validation")

    def _end_line(self) -> None:
        if self._live:
            self._out.write("\n")
            self._live = False

    def on_validate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if not trainer.is_main_process:
            return
        self._end_line()
        # Scores averaged over the roll-out; per-lead ones (rmse/<var>/<lead>h) go to the loggers.
        model = getattr(getattr(trainer, "task", None), "model_config", None)
        surface = tuple(getattr(model, "surf_vars", ())) + tuple(getattr(model, "output_only_surf_vars", ()))
        lines = validation_lines(step, metrics, self.val_table, self.width, surface)
        self._out.write("\n".join(lines) + "\n")
        self._out.flush()

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: Mapping[str, float]) -> None:
        if trainer.is_main_process:
            self._end_line()
            per_epoch = getattr(trainer, "steps_per_epoch", None)
            taken = getattr(trainer, "epoch_step", per_epoch)
            if per_epoch is not None and taken is not None and taken < per_epoch:  # the run ended mid-epoch
                self._out.write(f"Epoch {epoch} ended early at step {trainer.global_step} ({taken} of its {per_epoch} steps)\n")
            else:
                self._out.write(f"Epoch {epoch} done (step {trainer.global_step})\n")
            self._out.flush()

    def on_fit_end(self, trainer: Any) -> None:
        if trainer.is_main_process:
            self._end_line()
