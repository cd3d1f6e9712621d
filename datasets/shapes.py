"""Batches that are only shapes: for compiling a step on a grid no store holds.

``aurora-train --estimate_memory --estimate_grid 721x1440`` compiles the configured train
step for a grid the machine has no data for. It needs one example batch with the shapes
(and the grid coordinates) a :class:`~aurora_loop.datasets.loader.ZarrLoader` would yield;
the values never matter. The fields here are ``np.broadcast_to`` views of one zero, so a
0.25° batch of any size costs no memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from aurora_loop.model.batch import Batch, Metadata, Sample

#: WeatherBench2's 13 pressure levels (hPa): the levels when ``--levels`` is empty.
WB2_LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)
_START_HOURS = 438_300.0  # 2020-01-01T12 in hours since 1970: any time works


def _zeros(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    return np.broadcast_to(np.zeros((), dtype), shape)


def shape_only_sample(config: Any, grid: tuple[int, int], batch_size: int) -> Sample:
    """A :class:`Sample` of ``batch_size`` examples on an H x W global grid (latitudes 90
    to -90, longitudes from 0 east) with ``config``'s variables, levels (WeatherBench2's 13
    when it names none), ``history`` input steps and ``rollout_steps`` targets; every field
    is zeros that take no memory. With ``lead_times``, ``lead_hours`` (b,) holds the
    largest."""
    h, w = grid
    levels = tuple(config.levels) or WB2_LEVELS
    step = float(config.timestep_hours or (max(config.lead_times) if config.lead_times else 6.0))
    lat = np.linspace(90.0, -90.0, h)
    lon = np.arange(w) * (360.0 / w)

    def batch(t: int, time: float) -> Batch:
        return Batch(
            surf_vars={k: _zeros((batch_size, t, h, w)) for k in config.surf_vars},
            static_vars={k: _zeros((h, w)) for k in config.static_vars},
            atmos_vars={k: _zeros((batch_size, t, len(levels), h, w)) for k in config.atmos_vars},
            metadata=Metadata(lat=lat, lon=lon, time=np.full((batch_size,), time), atmos_levels=levels),
        )

    lead = np.full((batch_size,), max(config.lead_times), np.float32) if config.lead_times else None
    return Sample(batch(int(config.history), _START_HOURS), batch(int(config.rollout_steps), _START_HOURS + step), lead)


class ShapeOnlyLoader:
    """A loader (``aurora_loop.data.Loader``) whose only batch is ``sample``: enough for
    :meth:`aurora_loop.trainer.Trainer.abstract_train_step`, which reads the example batch
    and nothing else."""

    def __init__(self, sample: Sample) -> None:
        self.sample = sample

    def __len__(self) -> int:
        return 1

    def set_epoch(self, epoch: int) -> None:
        del epoch

    def example_batch(self) -> Sample:
        return self.sample

    def __iter__(self) -> Iterator[Sample]:
        yield self.sample
