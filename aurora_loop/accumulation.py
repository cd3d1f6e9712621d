"""Micro-batches for gradient accumulation: N batches of one optimizer step, stacked.

A batch's per-example leaves (split over the ``data`` axis) are stacked on a new leading
axis, (n, b, ...); leaves every example shares (grids, static fields: replicated) are kept
once, since stacking them would break the batch's own shape checks and copy them n times.
The train step scans over the stacked leaves and rebuilds micro-batch ``i`` with
:meth:`MicroBatches.micro_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


@jax.tree_util.register_pytree_node_class
class MicroBatches:
    """``leaves``: the leaves of one batch's pytree (``treedef``), each stacked over the
    micro-batches where ``stacked[i]`` (shape (n, ...)), else as in every micro-batch."""

    def __init__(self, leaves: Sequence[Any], stacked: tuple[bool, ...], treedef: Any) -> None:
        self.leaves = tuple(leaves)
        self.stacked = stacked
        self.treedef = treedef

    def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[tuple[bool, ...], Any]]:
        return self.leaves, (self.stacked, self.treedef)

    @classmethod
    def tree_unflatten(cls, aux: tuple[tuple[bool, ...], Any], leaves: Sequence[Any]) -> MicroBatches:
        return cls(leaves, *aux)

    @property
    def stacked_leaves(self) -> tuple[Any, ...]:
        """What a scan over the micro-batches iterates over."""
        return tuple(x for x, s in zip(self.leaves, self.stacked) if s)

    def micro_batch(self, stacked_slices: Sequence[Any]) -> Any:
        """The batch of one micro-batch from its slices of :attr:`stacked_leaves`."""
        slices = iter(stacked_slices)
        return self.treedef.unflatten([next(slices) if s else x for x, s in zip(self.leaves, self.stacked)])

    def first(self) -> Any:
        """Micro-batch 0 (for shapes)."""
        return self.micro_batch([x[0] for x in self.stacked_leaves])


def _is_split(sharding: NamedSharding) -> bool:
    return any(axis is not None for axis in sharding.spec)


def stack_micro_batches(batches: Sequence[Any], shardings: Any) -> MicroBatches:
    """Process-local ``batches`` (host pytrees) as one :class:`MicroBatches`; ``shardings``:
    one batch's NamedShardings, which tell per-example leaves (split) from shared ones."""
    leaves = [jax.tree.leaves(b) for b in batches]
    split = [_is_split(s) for s in jax.tree.leaves(shardings)]
    stacked = [np.stack([np.asarray(x[i]) for x in leaves]) if s else leaves[0][i] for i, s in enumerate(split)]
    return MicroBatches(stacked, tuple(split), jax.tree.structure(batches[0]))


def micro_batch_shardings(shardings: Any, mesh: Any) -> MicroBatches:
    """The shardings of :func:`stack_micro_batches`'s output: stacked leaves split like one
    batch behind an unsplit leading axis, shared leaves as they were."""
    flat = jax.tree.leaves(shardings)
    split = tuple(_is_split(s) for s in flat)
    leaves = [NamedSharding(mesh, PartitionSpec(None, *s.spec)) if sp else s for s, sp in zip(flat, split)]
    return MicroBatches(leaves, split, jax.tree.structure(shardings))
