"""Small in-memory weather samples for tests: advected waves on a coarse global grid."""

from __future__ import annotations

import datetime as dt

import numpy as np

from aurora_loop.model.batch import Batch, Metadata, Sample

SURF = {"2t": (280.0, 15.0), "msl": (101000.0, 800.0)}
ATMOS = {"z": (50000.0, 3000.0), "t": (250.0, 10.0)}


def make_samples(n: int, grid=(8, 16), levels=(500, 850), rollout_steps: int = 1, history: int = 2, seed: int = 0):
    """``n`` single-example Samples cut from one evolving sequence of 6-hourly states."""
    h, w = grid
    lat = np.linspace(90, -90, h)
    lon = np.arange(w) * 360.0 / w
    rng = np.random.default_rng(seed)
    steps = n + history + rollout_steps
    phase = rng.uniform(0, 2 * np.pi, size=8)
    times = [dt.datetime(2020, 1, 1) + dt.timedelta(hours=6 * i) for i in range(steps)]

    def field(mean, spread, k, level_shift=0.0):
        out = []
        for i in range(steps):
            x = np.deg2rad(lon)[None, :] - 0.3 * i
            y = np.deg2rad(lat)[:, None]
            out.append(mean + spread * (np.sin(2 * x + phase[k] + level_shift) * np.cos(y) + 0.3 * np.cos(3 * x - phase[k + 1]) * np.cos(y) ** 2))
        return np.asarray(out, np.float32)

    surf = {name: field(m, s, i) for i, (name, (m, s)) in enumerate(SURF.items())}
    atmos = {name: np.stack([field(m, s, i + 2, 0.2 * j) for j, _ in enumerate(levels)], axis=1) for i, (name, (m, s)) in enumerate(ATMOS.items())}
    static = {"lsm": (rng.uniform(size=grid) > 0.6).astype(np.float32), "z": rng.normal(size=grid).astype(np.float32) * 1000}

    def batch(start, stop, time_index):
        return Batch(
            surf_vars={k: v[None, start:stop] for k, v in surf.items()},
            static_vars=static,
            atmos_vars={k: v[None, start:stop] for k, v in atmos.items()},
            metadata=Metadata(lat=lat, lon=lon, time=(times[time_index],), atmos_levels=tuple(levels)),
        )

    return [
        Sample(batch(i, i + history, i + history - 1), batch(i + history, i + history + rollout_steps, i + history))
        for i in range(n)
    ]
