"""What ``aurora-train`` shows before training: the line naming the weights a run starts from,
and nothing unasked from third-party libraries (their warnings only with ``--verbose``)."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

# Loggers of libraries that report at WARNING level on their own (orbax through absl, JAX's
# backend discovery); their errors still show.
THIRD_PARTY_LOGGERS = ("absl", "jax", "orbax", "etils", "tensorflow", "tensorboardX")


@contextlib.contextmanager
def quiet_third_party(verbose: bool) -> Iterator[None]:
    """Inside the block, keep other libraries' warnings and WARNING-level log records off the
    console, unless ``verbose``; this package's own warnings (``aurora_loop.*``) still show.
    Everything is as it was afterwards (``aurora-train``'s ``main`` also runs in-process)."""
    if verbose:
        yield
        return
    levels = {name: logging.getLogger(name).level for name in THIRD_PARTY_LOGGERS}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"aurora_loop(\.|$)")  # inserted first, so it wins
        for name in THIRD_PARTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def _count(n: int) -> str:
    return f"{n:,}"


def weights_line(config: Any, task: Any) -> str:
    """The header's line on where the weights start from: the pretrained checkpoints (path,
    parts, values loaded, values that start fresh and why) or a fresh initialisation.

    A run that resumes says so itself when the checkpoint is read (``ModelCheckpoint``); this
    line is for runs that start.
    """
    report = task.pretrained_report() if callable(getattr(task, "pretrained_report", None)) else None
    if not report:
        return f"Weights: freshly initialised (--seed {config.seed})"
    parts = report["parts"]
    folders = {os.path.dirname(os.path.abspath(p)) for p in parts.values()}
    where = folders.pop() if len(folders) == 1 else ", ".join(f"{k} {v}" for k, v in parts.items())
    new = report["new"]
    fresh = sum(new.values())
    detail = f" ({'; '.join(f'{kind} {_count(n)}' for kind, n in new.items())})" if new else ""
    return (f"Weights: pretrained, from {where} ({', '.join(parts)}): {_count(report['loaded'])} of "
            f"{_count(report['parameters'])} parameters loaded, {_count(fresh)} new{detail}")
