"""Recycled host memory for batch arrays.

A batch at 0.25 degrees is gigabytes. Memory that is freshly mapped costs a page fault per
page on its first write, and a loader that hands each batch to a consumer cannot reuse the
batch's memory while the consumer still holds it. This pool hands out numpy arrays whose
memory comes back to it only once nothing refers to that memory any more: not the batch,
not a view of it, not a framework that wraps it without copying. The next batch of the same
size then reuses memory whose pages are already mapped.

The arrays are views of one ``np.frombuffer`` array over a ``bytearray`` that the pool
keeps. numpy points every view's ``base`` at that array, so the array dies only when the
last view does, and its finaliser returns the ``bytearray``.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence

import numpy as np


class BufferPool:
    """Hands out arrays whose memory is recycled once it is unreferenced.

    Args:
      keep: the most idle buffers of one size the pool holds; extra ones are freed.
    """

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._idle: dict[int, list[bytearray]] = {}
        self._lock = threading.Lock()
        self.allocated = 0  # buffers made (not reused), for tests and diagnostics

    def empty(self, shape: Sequence[int], dtype: np.dtype | type = np.float32) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype``, on recycled memory when possible."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return np.empty(shape, dtype)
        with self._lock:
            idle = self._idle.get(nbytes)
            raw = idle.pop() if idle else None
            if raw is None:
                self.allocated += 1
        if raw is None:
            raw = bytearray(nbytes)
        owner = np.frombuffer(raw, dtype=dtype)
        weakref.finalize(owner, self._give_back, raw)
        return owner.reshape(shape)

    def _give_back(self, raw: bytearray) -> None:
        with self._lock:
            idle = self._idle.setdefault(len(raw), [])
            if len(idle) < self.keep:
                idle.append(raw)

    def idle(self) -> int:
        """Buffers waiting to be reused."""
        with self._lock:
            return sum(len(v) for v in self._idle.values())
