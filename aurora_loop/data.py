"""The data-loader protocol the Trainer consumes, and a small in-memory loader.

A loader yields *this process's share* of each global batch as host (numpy) pytrees; the
trainer places them on the mesh (``jax.make_array_from_process_local_data``), so a loader
never needs to know about shardings. Its position is part of the checkpoint so a resumed
run continues with exactly the next batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np


class _RepeatBatch:
    def __repr__(self) -> str:
        return "REPEAT_BATCH"


REPEAT_BATCH = _RepeatBatch()
"""Yielded by a loader in place of a batch: train on the previous batch again."""


@runtime_checkable
class Loader(Protocol):
    """Epoch-based, resumable iteration over process-local batches.

    - ``set_epoch(epoch)``: begin ``epoch`` at position 0 (its shuffle order is a function of
      the loader's seed and ``epoch`` only).
    - ``__iter__()``: yields the remaining batches of the current epoch, advancing the
      position by one per batch *yielded* (read-ahead does not count).
    - ``__len__()``: batches per epoch.
    - ``state_dict()`` -> ``{"epoch": int, "position": int, ...}`` (JSON-able);
      ``load_state_dict(state)`` restores it, so the next ``__iter__`` continues there.
    - Anything random in a batch (the shuffle, a lead time drawn per example such as
      ``Sample.lead_hours``) is a function of the seed, the epoch and the example's position
      in the epoch only, so a resumed run reads the batches an uninterrupted one would.

    Optional: ``example_batch()`` returns one batch shaped like every batch without moving
    the position (the trainer builds the state from it; without it the trainer reads the
    first batch of epoch 0 and resets the epoch).

    A loader may yield :data:`REPEAT_BATCH` instead of a batch: the step trains on the batch
    before it again, which is not placed on the devices again (a task that takes several
    steps per dataset batch wraps its loader so, see ``Task.train_loader``).
    """

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def example_batch(loader: Any) -> Any:
    """One process-local batch shaped like all of ``loader``'s, without moving its position:
    the loader's own ``example_batch()`` when it has one (a prefetching loader reads just
    that batch), else the first batch of epoch 0."""
    if callable(getattr(loader, "example_batch", None)):
        return loader.example_batch()
    loader.set_epoch(0)
    iterator = iter(loader)
    try:
        return next(iterator)
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
        loader.set_epoch(0)


class ArrayLoader:
    """Batches drawn from an in-memory sequence of examples.

    Args:
      examples: single examples (any pytree; with ``collate`` they become a batch).
      batch_size: the *global* batch size; each process yields ``batch_size / process_count``
        examples of every batch (its contiguous share).
      collate: turns a list of examples into one batch pytree.
      shuffle: reshuffle each epoch with ``numpy.random.default_rng((seed, epoch))``.
      drop_last: drop the final incomplete batch (always, when it would not divide evenly).
    """

    def __init__(
        self,
        examples: Sequence[Any],
        batch_size: int,
        collate: Callable[[list[Any]], Any],
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} examples cannot fill one batch of {batch_size}")
        self.examples = examples
        self.batch_size = batch_size
        self.collate = collate
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return len(self.examples) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def _order(self) -> np.ndarray:
        order = np.arange(len(self.examples))
        if self.shuffle:
            np.random.default_rng((self.seed, self.epoch)).shuffle(order)
        return order

    def __iter__(self) -> Iterator[Any]:
        order = self._order()
        procs, rank = jax.process_count(), jax.process_index()
        if self.batch_size % procs:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by {procs} processes")
        local = self.batch_size // procs
        while self.position < len(self):
            start = self.position * self.batch_size + rank * local
            batch = self.collate([self.examples[i] for i in order[start : start + local]])
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
