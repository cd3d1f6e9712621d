"""TimeLimit: end the run cleanly, with a checkpoint, before a wall-clock limit.

A batch job has a fixed allocation (SLURM ``--time``): killed at the limit, it loses everything
since its last checkpoint. ``TimeLimit(max_seconds)`` stops *before* that: after each step it
estimates how long the run still needs if it goes on for one more decision and then stops —
two steps, the final validation and the final checkpoint save, plus a safety margin — and
when ``elapsed + estimate`` would pass the limit it sets ``trainer.should_stop``. The loop
then ends at the next step boundary like any stop: it validates the parameters it hands over,
:class:`~aurora_loop.callbacks.ModelCheckpoint` saves them (``save_last``), background writes
finish and ``fit`` returns normally (``aurora-train`` exits with status 0). Rerunning the same
command resumes; the resumed job gets a fresh limit (like a new allocation): this callback
keeps no checkpointed state.

Wall-clock time counts from ``start_time`` (default: when the callback is constructed).
``aurora-train`` passes the time its process started, so the limit also covers start-up,
opening the data and compilation.

Why two steps: step ``t``'s ``on_step`` runs after step ``t + 1`` was dispatched, so a stop
requested there ends after step ``t + 1``; not stopping means the next chance comes a step
later and then still needs the step after it. The step time is the longest of the last few
step-to-step intervals as the host sees them (validation and save time taken out). The host
may run ahead of the device between reads of results, and that longest interval — the wait at
a read — also bounds how far the device lags behind, i.e. how long the end-of-run sync waits.

Measurements (no device sync, no collectives of its own):

- step time: host time between consecutive ``on_step`` hooks per step dispatched in between,
  minus the validation and blocking save time; the first step (compilation) is left out;
- validation: from a step's ``on_step`` to its ``on_validate`` (the latest one; until the first
  validation, the first step's time, which includes compiling, stands in for it);
- save: the checkpoint callbacks' ``last_save_seconds`` (whole save, background write
  included once it has finished); 0 before the first save.

Multi-process: only process 0's clock decides; the trainer ORs ``should_stop`` over all
processes at the next step boundary (``Trainer._agree``), so every process stops at the same
step. The reason line is printed, and ``reason`` set, on process 0 only.
"""

from __future__ import annotations

import collections
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from aurora_loop.callbacks.base import Callback

_MAX_PLAUSIBLE_AGE_S = 24 * 3600.0  # a larger "process age" means /proc disagrees with itself (a container's uptime)


def process_age_seconds() -> float:
    """Seconds since this process started; 0.0 where the system does not say (non-Linux)."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()  # the command name (field 2) may hold spaces
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in ticks after boot
    except (OSError, ValueError, IndexError):
        return 0.0
    return age if 0.0 <= age <= _MAX_PLAUSIBLE_AGE_S else 0.0


def process_start_time(clock: Callable[[], float] = time.monotonic) -> float:
    """The reading of ``clock`` (seconds) when this process started, for ``TimeLimit(start_time=)``."""
    return clock() - process_age_seconds()


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``M:SS`` under an hour), rounded up to whole seconds."""
    total = max(0, math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_limit(seconds: float) -> str:
    """``seconds`` as ``[DD:]HH:MM:SS``, the format of ``--max_time``."""
    days, rest = divmod(int(round(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days:02d}:{text}" if days else text


def _validates_at(trainer: Any, step: int) -> bool:
    """Is a validation scheduled at ``step`` (``val_every_n_steps``, else the epoch's end)?"""
    every = getattr(trainer, "val_every_n_steps", None)
    if every is not None:
        return step % every == 0
    per_epoch = getattr(trainer, "steps_per_epoch", None)
    return per_epoch is not None and getattr(trainer, "epoch_step", 0) >= per_epoch


class TimeLimit(Callback):
    """Stop the run cleanly before ``max_seconds`` of wall-clock time have passed.

    Args:
      max_seconds: the limit, in seconds after ``start_time``.
      start_time: a reading of ``clock`` (seconds) the limit counts from; default: now (when
        the callback is constructed). :func:`process_start_time` gives the process's start.
      clock: seconds, monotonic (``time.monotonic``; tests pass a fake one).
      margin_seconds: fixed safety margin, in seconds, for what the estimate leaves out
        (exiting the process, a slower step).
      margin_fraction: further margin, as a fraction of the estimate.
      window: step intervals to take the longest of.
      label: how the limit is named in the stop line (default ``"the time limit HH:MM:SS"``).
      verbose: print the stop line (process 0).

    Attributes:
      reason: the stop line once this callback stopped the run (process 0), else ``None``.
      stopped_step: the step the run stops at, once this callback stopped it (process 0).
    """

    def __init__(
        self,
        max_seconds: float,
        start_time: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        margin_seconds: float = 5.0,
        margin_fraction: float = 0.2,
        window: int = 10,
        label: str | None = None,
        verbose: bool = True,
    ) -> None:
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        if margin_seconds < 0 or margin_fraction < 0:
            raise ValueError(f"margins must not be negative, got {margin_seconds} s and {margin_fraction}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.max_seconds = float(max_seconds)
        self.clock = clock
        self.start_time = clock() if start_time is None else float(start_time)
        self.margin_seconds = margin_seconds
        self.margin_fraction = margin_fraction
        self.label = label if label is not None else f"the time limit {format_limit(max_seconds)}"
        self.verbose = verbose
        self.reason: str | None = None
        self.stopped_step: int | None = None
        self._intervals: collections.deque[float] = collections.deque(maxlen=window)
        self._reset_measurements()

    def _reset_measurements(self) -> None:
        self._intervals.clear()
        self._fit_start: float | None = None
        self._first_step_seconds: float | None = None  # includes compilation
        self._validation_seconds: float | None = None
        self._last_step: tuple[int, float, int] | None = None  # (step, clock, global_step) at its on_step
        self._paused = 0.0  # validation / save seconds since the last on_step, kept out of the step time
        self._saves_seen: dict[int, int] = {}

    # --- measurements ------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        """Seconds since ``start_time``."""
        return self.clock() - self.start_time

    @property
    def step_seconds(self) -> float:
        """The longest of the recent host intervals per dispatched step, in seconds (0.0 before
        two steps were seen)."""
        return max(self._intervals, default=0.0)

    def validation_seconds(self, trainer: Any) -> float:
        """Expected seconds of one validation (0.0 without validation data)."""
        if getattr(trainer, "val_data", None) is None:
            return 0.0
        if self._validation_seconds is not None:
            return self._validation_seconds
        return self._first_step_seconds or 0.0  # compiling the eval step, like the first train step

    @staticmethod
    def _savers(trainer: Any) -> list[Any]:
        return [cb for cb in getattr(trainer, "callbacks", ()) if hasattr(cb, "last_save_seconds")]

    def save_seconds(self, trainer: Any) -> float:
        """Expected seconds of one checkpoint save, background write included (0.0 before any)."""
        return max((cb.last_save_seconds or 0.0 for cb in self._savers(trainer)), default=0.0)

    def _blocking_save_seconds_since_last_step(self, trainer: Any) -> float:
        """Seconds the loop waited in saves made since the previous ``on_step``."""
        waited = 0.0
        for cb in self._savers(trainer):
            count = len(getattr(cb, "saved_steps", ()))
            if count != self._saves_seen.get(id(cb), count):
                waited += getattr(cb, "last_save_blocking_seconds", None) or 0.0
            self._saves_seen[id(cb)] = count
        return waited

    def estimate(self, trainer: Any, step: int) -> float:
        """Seconds the run needs if it does not stop at ``step``'s hook but at the next one.

        Two steps, a validation and a save, plus the validation and save still scheduled at
        this boundary when ``step``'s hooks run before the next dispatch (a sync step), plus
        the margins.
        """
        validation, save = self.validation_seconds(trainer), self.save_seconds(trainer)
        work = 2 * self.step_seconds + validation + save
        if getattr(trainer, "global_step", None) == step:  # sync step: its own validation / save follow
            work += save + (validation if _validates_at(trainer, step) else 0.0)
        return work * (1.0 + self.margin_fraction) + self.margin_seconds

    # --- hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any) -> None:
        self._reset_measurements()
        self.reason = self.stopped_step = None
        self._fit_start = self.clock()
        self._blocking_save_seconds_since_last_step(trainer)  # count the saves so far

    def on_step(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if not trainer.is_main_process:
            return  # only process 0's clock decides; the trainer shares its stop with everyone
        now, dispatched = self.clock(), int(trainer.global_step)
        paused = self._paused + self._blocking_save_seconds_since_last_step(trainer)
        if self._last_step is not None:
            # Per dispatch: after a sync step two steps are dispatched before the next hook,
            # and a sync step's own hook follows its predecessor's with none in between.
            _, then, dispatched_then = self._last_step
            if dispatched > dispatched_then:
                self._intervals.append(max(0.0, now - then - paused) / (dispatched - dispatched_then))
        elif self._fit_start is not None:
            self._first_step_seconds = now - self._fit_start
        self._last_step, self._paused = (step, now, dispatched), 0.0
        if self.reason is None and not trainer.should_stop:
            self._decide(trainer, step, now - self.start_time)

    def on_validate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if self._last_step is None or self._last_step[0] != step:
            return  # not right after its step's hook (a validation outside fit): nothing to measure
        seconds = self.clock() - self._last_step[1] - self._paused
        self._validation_seconds = max(0.0, seconds)
        self._paused += self._validation_seconds

    # --- the decision ------------------------------------------------------------------------
    def _decide(self, trainer: Any, step: int, elapsed: float) -> None:
        estimate = self.estimate(trainer, step)
        if elapsed + estimate <= self.max_seconds:
            return
        trainer.should_stop = True
        self.stopped_step = int(trainer.global_step)  # nothing more is dispatched after this hook
        self.reason = (f"Stopping at step {self.stopped_step}: {self.label} would be reached within "
                       f"{self._what_follows(trainer)} (elapsed {format_duration(elapsed)}, "
                       f"estimated {format_duration(estimate)} more)")
        if self.verbose:
            print(self.reason, flush=True)

    def _what_follows(self, trainer: Any) -> str:
        parts = ["the next step"]
        if getattr(trainer, "val_data", None) is not None:
            parts.append("validation")
        if self._savers(trainer):
            parts.append("save")
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
