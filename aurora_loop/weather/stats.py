"""Normalisation statistics of a WeatherBench2-layout store (``aurora-loop stats``).

Aurora sees every variable as ``(x - location) / scale``. Its built-in table
(:mod:`aurora_loop.model.normalisation`) covers the standard variables on the 13 standard
levels; a new variable (``tp``, say) or level needs its own numbers. :func:`compute` gives
them in the reference's convention (``aurora/normalisation.py``): two dicts ``locations``
and ``scales`` keyed by the surface/static name (``"2t"``, ``"lsm"``) and by
``f"{name}_{level_to_str(level)}"`` per pressure level for atmospheric variables
(``"z_500"``). The location is the mean and the scale the (population) standard deviation of
the raw field over the selected times, the ensemble members and every grid point; NaNs
(missing values) are left out.

The fields are read ``chunk_times`` time steps at a time, one variable at a time, so memory
stays bounded by one variable's chunk. Each chunk's float64 sum and sum of squared deviations
from its own mean are merged into the running totals with Chan et al.'s parallel formula,
which is exact up to float64 rounding whatever the chunking.

:func:`fill_model_stats` is the other half: ``aurora-train --stats FILE`` puts the file's
numbers into an :class:`~aurora_loop.model.config.AuroraConfig` for the variables (and
levels) the built-in table lacks, and names any variable left without statistics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import numpy as np

from aurora_loop.errors import UsageError
from aurora_loop.model.normalisation import ATMOS_STATS, has_atmos_stats, has_surface_stats, level_key, stats_key
from aurora_loop.progress import Progress

HOW_TO = "compute them with aurora-loop stats STORE --out stats.json and pass --stats stats.json"


@dataclasses.dataclass
class Moments:
    """Running count, mean and sum of squared deviations (M2) per channel, float64.

    ``add`` takes a block ``(t, c, h, w)`` (or ``(t, h, w)`` for one channel); ``merge``
    combines two accumulators with Chan et al.'s formula.
    """

    count: np.ndarray  # (c,) int64
    mean: np.ndarray  # (c,) float64
    m2: np.ndarray  # (c,) float64

    @classmethod
    def zeros(cls, channels: int) -> Moments:
        return cls(np.zeros(channels, np.int64), np.zeros(channels, np.float64), np.zeros(channels, np.float64))

    @classmethod
    def of(cls, block: np.ndarray) -> Moments:
        """The moments of one block: channels on axis 1 of ``(t, c, h, w)`` (no axis 1: one channel)."""
        x = np.asarray(block, dtype=np.float64)
        x = x[:, None] if x.ndim == 3 else x
        x = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)  # (c, n)
        finite = np.isfinite(x)
        if finite.all():
            count = np.full(x.shape[0], x.shape[1], np.int64)
            mean = x.sum(axis=1) / np.maximum(count, 1)
            m2 = np.square(x - mean[:, None]).sum(axis=1)
        else:
            count = finite.sum(axis=1).astype(np.int64)
            mean = np.where(finite, x, 0.0).sum(axis=1) / np.maximum(count, 1)
            m2 = np.where(finite, np.square(x - mean[:, None]), 0.0).sum(axis=1)
        return cls(count, mean, m2)

    def merge(self, other: Moments) -> Moments:
        n_a, n_b = self.count.astype(np.float64), other.count.astype(np.float64)
        n = n_a + n_b
        safe = np.maximum(n, 1.0)
        delta = other.mean - self.mean
        mean = self.mean + delta * (n_b / safe)
        m2 = self.m2 + other.m2 + np.square(delta) * (n_a * n_b / safe)
        return Moments(self.count + other.count, mean, m2)

    def add(self, block: np.ndarray) -> Moments:
        return self.merge(Moments.of(block))

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof 0)."""
        return np.sqrt(self.m2 / np.maximum(self.count, 1))


def _datetime(value: str | np.datetime64 | None, flag: str) -> np.datetime64 | None:
    if value is None or value == "":
        return None
    try:
        return np.datetime64(value, "ns")
    except ValueError:
        raise UsageError(f"{flag} {value!r} is not an ISO date/time; write it like 2020-01-31 or 2020-01-31T18:00") from None


def time_range(times: np.ndarray, start: str | None, end: str | None, path: str) -> tuple[int, int]:
    """``[first, stop)`` indices of the times within ``[start, end]`` (inclusive), or UsageError."""
    lo, hi = _datetime(start, "--train_start"), _datetime(end, "--train_end")
    keep = np.ones(times.size, dtype=bool)
    if lo is not None:
        keep &= times >= lo
    if hi is not None:
        keep &= times <= hi
    index = np.flatnonzero(keep)
    if index.size == 0:
        span = " .. ".join(np.datetime_as_string(times[[0, -1]], unit="s")) if times.size else "no times"
        raise UsageError(f"no time of {path!r} lies in [{start or 'start'}, {end or 'end'}] (the store holds {span}); widen --train_start/--train_end")
    return int(index[0]), int(index[-1]) + 1


def open_store(path: str, selection: Any, static_path: str | None = None, storage_options: dict[str, Any] | None = None,
               cache_dir: str | None = None) -> Any:
    """The project's reader on ``path`` (a local path or a URL) with nothing cached in memory
    (the fields are streamed)."""
    from aurora_loop.datasets.storage import is_remote
    from aurora_loop.datasets.store import WeatherStore

    if not is_remote(path) and not os.path.exists(path):
        raise UsageError(f"data store {path!r} does not exist; pass the path of a WeatherBench2-layout Zarr store")
    return WeatherStore(path, selection, static_path=static_path, cache_mb=0, storage_options=storage_options, cache_dir=cache_dir)


def compute(
    path: str,
    selection: Any,
    start: str | None = None,
    end: str | None = None,
    chunk_times: int = 8,
    static_path: str | None = None,
    progress: bool = False,
    stream: TextIO | None = None,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Mean and standard deviation of every selected variable of the store at ``path``.

    Args:
      path: a WeatherBench2-layout Zarr store.
      selection: a :class:`~aurora_loop.datasets.variables.VariableSelection` (Aurora names;
        its ``variable_map`` maps store names, its ``levels`` pick levels, ``()`` = all).
      start, end: ISO times bounding the times used (inclusive; None = open).
      chunk_times: time steps read at once per variable (memory: one variable's chunk).
      static_path: a separate store for the static fields (tried first).
      progress: print a progress bar on ``stream`` (stderr).
      storage_options, cache_dir: for a store in object storage (see
        :mod:`aurora_loop.datasets.storage`).

    Returns:
      ``{"locations": {key: float}, "scales": {key: float}, "source": {...}}``, keys as the
      reference's (``"2t"``, ``"lsm"``, ``"z_500"``); ``source`` records the store, the
      times used (count, first, last), the levels and the grid points per field.
    """
    from aurora_loop.datasets.variables import ATMOS, STATIC, SURF

    if int(chunk_times) < 1:
        raise UsageError(f"--chunk_times must be at least 1, got {chunk_times}")
    chunk_times = int(chunk_times)
    if not any(selection.names(kind) for kind in (SURF, STATIC, ATMOS)):
        raise UsageError("no variables selected; name some with --surf_vars, --static_vars or --atmos_vars")
    store = open_store(path, selection, static_path, storage_options, cache_dir)
    first, stop = time_range(store.times, start, end, path)
    h, w = store.shape
    levels = tuple(store.levels)
    surf_names, atmos_names = list(store.fields[SURF]), list(store.fields[ATMOS])
    moments = {("surf", n): Moments.zeros(1) for n in surf_names}
    moments.update({("atmos", n): Moments.zeros(len(levels)) for n in atmos_names})
    bar = Progress(stop - first, "stats", unit="times", stream=stream, every_tenth=True) if progress and moments else None
    surf_buf = np.empty((chunk_times, h, w), np.float32)
    atmos_buf = np.empty((chunk_times, len(levels), h, w), np.float32) if atmos_names else None
    for t0 in range(first, stop, chunk_times):
        n = min(chunk_times, stop - t0)
        for member in range(store.members):
            for name in surf_names:
                out = surf_buf[:n]
                store.read_into({name: out}, {}, t0, member)
                moments["surf", name] = moments["surf", name].add(out)
            for name in atmos_names:
                out = atmos_buf[:n]
                store.read_into({}, {name: out}, t0, member)
                moments["atmos", name] = moments["atmos", name].add(out)
        if bar is not None:
            bar.update(t0 + n - first)
    static = {name: Moments.of(field[None]) for name, field in store.static.items()}  # one pass, no time axis

    locations: dict[str, float] = {}
    scales: dict[str, float] = {}
    counts: dict[str, int] = {}

    def put(key: str, m: Moments, i: int, what: str) -> None:
        if key in locations:
            raise UsageError(f"two selected variables give the statistics key {key!r}; select only one of them")
        if m.count[i] == 0:
            raise UsageError(f"{what} is missing (NaN) everywhere in the selected times of {path!r}; fill it or leave it out")
        locations[key], scales[key], counts[key] = float(m.mean[i]), float(m.std[i]), int(m.count[i])

    for name in surf_names:
        put(name, moments["surf", name], 0, f"surface variable {name!r}")
    for name, m in static.items():
        put(name, m, 0, f"static variable {name!r}")
    for name in atmos_names:
        for i, level in enumerate(levels):
            put(stats_key(name, level), moments["atmos", name], i, f"atmospheric variable {name!r} at {level} hPa")
    expected = {key: ((h * w) if key in static else (stop - first) * store.members * h * w) for key in counts}
    missing = {key: expected[key] - c for key, c in counts.items() if c != expected[key]}
    source: dict[str, Any] = {
        "store": os.path.abspath(path),
        "static_store": os.path.abspath(static_path) if static_path else None,
        "times": stop - first,
        "first_time": str(np.datetime_as_string(store.times[first], unit="s")),
        "last_time": str(np.datetime_as_string(store.times[stop - 1], unit="s")),
        "grid_points": h * w,
        "grid": [h, w],
        "members": int(store.members),
        "levels": [level_key(v) for v in levels],
        "statistic": "location = mean, scale = population standard deviation over times, members and grid points",
    }
    if missing:
        source["missing_values"] = missing
    return {"locations": locations, "scales": scales, "source": source}


def write_json(stats: Mapping[str, Any], out: str, overwrite: bool = False) -> None:
    """Write ``stats`` to ``out`` atomically (a temp file in the same folder, then rename)."""
    if os.path.exists(out) and not overwrite:
        raise UsageError(f"{out} exists; choose another --out or pass --overwrite")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UsageError(f"the folder of --out {out} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=".stats-", suffix=".json.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(stats, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --- the training side: aurora-train --stats FILE ------------------------------------------------

def read_stats_file(path: str) -> dict[str, tuple[float, float]]:
    """``key -> (location, scale)`` from a file written by ``aurora-loop stats`` (or any JSON
    with the reference's ``locations`` / ``scales`` dicts), or a one-line UsageError."""
    fix = "write one with aurora-loop stats STORE --out stats.json"
    if not os.path.isfile(path):
        raise UsageError(f"--stats {path} does not exist; {fix}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as err:
        raise UsageError(f"--stats {path} is not readable JSON ({str(err).splitlines()[0] if str(err) else type(err).__name__}); {fix}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("locations"), Mapping) or not isinstance(data.get("scales"), Mapping):
        raise UsageError(f"--stats {path} holds no 'locations' and 'scales' objects; {fix}")
    locations, scales = data["locations"], data["scales"]
    out: dict[str, tuple[float, float]] = {}
    for key in locations:
        if key not in scales:
            raise UsageError(f"--stats {path}: {key!r} has a location but no scale; {fix}")
        try:
            loc, scale = float(locations[key]), float(scales[key])
        except (TypeError, ValueError):
            raise UsageError(f"--stats {path}: the statistics of {key!r} are not numbers") from None
        if not (math.isfinite(loc) and math.isfinite(scale) and scale > 0):
            raise UsageError(f"--stats {path}: {key!r} has location {loc} and scale {scale}; a scale must be positive and both finite")
        out[str(key)] = (loc, scale)
    extra = sorted(set(scales) - set(locations))
    if extra:
        raise UsageError(f"--stats {path}: {extra[0]!r} has a scale but no location; {fix}")
    return out


def _file_levels(table: Mapping[str, Any], name: str) -> list[str]:
    """Keys of ``table`` that are ``name`` at some level (``name_500``, ``name_2_5``)."""
    pattern = re.compile(re.escape(name) + r"_\d+(_\d+)?")
    return sorted(k for k in table if pattern.fullmatch(k))


def fill_model_stats(model: Any, stats_path: str | None = None, levels: Sequence[float] | None = None) -> Any:
    """``model`` (an AuroraConfig) with the statistics it lacks taken from ``stats_path``.

    A surface/static variable without built-in statistics (and without a ``surf_stats``
    override) takes its ``(location, scale)`` from the file; so does an atmospheric variable
    at each of ``levels`` (hPa; None = not known yet: every level the file has for it) that
    the built-in table and ``atmos_stats`` lack. Built-in statistics are never replaced.
    Raises one UsageError naming every variable (and level) left without statistics.
    """
    table = read_stats_file(stats_path) if stats_path else {}
    surf_over, atmos_over = dict(model.surf_stats), dict(model.atmos_stats)
    surf_add: dict[str, tuple[float, float]] = {}
    atmos_add: dict[str, tuple[float, float]] = {}
    missing: list[str] = []
    for kind, names in (("surface", model.surf_vars), ("static", model.static_vars)):
        for name in names:
            if has_surface_stats(name) or name in surf_over or name in surf_add:
                continue
            if name in table:
                surf_add[name] = table[name]
            else:
                missing.append(f"{kind} variable {name!r}")
    for name in model.atmos_vars:
        if levels:
            lacking = []
            for level in levels:
                key = stats_key(name, level)
                if has_atmos_stats(name, level) or key in atmos_over:
                    continue
                if key in table:
                    atmos_add[key] = table[key]
                else:
                    lacking.append(level_key(level))
            if lacking:
                missing.append(f"atmospheric variable {name!r} at {', '.join(map(str, lacking))} hPa")
        else:  # levels not known yet: every level the file has that the built-in table lacks
            builtin = name in ATMOS_STATS
            in_file = _file_levels(table, name)
            atmos_add.update({k: table[k] for k in in_file if k not in atmos_over and not (builtin and _builtin_key(name, k))})
            if not (builtin or in_file or _file_levels(atmos_over, name)):
                missing.append(f"atmospheric variable {name!r}")
    if missing:
        where = f" (--stats {stats_path} has none for {'it' if len(missing) == 1 else 'them'})" if stats_path else ""
        raise UsageError(f"no normalisation statistics for {', '.join(missing)}; {HOW_TO}{where}")
    if not surf_add and not atmos_add:
        return model
    return model.replace(surf_stats={**surf_over, **surf_add}, atmos_stats={**atmos_over, **atmos_add})


def _builtin_key(name: str, key: str) -> bool:
    """Whether ``key`` (``name_<level>``) is a level the built-in table has for ``name``."""
    text = key[len(name) + 1:].replace("_", ".")
    try:
        return has_atmos_stats(name, float(text))
    except ValueError:
        return False


def store_levels(path: str | None, storage_options: dict[str, Any] | None = None) -> tuple[int, ...] | None:
    """The pressure levels of the store at ``path`` (None when it cannot tell: no path, a
    TFDS source, no level dim, unreadable); read from metadata only."""
    from aurora_loop.datasets.storage import is_remote

    if not path or str(path).startswith("tfds:") or not (is_remote(path) or os.path.exists(str(path))):
        return None
    try:
        from aurora_loop.datasets.layout import LEVEL_DIMS, find_dim
        from aurora_loop.datasets.store import open_zarr_dataset

        ds = open_zarr_dataset(str(path), storage_options)
        dim = find_dim(ds, LEVEL_DIMS)
        if dim is None:
            return None
        return tuple(int(round(float(v))) for v in np.asarray(ds[dim].values))
    except Exception:  # the loader reports a bad store in its own words
        return None
