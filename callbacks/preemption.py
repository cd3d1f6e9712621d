"""Preemption: SIGTERM / SIGINT only set a flag; the loop saves and exits at the next step boundary.

A cluster that preempts a job sends SIGTERM (SLURM, Kubernetes, spot VMs) and waits a
grace period; Ctrl-C sends SIGINT. The handler does nothing but ask for a stop that saves now
and skips validation (``trainer.request_stop(validate=False, checkpoint=True)``) and note it in
:attr:`Preemption.preempted`: the loop notices at the next step boundary (also inside
validation, which it abandons), :class:`~aurora_loop.callbacks.ModelCheckpoint` saves that
step whatever its schedule, background writes finish, and ``fit`` returns normally. The
caller then exits with :data:`PREEMPTED_EXIT_CODE` (``aurora-train`` does) so a scheduler
can tell "requeue me" from success or failure; rerunning the same command resumes.

A second signal while the first is being honoured falls back to the handler that was
installed before (default SIGINT: ``KeyboardInterrupt``; default SIGTERM: terminate now).
Handlers can only be installed in the main thread; elsewhere this callback warns and
does nothing. The previous handlers are restored when ``fit`` ends. In a multi-process job
a signal that reached only some processes still stops all of them at the same step (the
trainer agrees on its stop requests; a signal that arrives while the processes exchange
their flags is kept for the next exchange), and at the end every process reports
``preempted``.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

from aurora_loop.callbacks.base import Callback

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75
"""Exit status of a run stopped by a signal after saving (BSD ``EX_TEMPFAIL``: retry later)."""


def was_preempted(trainer: Any) -> bool:
    """Did a Preemption callback stop this trainer's last ``fit``?"""
    return any(isinstance(cb, Preemption) and cb.preempted for cb in getattr(trainer, "callbacks", ()))


class Preemption(Callback):
    """Turn ``signals`` into a graceful stop with a checkpoint.

    Args:
      signals: signals to catch (default SIGTERM and SIGINT).
      verbose: print a line when a signal arrives (process 0).
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT), verbose: bool = True) -> None:
        self.signals = tuple(signals)
        self.verbose = verbose
        self.received: int | None = None
        self.preempted = False  # a signal stopped the last fit (agreed over the processes at its end)
        self._previous: dict[int, Any] = {}
        self._trainer: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        trainer = self._trainer
        if self.received is not None or trainer is None:
            previous = self._previous.get(signum, signal.SIG_DFL)
            self._restore()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(signum)
            return
        self.received = signum
        self.preempted = True
        trainer.request_stop(signal.Signals(signum).name, validate=False, checkpoint=True)
        if self.verbose and trainer.is_main_process:
            # print() from a signal handler is fine here: it runs in the main thread between bytecodes.
            print(f"Received {signal.Signals(signum).name}: saving at the next step boundary, then exiting "
                  f"(status {PREEMPTED_EXIT_CODE}); send it again to stop at once", flush=True)

    def on_fit_start(self, trainer: Any) -> None:
        self._trainer, self.received, self.preempted = trainer, None, False
        if threading.current_thread() is not threading.main_thread():
            log.warning("Preemption: fit() runs outside the main thread; signal handlers not installed")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def on_fit_end(self, trainer: Any) -> None:
        self._restore()
        self._trainer = None
        # A signal may have reached only some processes; all of them stopped together (the
        # trainer agrees on should_stop), so all report preemption and exit alike.
        from aurora_loop.parallel.distributed import agree

        self.preempted = agree(self.preempted)

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        self._restore()
        self._trainer = None
