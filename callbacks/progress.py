"""ProgressBar: a live bar on a terminal, periodic log lines otherwise; validation summaries.

On a TTY it redraws one line (step / total, loss, steps/s, time left); when stdout is not a TTY (CI,
``nohup``, SLURM logs) it prints a line every ``every_n_steps`` steps instead. After each
validation it prints the mean MAE and RMSE per variable. Only process 0 prints.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from aurora_loop.callbacks.base import Callback


def _display_order(names: list[str]) -> list[str]:
    """Surface fields first (as given), then atmospheric ones by variable and ascending level
    (``z50, z250, z500`` rather than the alphabetical ``z250, z50, z500``)."""
    surface, atmos = [], []
    for name in names:
        match = re.fullmatch(r"(.*[^\d.])(\d+(?:\.\d+)?)", name)
        if match and not name[0].isdigit():
            atmos.append((match.group(1), float(match.group(2)), name))
        else:
            surface.append(name)
    variables = list(dict.fromkeys(var for var, _, _ in atmos))
    atmos.sort(key=lambda item: (variables.index(item[0]), item[1]))
    return surface + [name for _, _, name in atmos]


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressBar(Callback):
    """Console progress. ``every_n_steps``: refresh cadence (reading the loss syncs then)."""

    def __init__(self, every_n_steps: int = 10, stream: TextIO | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.stream = stream
        self._start_time = 0.0
        self._start_step = 0
        self._live = False

    @property
    def _out(self) -> TextIO:
        return self.stream or sys.stdout

    def _is_tty(self) -> bool:
        return hasattr(self._out, "isatty") and self._out.isatty()

    def on_fit_start(self, trainer: Any) -> None:
        self._start_time = time.perf_counter()
        self._start_step = trainer.global_step

    def wants_metrics(self, trainer: Any, step: int) -> bool:
        return trainer.is_main_process and step % self.every_n_steps == 0

    def on_step(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if not self.wants_metrics(trainer, step):
            return
        elapsed = max(time.perf_counter() - self._start_time, 1e-9)
        rate = (step - self._start_step) / elapsed
        total = trainer.total_steps
        where = f"step {step}/{total}" if total else f"step {step}"
        loss = f"  loss {metrics['loss']:.4f}" if "loss" in metrics else ""
        eta = ""
        if total and rate > 0 and step < total:
            eta = f"  ETA {_clock((total - step) / rate)}"
        text = f"epoch {trainer.epoch} {where}{loss}  {rate:.2f} steps/s{eta}"
        if self._is_tty():
            width = 24
            done = int(width * step / total) if total else 0
            self._out.write(f"\r[{'#' * done}{'.' * (width - done)}] {text}")
            self._live = True
        else:
            self._out.write(text + "\n")
        self._out.flush()

    def _end_line(self) -> None:
        if self._live:
            self._out.write("\n")
            self._live = False

    def on_validate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if not trainer.is_main_process:
            return
        self._end_line()
        # Per-variable scores averaged over the roll-out; per-lead ones (mae/<var>/<lead>h) go to the loggers.
        names = _display_order([k.split("/", 1)[1] for k in metrics if k.startswith("mae/") and k.count("/") == 1])
        lines = [f"Validation at step {step}: loss {metrics.get('loss', float('nan')):.4f}"]
        for name in names:
            line = f"  {name:>8}  MAE {metrics[f'mae/{name}']:.4g}  RMSE {metrics[f'rmse/{name}']:.4g}"
            if f"crps/{name}" in metrics:  # an ensemble (the MAE/RMSE are then its mean's)
                line += f"  CRPS {metrics[f'crps/{name}']:.4g}  spread/skill {metrics.get(f'spread_skill/{name}', float('nan')):.3g}"
            lines.append(line)
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
