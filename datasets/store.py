"""Reader for WeatherBench2-layout Zarr stores (Zarr format 2 or 3, any chunking).

Layout read: data variables with dims ``(time, latitude, longitude)`` (surface),
``(time, level, latitude, longitude)`` (atmospheric, ``level`` in hPa) and ``(latitude,
longitude)`` (static; a static variable with a leading ``time`` dim is read at its first
time). Coordinates: ``time`` (datetime64, evenly spaced), ``latitude`` (degrees north,
ascending as WB2 writes it, or descending), ``longitude`` (degrees east, any range, e.g.
[-180, 180)), ``level`` (hPa). ``lat``/``lon`` and ``pressure_level``/``isobaricInhPa`` are
accepted as dim names too.

Everything leaves the reader in Aurora's orientation: latitudes decreasing (90 -> -90),
longitudes increasing in [0, 360), levels in the order asked for, float32. Metadata (time,
coordinates, encodings) is decoded once with xarray; the field reads go straight to zarr so
many threads can read at once without xarray's per-call overhead.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr
import zarr

from aurora_loop.datasets.variables import ATMOS, KINDS, STATIC, SURF, VariableSelection
from aurora_loop.errors import UsageError
from aurora_loop.model.batch import hours_since_epoch

TIME_DIMS = ("time",)
LAT_DIMS = ("latitude", "lat")
LON_DIMS = ("longitude", "lon")
LEVEL_DIMS = ("level", "pressure_level", "isobaricInhPa", "plev")


def _find_dim(ds: xr.Dataset, names: Sequence[str]) -> str | None:
    for name in names:
        if name in ds.dims or name in ds.coords:
            return name
    return None


def open_zarr_dataset(path: str | os.PathLike) -> xr.Dataset:
    """Open ``path`` lazily with xarray (no dask), or raise a one-line :class:`UsageError`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"data store {path!r} does not exist; pass the path of a WeatherBench2-layout Zarr store (make one with `aurora-loop sample-data OUT.zarr`)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return xr.open_zarr(path, chunks=None, consolidated=None, decode_timedelta=False)
    except Exception as err:  # zarr/xarray raise many types for "not a store"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"{path!r} is not a readable Zarr store ({first}); convert NetCDF/GRIB with `aurora-loop convert SRC... OUT.zarr`") from err


@dataclasses.dataclass
class _Grid:
    """How one store's (latitude, longitude) grid maps onto Aurora's orientation."""

    lat: np.ndarray  # (h,) decreasing, float32
    lon: np.ndarray  # (w,) increasing in [0, 360), float32
    lat_dim: str
    lon_dim: str
    flip_lat: bool
    lon_order: np.ndarray | None  # permutation of the store's longitudes, None = identity

    @classmethod
    def of(cls, ds: xr.Dataset, path: str) -> _Grid:
        lat_dim, lon_dim = _find_dim(ds, LAT_DIMS), _find_dim(ds, LON_DIMS)
        if lat_dim is None or lon_dim is None:
            raise UsageError(f"{path!r} has no latitude/longitude coordinates (dims: {', '.join(map(str, ds.dims)) or 'none'}); write dims (time, [level,] latitude, longitude) as WeatherBench2 does")
        lat = np.asarray(ds[lat_dim].values, dtype=np.float64)
        lon = np.asarray(ds[lon_dim].values, dtype=np.float64)
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
            lat_dim=lat_dim,
            lon_dim=lon_dim,
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


@dataclasses.dataclass
class _Field:
    """One selected variable: where it lives and how to decode it."""

    kind: str
    aurora_name: str
    store_name: str
    array: Any  # zarr.Array
    scale: float | None
    offset: float | None
    fill: float | None

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """Raw store values -> float32 physical values (NaN where missing)."""
        out = raw.astype(np.float32, copy=False)
        if self.fill is not None and not np.isnan(self.fill):
            out = np.where(raw == self.fill, np.float32(np.nan), out)
        if self.scale is not None:
            out = out * np.float32(self.scale)
        if self.offset is not None:
            out = out + np.float32(self.offset)
        return out


def _encoding_number(enc: dict[str, Any], key: str) -> float | None:
    value = enc.get(key)
    try:
        return None if value is None else float(np.asarray(value).reshape(-1)[0])
    except (TypeError, ValueError):
        return None


class WeatherStore:
    """A WeatherBench2-layout Zarr store opened for reading Aurora fields.

    Args:
      path: the Zarr store (directory) with time-varying fields (and maybe static ones).
      selection: which Aurora variables and levels to read.
      static_path: another store to take static fields from (tried first; the main store is
        the fallback). Its grid must match the main store's after orientation.

    Attributes:
      times: (n,) datetime64[ns], evenly spaced.
      time_step: the spacing, numpy timedelta64.
      hours: (n,) float64 hours since 1970-01-01 UTC.
      lat: (h,) float32 decreasing; lon: (w,) float32 increasing in [0, 360).
      levels: tuple of hPa levels of atmospheric fields, in the model's order.
      static: dict Aurora name -> (h, w) float32 array (read once, here).
    """

    def __init__(self, path: str | os.PathLike, selection: VariableSelection, static_path: str | os.PathLike | None = None) -> None:
        self.path = os.fspath(path)
        self.selection = selection
        ds = open_zarr_dataset(self.path)
        self._ds = ds
        self._grid = _Grid.of(ds, self.path)
        self.lat, self.lon = self._grid.lat, self._grid.lon
        self._read_times(ds)
        self._group = zarr.open_group(self.path, mode="r")
        self.fields: dict[str, dict[str, _Field]] = {SURF: {}, ATMOS: {}}
        for kind in (SURF, ATMOS):
            for name in selection.names(kind):
                self.fields[kind][name] = self._resolve(ds, self._group, kind, name, self.path)
        self._read_levels(ds)
        self.static = self._read_static(static_path)

    # -- metadata -------------------------------------------------------------------------

    def _read_times(self, ds: xr.Dataset) -> None:
        if "time" not in ds.coords:
            raise UsageError(f"{self.path!r} has no 'time' coordinate; write dims (time, [level,] latitude, longitude) as WeatherBench2 does")
        times = np.asarray(ds["time"].values)
        if not np.issubdtype(times.dtype, np.datetime64):
            raise UsageError(f"the 'time' coordinate of {self.path!r} is not datetimes (dtype {times.dtype}); give it CF units such as 'hours since 1970-01-01'")
        times = times.astype("datetime64[ns]")
        if times.size < 2:
            raise UsageError(f"{self.path!r} holds {times.size} time step(s); a sample needs at least history + rollout_steps times")
        steps = np.diff(times)
        if np.any(steps <= np.timedelta64(0, "ns")):
            i = int(np.argmax(steps <= np.timedelta64(0, "ns")))
            raise UsageError(f"times in {self.path!r} are not strictly increasing ({times[i]} then {times[i + 1]}); sort the store by time and drop duplicates")
        if np.any(steps != steps[0]):
            i = int(np.argmax(steps != steps[0]))
            raise UsageError(
                f"uneven time spacing in {self.path!r}: {_hours(steps[0])} h steps, but {times[i]} -> {times[i + 1]} is {_hours(steps[i])} h; "
                "fill the gap or split the store so every step is the same"
            )
        self.times = times
        self.time_step = steps[0]
        self.hours = hours_since_epoch(times)

    def _read_levels(self, ds: xr.Dataset) -> None:
        self.levels: tuple[int, ...] = ()
        self._level_index: np.ndarray | None = None
        if not self.fields[ATMOS]:
            return
        level_dim = _find_dim(ds, LEVEL_DIMS)
        store_levels = [int(round(float(v))) for v in np.asarray(ds[level_dim].values).reshape(-1)]
        wanted = tuple(int(v) for v in self.selection.levels) or tuple(store_levels)
        missing = [lv for lv in wanted if lv not in store_levels]
        if missing:
            raise UsageError(f"pressure level(s) {missing} hPa are not in {self.path!r} (it has {store_levels}); choose --levels from those")
        self.levels = wanted
        index = np.asarray([store_levels.index(lv) for lv in wanted])
        self._level_index = None if np.array_equal(index, np.arange(len(store_levels))) else index

    def _resolve(self, ds: xr.Dataset, group: Any, kind: str, name: str, path: str) -> _Field:
        """Find the store variable that serves Aurora variable ``name`` of ``kind``."""
        found = self._find(ds, kind, name)
        if found is None:
            looked = ", ".join(self.selection.candidates(kind, name))
            have = ", ".join(sorted(map(str, ds.data_vars))) or "none"
            flag = {SURF: "--surf_vars", STATIC: "--static_vars", ATMOS: "--atmos_vars"}[kind]
            raise UsageError(
                f"{kind} variable {name!r} is not in {path!r} (looked for {looked}; the store has: {have}); "
                f"map a store variable to it with variable_map or leave it out of {flag}"
            )
        store_name = found
        var = ds[store_name]
        if not (np.issubdtype(var.dtype, np.floating) or "scale_factor" in var.encoding):
            raise UsageError(f"variable {store_name!r} in {path!r} has dtype {var.dtype}; store float32 or float64 (or packed ints with scale_factor)")
        enc = var.encoding
        return _Field(
            kind=kind,
            aurora_name=name,
            store_name=store_name,
            array=group[store_name],
            scale=_encoding_number(enc, "scale_factor"),
            offset=_encoding_number(enc, "add_offset"),
            fill=_encoding_number(enc, "_FillValue"),
        )

    def _find(self, ds: xr.Dataset, kind: str, name: str) -> str | None:
        """First candidate store variable present; raises if it has the wrong dims."""
        lat_dim, lon_dim = _find_dim(ds, LAT_DIMS), _find_dim(ds, LON_DIMS)
        level_dim = _find_dim(ds, LEVEL_DIMS)
        expected = {
            SURF: [("time", lat_dim, lon_dim)],
            ATMOS: [("time", level_dim, lat_dim, lon_dim)],
            STATIC: [(lat_dim, lon_dim), ("time", lat_dim, lon_dim)],
        }[kind]
        for candidate in self.selection.candidates(kind, name):
            if candidate not in ds.data_vars:
                continue
            dims = tuple(map(str, ds[candidate].dims))
            if dims in expected:
                return candidate
            if kind == ATMOS or candidate != name:  # a WB2 name: its dims must be right
                raise UsageError(
                    f"variable {candidate!r} ({kind} {name!r}) has dims {dims}, expected {' or '.join(map(str, expected))}; "
                    "rewrite it in the WeatherBench2 layout (aurora-loop convert does)"
                )
        return None

    def _read_static(self, static_path: str | os.PathLike | None) -> dict[str, np.ndarray]:
        names = self.selection.names(STATIC)
        if not names:
            return {}
        sources: list[tuple[str, xr.Dataset, _Grid]] = []
        if static_path is not None:
            spath = os.fspath(static_path)
            sds = open_zarr_dataset(spath)
            sgrid = _Grid.of(sds, spath)
            if sgrid.lat.shape != self.lat.shape or sgrid.lon.shape != self.lon.shape or not (
                np.allclose(sgrid.lat, self.lat, atol=1e-3) and np.allclose(sgrid.lon, self.lon, atol=1e-3)
            ):
                raise UsageError(f"the static store {spath!r} is on a {sgrid.lat.size}x{sgrid.lon.size} grid unlike the data store's {self.lat.size}x{self.lon.size} grid; regrid it to the same latitudes/longitudes")
            sources.append((spath, sds, sgrid))
        sources.append((self.path, self._ds, self._grid))
        out: dict[str, np.ndarray] = {}
        for name in names:
            for spath, sds, sgrid in sources:
                store_name = self._find(sds, STATIC, name)
                if store_name is None:
                    continue
                field = self._resolve(sds, zarr.open_group(spath, mode="r"), STATIC, name, spath)
                raw = field.array[0] if field.array.ndim == 3 else field.array[...]
                out[name] = np.ascontiguousarray(sgrid.orient(field.decode(np.asarray(raw))))
                break
            else:
                where = " or ".join(repr(p) for p, _, _ in sources)
                looked = ", ".join(self.selection.candidates(STATIC, name))
                raise UsageError(
                    f"static variable {name!r} is in neither {where} (looked for {looked}); "
                    "pass a store that has it with --static_path, map one with variable_map, or leave it out of --static_vars"
                )
        return out

    # -- reads ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.times.size)

    @property
    def shape(self) -> tuple[int, int]:
        """(h, w) of the grid."""
        return int(self.lat.size), int(self.lon.size)

    def read(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Fields at time indices ``start:stop`` in Aurora orientation, float32.

        Returns ``(surf, atmos)``: ``surf[name]`` (t, h, w), ``atmos[name]`` (t, c, h, w),
        t = stop - start, c = len(levels).
        """
        surf = {name: self._read_field(f, start, stop, atmos=False) for name, f in self.fields[SURF].items()}
        atmos = {name: self._read_field(f, start, stop, atmos=True) for name, f in self.fields[ATMOS].items()}
        return surf, atmos

    def _read_field(self, field: _Field, start: int, stop: int, atmos: bool) -> np.ndarray:
        if atmos and self._level_index is not None:
            order = np.argsort(self._level_index)
            raw = field.array.get_orthogonal_selection((slice(start, stop), self._level_index[order], slice(None), slice(None)))
            raw = np.take(raw, np.argsort(order), axis=1)
        else:
            raw = field.array[start:stop]
        return np.ascontiguousarray(self._grid.orient(field.decode(np.asarray(raw))))


def _hours(step: np.timedelta64) -> float:
    return float(step / np.timedelta64(1, "s")) / 3600.0


__all__ = ["WeatherStore", "open_zarr_dataset", "KINDS"]
