"""Aurora's batch: weather fields plus the metadata that places them in space and time.

Mirrors the PyTorch reference's ``aurora.Batch`` / ``aurora.Metadata`` so its users feel at
home, but as registered JAX pytrees so a batch can cross ``jax.jit`` and be sharded.

Shapes (b = batch, t = time steps, c = pressure levels, h = latitudes, w = longitudes):

- ``surf_vars[name]``:   (b, t, h, w)
- ``static_vars[name]``: (h, w)
- ``atmos_vars[name]``:  (b, t, c, h, w)
- ``metadata.lat``: (h,) degrees north, decreasing; ``metadata.lon``: (w,) degrees east in
  [0, 360), increasing; ``metadata.time``: (b,) hours since 1970-01-01 00:00 UTC of the
  newest time step of each example.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

Array = Any  # numpy or jax array

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def hours_since_epoch(times: Sequence[dt.datetime] | Any) -> np.ndarray:
    """Datetimes (naive ones read as UTC) or numpy datetime64 -> float64 hours since 1970."""
    if isinstance(times, np.ndarray) and np.issubdtype(times.dtype, np.datetime64):
        return (times.astype("datetime64[s]").astype(np.int64) / 3600.0).astype(np.float64)
    out = []
    for t in times:
        if isinstance(t, np.datetime64):
            out.append(t.astype("datetime64[s]").astype(np.int64) / 3600.0)
            continue
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.timezone.utc)
        out.append((t - _EPOCH).total_seconds() / 3600.0)
    return np.asarray(out, dtype=np.float64)


def datetimes_from_hours(hours: Array) -> tuple[dt.datetime, ...]:
    """Inverse of :func:`hours_since_epoch`; returns naive UTC datetimes (as the reference)."""
    values = np.asarray(jax.device_get(hours), dtype=np.float64).reshape(-1)
    return tuple(
        (_EPOCH + dt.timedelta(seconds=round(h * 3600.0))).replace(tzinfo=None) for h in values
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Metadata:
    """Where and when a batch lies.

    ``time`` accepts datetimes (one per example, as the reference takes them) and stores
    them as float hours since the Unix epoch so the batch stays a plain array pytree.
    ``atmos_levels`` (hPa) and ``rollout_step`` are static: they are part of the compiled
    program, not traced values.
    """

    lat: Array
    lon: Array
    time: Array
    atmos_levels: tuple[int | float, ...] = dataclasses.field(
        default=(), metadata=dict(static=True)
    )
    rollout_step: int = dataclasses.field(default=0, metadata=dict(static=True))

    def __post_init__(self) -> None:
        time = self.time
        if isinstance(time, (tuple, list)) and time and isinstance(time[0], (dt.datetime, np.datetime64)):
            object.__setattr__(self, "time", hours_since_epoch(time))
        elif isinstance(time, np.ndarray) and np.issubdtype(time.dtype, np.datetime64):
            object.__setattr__(self, "time", hours_since_epoch(time))
        object.__setattr__(self, "atmos_levels", tuple(self.atmos_levels))

    @property
    def datetimes(self) -> tuple[dt.datetime, ...]:
        """``time`` as naive UTC datetimes."""
        return datetimes_from_hours(self.time)

    def replace(self, **changes: Any) -> Metadata:
        return dataclasses.replace(self, **changes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """Weather fields (see the module docstring for shapes) and their :class:`Metadata`."""

    surf_vars: Mapping[str, Array]
    static_vars: Mapping[str, Array]
    atmos_vars: Mapping[str, Array]
    metadata: Metadata

    def replace(self, **changes: Any) -> Batch:
        return dataclasses.replace(self, **changes)

    @property
    def spatial_shape(self) -> tuple[int, int]:
        """(h, w) of the grid."""
        return int(np.shape(self.metadata.lat)[0]), int(np.shape(self.metadata.lon)[0])

    @property
    def batch_size(self) -> int:
        for field in (self.surf_vars, self.atmos_vars):
            for value in field.values():
                return int(np.shape(value)[0])
        return int(np.shape(self.metadata.time)[0])

    @property
    def num_steps(self) -> int:
        """Length of the time axis t."""
        for field in (self.surf_vars, self.atmos_vars):
            for value in field.values():
                return int(np.shape(value)[1])
        return 0

    def partition_specs(self, axis: str | tuple[str, ...] = "data") -> Batch:
        """PartitionSpecs of the same structure: split examples over ``axis``, replicate grids."""
        split, whole = PartitionSpec(axis), PartitionSpec()
        return Batch(
            surf_vars={k: split for k in self.surf_vars},
            static_vars={k: whole for k in self.static_vars},
            atmos_vars={k: split for k in self.atmos_vars},
            metadata=Metadata(
                lat=whole,
                lon=whole,
                time=split,
                atmos_levels=self.metadata.atmos_levels,
                rollout_step=self.metadata.rollout_step,
            ),
        )

    def time_slice(self, start: int, stop: int) -> Batch:
        """The time steps ``start:stop`` of every surface and atmospheric field."""
        return self.replace(
            surf_vars={k: v[:, start:stop] for k, v in self.surf_vars.items()},
            atmos_vars={k: v[:, start:stop] for k, v in self.atmos_vars.items()},
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sample:
    """One training/validation element: the history the model sees and what should follow.

    ``inputs`` has t = history steps (oldest first) and ``metadata.time`` of the newest input;
    ``targets`` has t = rollout_steps (the next steps, in order) and ``metadata.time`` of the
    first target. Both share the grid, levels and static fields.
    """

    inputs: Batch
    targets: Batch

    def partition_specs(self, axis: str | tuple[str, ...] = "data") -> Sample:
        return Sample(self.inputs.partition_specs(axis), self.targets.partition_specs(axis))

    @property
    def batch_size(self) -> int:
        return self.inputs.batch_size


def stack_samples(samples: Sequence[Sample]) -> Sample:
    """Collate single-example samples (b = 1 each) into one batch along the example axis.

    Grids, levels and static fields are taken from the first sample (they must agree).
    """

    def stack(batches: Sequence[Batch]) -> Batch:
        first = batches[0]
        return Batch(
            surf_vars={k: np.concatenate([b.surf_vars[k] for b in batches]) for k in first.surf_vars},
            static_vars=dict(first.static_vars),
            atmos_vars={k: np.concatenate([b.atmos_vars[k] for b in batches]) for k in first.atmos_vars},
            metadata=first.metadata.replace(
                time=np.concatenate([np.asarray(b.metadata.time).reshape(-1) for b in batches])
            ),
        )

    return Sample(stack([s.inputs for s in samples]), stack([s.targets for s in samples]))
