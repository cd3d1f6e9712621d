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
    """How one store's (latitude, longitude) grid maps onto Aurora's orientation."""

    lat: np.ndarray  # (h,) decreasing, float32
    lon: np.ndarray  # (w,) increasing in [0, 360), float32
    flip_lat: bool
    lon_order: np.ndarray | None  # permutation of the store's longitudes, None = identity

    @classmethod
    def of(cls, ds: xr.Dataset, path: str) -> Grid:
        lat_dim, lon_dim = find_dim(ds, LAT_DIMS), find_dim(ds, LON_DIMS)
        if lat_dim is None or lon_dim is None:
            raise UsageError(f"{path!r} has no latitude/longitude coordinates (dims: {', '.join(map(str, ds.dims)) or 'none'}); write dims (time, [level,] latitude, longitude) as WeatherBench2 does")
        return cls.from_coords(ds[lat_dim].values, ds[lon_dim].values, path)

    @classmethod
    def from_coords(cls, lat: np.ndarray, lon: np.ndarray, path: str) -> Grid:
        """From the source's latitude and longitude values (degrees), in the source's order."""
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
        )

    def orient(self, x: np.ndarray) -> np.ndarray:
        """(..., h, w) in store order -> Aurora order (lat decreasing, lon in [0, 360))."""
        if self.flip_lat:
            x = x[..., ::-1, :]
        if self.lon_order is not None:
            x = np.take(x, self.lon_order, axis=-1)
        return x


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
