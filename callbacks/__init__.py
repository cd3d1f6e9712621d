"""Callbacks for the aurora_loop Trainer (installed as ``aurora_loop.callbacks``).

Each callback lives in its own module; heavy imports (orbax, tensorboardX, wandb) happen only
when the callback is first used. Third-party callbacks plug in through the entry-point group
``aurora_loop.callbacks`` or ``module:Class`` specs (see ``aurora_loop.plugins``).
"""

from __future__ import annotations

import importlib
from typing import Any

from aurora_loop.callbacks.base import Callback, CheckpointIO

_LAZY = {
    "ModelCheckpoint": "checkpoint",
    "TensorBoardLogger": "tensorboard",
    "ProgressBar": "progress",
    "LearningRateMonitor": "lr_monitor",
    "EarlyStopping": "early_stopping",
    "TerminateOnNaN": "nan_guard",
    "Throughput": "throughput",
    "WandbLogger": "wandb_logger",
    "Preemption": "preemption",
    "PREEMPTED_EXIT_CODE": "preemption",
    "Profiler": "profiler",
    "TimeLimit": "time_limit",
}

__all__ = ["Callback", "CheckpointIO", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"aurora_loop.callbacks.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'aurora_loop.callbacks' has no attribute {name!r}")
