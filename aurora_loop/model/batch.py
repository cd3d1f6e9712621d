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
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

Array = Any  # numpy or jax array

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


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
            t = t.replace(tzinfo=dt.UTC)
        out.append((t - _EPOCH).total_seconds() / 3600.0)
    return np.asarray(out, dtype=np.float64)


def datetimes_from_hours(hours: Array) -> tuple[dt.datetime, ...]:
    """Inverse of :func:`hours_since_epoch`; returns naive UTC datetimes (as the reference)."""
    values = np.asarray(jax.device_get(hours), dtype=np.float64).reshape(-1)
    return tuple(
        (_EPOCH + dt.timedelta(seconds=round(h * 3600.0))).replace(tzinfo=None) for h in values
    )


def _host_array(value: Any) -> np.ndarray | None:
    """``value`` as numpy if it is host data we can check cheaply (never a device array,
    a tracer, or a placeholder such as a PartitionSpec)."""
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.number):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return np.asarray(value, dtype=np.float64)
    return None


def _check_coordinates(lat: Any, lon: Any) -> None:
    """The reference's checks: latitudes in [-90, 90] strictly decreasing, longitudes in
    [0, 360) strictly increasing. Only host (numpy) coordinates are checked."""
    lat_np, lon_np = _host_array(lat), _host_array(lon)
    if lat_np is not None:
        if lat_np.ndim != 1:
            raise ValueError(f"latitudes must be a vector, got shape {lat_np.shape}")
        if not np.all((lat_np >= -90) & (lat_np <= 90)):
            raise ValueError("latitudes must lie in [-90, 90]")
        if not np.all(np.diff(lat_np) < 0):
            raise ValueError("latitudes must be strictly decreasing (north to south)")
    if lon_np is not None:
        if lon_np.ndim != 1:
            raise ValueError(f"longitudes must be a vector, got shape {lon_np.shape}")
        if not np.all((lon_np >= 0) & (lon_np < 360)):
            raise ValueError("longitudes must lie in [0, 360)")
        if not np.all(np.diff(lon_np) > 0):
            raise ValueError("longitudes must be strictly increasing")


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
        _check_coordinates(self.lat, self.lon)

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

    def _map_fields(self, fn: Any) -> Batch:
        return self.replace(
            surf_vars={k: fn(v) for k, v in self.surf_vars.items()},
            static_vars={k: fn(v) for k, v in self.static_vars.items()},
            atmos_vars={k: fn(v) for k, v in self.atmos_vars.items()},
        )

    def astype(self, dtype: Any) -> Batch:
        """Cast every field (not the coordinates or times) to ``dtype``."""
        return self._map_fields(lambda v: jnp.asarray(v).astype(dtype))

    def normalise(self, surf_stats: Mapping[str, tuple[float, float]] | None = None) -> Batch:
        """``(x - location) / scale`` per variable (and per level for atmospheric ones);
        ``surf_stats`` overrides statistics: surface/static ones by name, atmospheric ones by
        the reference's ``"name_level"`` keys (see ``normalisation``)."""
        return self._normalise(surf_stats, inverse=False)

    def unnormalise(self, surf_stats: Mapping[str, tuple[float, float]] | None = None) -> Batch:
        """Inverse of :meth:`normalise`."""
        return self._normalise(surf_stats, inverse=True)

    def _normalise(self, surf_stats: Mapping[str, tuple[float, float]] | None, inverse: bool) -> Batch:
        from aurora_loop.model import normalisation as norm

        levels = self.metadata.atmos_levels
        return self.replace(
            surf_vars={k: norm.normalise_surface(v, k, surf_stats, inverse) for k, v in self.surf_vars.items()},
            static_vars={k: norm.normalise_surface(v, k, surf_stats, inverse) for k, v in self.static_vars.items()},
            atmos_vars={k: norm.normalise_atmos(v, k, levels, inverse, surf_stats) for k, v in self.atmos_vars.items()},
        )

    def crop(self, patch_size: int) -> Batch:
        """Drop the last latitude row when the grid has one row more than a multiple of
        ``patch_size`` (e.g. 721 -> 720). The width must already divide by it."""
        h, w = self.spatial_shape
        if w % patch_size:
            raise ValueError(f"the grid width {w} must be a multiple of the patch size {patch_size}")
        extra = h % patch_size
        if extra == 0:
            return self
        if extra != 1:
            raise ValueError(f"the grid height {h} is {extra} rows over a multiple of {patch_size}; at most 1 can be cropped")
        cut = lambda v: v[..., :-1, :]  # noqa: E731
        return self._map_fields(cut).replace(metadata=self.metadata.replace(lat=self.metadata.lat[:-1]))

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

    ``lead_hours`` (b,) float32, optional: the lead time in hours of the *last* target
    step from the step before it, per example, for models with ``variable_lead_time``
    trained on sampled lead times (``--lead_times``); every earlier target step is one
    model step after the previous one. ``None``: every step is one model step.
    """

    inputs: Batch
    targets: Batch
    lead_hours: Array | None = None

    def partition_specs(self, axis: str | tuple[str, ...] = "data") -> Sample:
        lead = None if self.lead_hours is None else PartitionSpec(axis)
        return Sample(self.inputs.partition_specs(axis), self.targets.partition_specs(axis), lead)

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
