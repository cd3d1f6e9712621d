"""The WeatherBench2 layout: dim names, grid orientation and the checks every source shares.

Aurora's orientation: latitudes decreasing (90 -> -90), longitudes increasing in [0, 360),
levels in the order the model asks for, time steps evenly spaced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import xarray as xr

from aurora_loop.datasets.variables import ATMOS, STATIC, SURF
from aurora_loop.errors import UsageError

TIME_DIMS = ("time",)
LAT_DIMS = ("latitude", "lat")
LON_DIMS = ("longitude", "lon")
LEVEL_DIMS = ("level", "pressure_level", "isobaricInhPa", "plev")
MEMBER_DIMS = ("number", "member", "realization", "ensemble")


def find_dim(ds: xr.Dataset, names: Sequence[str]) -> str | None:
    for name in names:
        if name in ds.dims or name in ds.coords:
            return name
    return None


@dataclasses.dataclass
class Grid:
    """How one store's (latitude, longitude) grid maps onto Aurora's orientation.

    ``lat``/``lon`` are what the model sees (float32); ``lat_values``/``lon_values`` are the
    store's own coordinate values in the same order and in the store's dtype, so that what
    is written back (a forecast store) carries the store's labels bit for bit: xarray and
    WeatherBench2 align forecasts and truths on these labels, and float32 copies of a grid
    such as ``linspace(-90, 90, 32)`` no longer equal the originals.
    """

    lat: np.ndarray  # (h,) decreasing, float32
    lon: np.ndarray  # (w,) increasing in [0, 360), float32
    flip_lat: bool
    lon_order: np.ndarray | None  # permutation of the store's longitudes, None = identity
    lat_values: np.ndarray | None = None  # (h,) the store's latitudes (its dtype), decreasing
    lon_values: np.ndarray | None = None  # (w,) the store's longitudes modulo 360 (its dtype), increasing

    @classmethod
    def of(cls, ds: xr.Dataset, path: str) -> Grid:
        lat_dim, lon_dim = find_dim(ds, LAT_DIMS), find_dim(ds, LON_DIMS)
        if lat_dim is None or lon_dim is None:
            raise UsageError(f"{path!r} has no latitude/longitude coordinates (dims: {', '.join(map(str, ds.dims)) or 'none'}); write dims (time, [level,] latitude, longitude) as WeatherBench2 does")
        return cls.from_coords(ds[lat_dim].values, ds[lon_dim].values, path)

    @classmethod
    def from_coords(cls, lat: np.ndarray, lon: np.ndarray, path: str) -> Grid:
        """From the source's latitude and longitude values (degrees), in the source's order."""
        source_lat, source_lon = np.asarray(lat), np.asarray(lon)
        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
        if lat.ndim != 1 or lat.size < 2 or not (np.all(np.diff(lat) > 0) or np.all(np.diff(lat) < 0)):
            raise UsageError(f"latitude in {path!r} must be a 1-d strictly monotonic coordinate; fix the store's latitude values")
        flip = bool(lat[1] > lat[0])
        wrapped = np.mod(lon, 360.0)
        order = np.argsort(wrapped, kind="stable")
        if lon.ndim != 1 or np.any(np.diff(wrapped[order]) <= 0):
            raise UsageError(f"longitude in {path!r} must be 1-d with distinct values modulo 360; fix the store's longitude values")
        identity = bool(np.array_equal(order, np.arange(lon.size)))
        return cls(
            lat=(lat[::-1] if flip else lat).astype(np.float32),
            lon=wrapped[order].astype(np.float32),
            flip_lat=flip,
            lon_order=None if identity else order,
            lat_values=source_lat[::-1] if flip else source_lat,
            # np.mod in the store's own dtype, as xarray users (and aurora-loop evaluate) wrap a
            # [-180, 180) store; values already in [0, 360) come back unchanged
            lon_values=np.mod(source_lon, 360.0)[order],
        )

    def orient(self, x: np.ndarray) -> np.ndarray:
        """(..., h, w) in store order -> Aurora order (lat decreasing, lon in [0, 360))."""
        if self.flip_lat:
            x = x[..., ::-1, :]
        if self.lon_order is not None:
            x = np.take(x, self.lon_order, axis=-1)
        return x


def float32_rounding(values: np.ndarray) -> np.ndarray:
    """How far float32 rounding may move each coordinate value: one float32 step at the value's
    magnitude (at least 1, so values near 0 get the step of 1). (n,) degrees -> (n,) float64."""
    magnitude = np.maximum(np.abs(np.asarray(values, np.float64)), 1.0).astype(np.float32)
    return np.spacing(magnitude).astype(np.float64)


def nearest(reference: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each value of ``wanted`` (n,), the index of the nearest value of ``reference`` (m,),
    and the distance to it. ``reference`` monotonic (either way) or not: it is sorted here.
    Returns (n,) int64 indices into ``reference`` and (n,) float64 distances."""
    reference = np.asarray(reference, np.float64)
    wanted = np.asarray(wanted, np.float64)
    order = np.argsort(reference, kind="stable")
    ranked = reference[order]
    right = np.clip(np.searchsorted(ranked, wanted), 0, ranked.size - 1)
    left = np.clip(right - 1, 0, ranked.size - 1)
    pick = np.where(np.abs(ranked[left] - wanted) <= np.abs(ranked[right] - wanted), left, right)
    return order[pick], np.abs(ranked[pick] - wanted)


def level_values(store_levels: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """The store's own level coordinate values (its dtype) of ``levels`` (hPa, as
    :func:`select_levels` returns them), in that order. (c,)."""
    store_levels = np.asarray(store_levels).reshape(-1)
    have = [int(round(float(v))) for v in store_levels]
    return store_levels[[have.index(int(lv)) for lv in levels]] if levels else store_levels[:0]


ROLES = {"time": TIME_DIMS, "level": LEVEL_DIMS, "member": MEMBER_DIMS, "lat": LAT_DIMS, "lon": LON_DIMS}
#: Roles a variable of each kind must have, and roles it may have besides.
REQUIRED = {SURF: {"time", "lat", "lon"}, ATMOS: {"time", "level", "lat", "lon"}, STATIC: {"lat", "lon"}}
OPTIONAL = {SURF: {"member"}, ATMOS: {"member"}, STATIC: {"time", "member"}}
CANONICAL = ("time", "level", "lat", "lon")


def role(dim: str) -> str | None:
    """The role (time / level / member / lat / lon) a dim name plays, or None."""
    return next((role for role, names in ROLES.items() if dim in names), None)


def check_times(times: np.ndarray, path: str) -> tuple[np.ndarray, np.timedelta64]:
    """Validate a time coordinate: datetimes, at least 2, strictly increasing, evenly spaced.

    Returns ``(times as datetime64[ns], step)``; raises a one-line UsageError otherwise.
    """
    if not np.issubdtype(times.dtype, np.datetime64):
        raise UsageError(f"the 'time' coordinate of {path!r} is not datetimes (dtype {times.dtype}); give it CF units such as 'hours since 1970-01-01'")
    times = times.astype("datetime64[ns]")
    if times.size < 2:
        raise UsageError(f"{path!r} holds {times.size} time step(s); a sample needs at least history + rollout_steps times")
    steps = np.diff(times)
    if np.any(steps <= np.timedelta64(0, "ns")):
        i = int(np.argmax(steps <= np.timedelta64(0, "ns")))
        raise UsageError(f"times in {path!r} are not strictly increasing ({times[i]} then {times[i + 1]}); sort the store by time and drop duplicates")
    if np.any(steps != steps[0]):
        i = int(np.argmax(steps != steps[0]))
        raise UsageError(
            f"uneven time spacing in {path!r}: {_hours(steps[0])} h steps, but {times[i]} -> {times[i + 1]} is {_hours(steps[i])} h; "
            "fill the gap or split the store so every step is the same"
        )
    return times, steps[0]


def select_levels(store_levels: np.ndarray, wanted: Sequence[int], path: str) -> tuple[tuple[int, ...], np.ndarray | slice | None]:
    """The levels to read (``wanted``, or all when empty) and how to index the level axis:
    None (all, in store order), a slice (an ascending run) or an index array."""
    have = [int(round(float(v))) for v in np.asarray(store_levels).reshape(-1)]
    levels = tuple(int(v) for v in wanted) or tuple(have)
    missing = [lv for lv in levels if lv not in have]
    if missing:
        raise UsageError(f"pressure level(s) {missing} hPa are not in {path!r} (it has {have}); choose --levels from those")
    index = np.asarray([have.index(lv) for lv in levels])
    if np.array_equal(index, np.arange(len(have))):
        return levels, None
    if np.all(np.diff(index) == 1):  # an ascending run reads as a slice (zarr's fast path)
        return levels, slice(int(index[0]), int(index[-1]) + 1)
    return levels, index


def check_static(static: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """Refuse static fields with NaNs (the model would spread them everywhere)."""
    for name, value in static.items():
        if np.isnan(value).any():
            raise UsageError(f"static field {name!r} of {path!r} holds NaNs; fill them (e.g. 0 over the ocean) or leave {name!r} out of --static_vars")
    return static


def _hours(step: np.timedelta64) -> float:
    return float(step / np.timedelta64(1, "s")) / 3600.0
