"""Callbacks for the aurora_loop Trainer (installed as ``aurora_loop.callbacks``).

Each callback lives in its own module; heavy imports (orbax, tensorboardX) happen only when
the callback is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from aurora_loop.callbacks.base import Callback

_LAZY = {
    "ModelCheckpoint": "checkpoint",
    "TensorBoardLogger": "tensorboard",
    "ProgressBar": "progress",
}

__all__ = ["Callback", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"aurora_loop.callbacks.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'aurora_loop.callbacks' has no attribute {name!r}")
