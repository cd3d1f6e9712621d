"""Where a run's wall-clock time goes: one clock for a fit, split into phases.

The Trainer marks what it is doing (``with clock.phase("validation"):``); time outside every
marked phase is ``training``: dispatching steps, waiting for the device and the callbacks'
hooks. Phases nest and the innermost one is charged, so compiling the eval step during the
first validation counts as compilation, not validation. The console's step rate and ETA
and the closing summary read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

# Phase names, in the order a summary lists them. "data" is time the loop waited for the next
# batch (reading, decoding, putting it on the devices).
PHASES = ("start-up", "compilation", "training", "validation", "checkpointing", "data")


@dataclasses.dataclass(frozen=True)
class CompileRecord:
    """One compilation the loop waited for.

    Attributes:
      what: ``"train step"`` or ``"eval step"``.
      step: the optimizer step it was compiled for (the first step of the fit, or the step
        of the validation).
      seconds: wall-clock seconds of the call that compiled it (tracing, compiling or
        loading from the persistent cache, dispatching).
      from_cache: the program came from JAX's persistent compilation cache.
    """

    what: str
    step: int
    seconds: float
    from_cache: bool


class PhaseClock:
    """Wall-clock seconds of one fit, by phase.

    Args:
      clock: seconds, monotonic (tests may pass a fake one).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._counts = dict.fromkeys(PHASES, 0)
        self._stack: list[str] = []
        self._since: float | None = None

    def start(self) -> None:
        """Start afresh (every phase at zero); time from now on is charged to ``training``."""
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._counts = dict.fromkeys(PHASES, 0)
        self._stack = []
        self._since = self._clock()

    @property
    def started(self) -> bool:
        return self._since is not None

    def _charge(self) -> None:
        if self._since is None:
            return
        now = self._clock()
        self._seconds[self._stack[-1] if self._stack else "training"] += now - self._since
        self._since = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the time inside the block to ``name`` (one of :data:`PHASES`)."""
        if name not in self._seconds:
            raise ValueError(f"unknown phase {name!r}; phases are {', '.join(PHASES)}")
        self._charge()
        self._stack.append(name)
        self._counts[name] += 1
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()

    def seconds(self) -> dict[str, float]:
        """Seconds per phase so far (the running phase included up to now)."""
        self._charge()
        return dict(self._seconds)

    def count(self, name: str) -> int:
        """How many times phase ``name`` was entered (e.g. validations run)."""
        return self._counts[name]

    def total(self) -> float:
        """Seconds since :meth:`start`, all phases together."""
        return sum(self.seconds().values())

    def stepping(self) -> float:
        """Seconds that count toward the step rate: ``training`` plus ``data`` (waiting for
        batches is part of what a step costs); compilation, validation and checkpoints not."""
        seconds = self.seconds()
        return seconds["training"] + seconds["data"]
