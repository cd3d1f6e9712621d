"""Subprocess work that the suite runs in the background, next to the tests in the foreground.

The long checks (the scenario matrix, the docs' runnable pages, the benchmark smokes) are
independent subprocess jobs, mostly XLA compiling on one thread. The foreground's in-process
tests also compile on one thread, so a two-core machine leaves a core idle for most of the
run. ``conftest.py`` therefore submits those jobs when collection ends; they run in
submission order, in **one lane while the foreground is running tests of its own and in every
lane while it waits for a background result** (it lends its core). A job may take several
lanes (a two-process scenario cell takes two).
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

# Lanes while the foreground waits; one fewer while it runs. Capped: each job holds a
# CPU process with a GiB or two of memory, and more lanes than cores only adds contention.
ALL_LANES = max(2, min(os.cpu_count() or 2, 4))
_LOCK = threading.Lock()  # guards the module's session state below


class Lanes:
    """A counting limit on concurrent background jobs whose capacity grows while the
    foreground waits (see :meth:`lent`)."""

    def __init__(self, total: int = ALL_LANES) -> None:
        self.total = total
        self.in_use = 0
        self.waiting = 0  # how many foreground waits are in progress (nested waits count once each)
        self.cond = threading.Condition()

    @property
    def capacity(self) -> int:
        return self.total if self.waiting else self.total - 1

    def acquire(self, n: int) -> None:
        n = min(n, self.total)
        with self.cond:
            self.cond.wait_for(lambda: self.in_use + n <= self.capacity)
            self.in_use += n

    def release(self, n: int) -> None:
        with self.cond:
            self.in_use -= min(n, self.total)
            self.cond.notify_all()

    def lend(self) -> None:
        with self.cond:
            self.waiting += 1
            self.cond.notify_all()

    def take_back(self) -> None:
        with self.cond:
            self.waiting -= 1


class Background:
    """Runs submitted jobs in order, each once ``lanes`` lanes are free, on threads of its own."""

    def __init__(self, lanes: Lanes | None = None) -> None:
        self.lanes = lanes or Lanes()
        self.queue: queue.SimpleQueue[tuple[Callable[[], Any], int, Future] | None] = queue.SimpleQueue()
        self.dispatcher = threading.Thread(target=self._dispatch, name="background-dispatch", daemon=True)
        self.dispatcher.start()

    def submit(self, job: Callable[[], Any], lanes: int = 1) -> Future:
        future: Future = Future()
        self.queue.put((job, lanes, future))
        return future

    def _dispatch(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            job, lanes, future = item
            self.lanes.acquire(lanes)  # in submission order: a job waits for the one before it
            threading.Thread(target=self._run, args=(job, lanes, future), daemon=True).start()

    def _run(self, job: Callable[[], Any], lanes: int, future: Future) -> None:
        try:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as err:  # noqa: BLE001 - re-raised in the test that waits
                    future.set_exception(err)
        finally:
            self.lanes.release(lanes)

    def wait(self, future: Future) -> Any:
        """``future``'s result; the foreground's core goes to the background meanwhile."""
        if future.done():
            return future.result()
        self.lanes.lend()
        try:
            return future.result()
        finally:
            self.lanes.take_back()


_LIVE: set[subprocess.Popen] = set()


def popen(args: list[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen``, remembered so that :func:`stop_all` can end it with the session."""
    proc = subprocess.Popen(args, **kwargs)
    with _LOCK:
        _LIVE.add(proc)
    return proc


def run(args: list[str], timeout: float | None = None, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(args, timeout=timeout, capture_output=True, text=True, **kwargs)`` for
    a background job (the process ends with the session)."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    proc = popen(args, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(args, timeout or 0, out, err) from None
    finally:
        with _LOCK:
            _LIVE.discard(proc)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def stop_all() -> None:
    """Kill what background jobs still run (a session ended early, e.g. by ``-x``)."""
    with _LOCK:
        live = list(_LIVE)
    for proc in live:
        if proc.poll() is None:
            proc.kill()


_BACKGROUND: Background | None = None


def background() -> Background:
    """The test session's one background runner."""
    global _BACKGROUND
    with _LOCK:
        if _BACKGROUND is None:
            _BACKGROUND = Background()
        return _BACKGROUND
