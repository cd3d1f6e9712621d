"""The WeatherBench2 forecast store: :class:`ForecastWriter` appends forecast batches to it.

The store follows WeatherBench2's forecast layout, so WB2 tools and ``xarray.open_zarr``
read it:

- dims ``time`` (the initialisation time: the newest input the model saw),
  ``prediction_timedelta`` (lead time, timedelta64; ``k * T`` for roll-out step k = 1..N,
  ``T`` the model step, :func:`aurora_loop.inference.times.model_step_hours`; with
  ``fine_lead_times`` ``(l1, .., ln = T)`` every step adds one entry per sub-step:
  ``(k - 1) * T + l_j``), ``level`` (hPa, atmospheric variables only), ``latitude``
  (degrees north, ascending -90 -> 90 as WB2 writes it), ``longitude`` (degrees east in
  [0, 360)); an ensemble (``members``) adds ``number`` (the member, 0..M-1, as WB2's and
  ERA5's ensembles name it) after ``time``;
- variables under their WB2 names (``2m_temperature``, ``geopotential``, ...), float32,
  surface ones (time, [number,] prediction_timedelta, latitude, longitude), atmospheric ones
  (time, [number,] prediction_timedelta, level, latitude, longitude); every variable the model
  predicts, Aurora 1.5's output-only ones included;
- the ``latitude``, ``longitude`` and ``level`` coordinates are the input store's own values
  in its dtype (:func:`grid_coords`, :func:`level_coords`), never float32 copies, so
  ``forecast - truth`` in xarray (WB2's evaluation) aligns every grid point;
- CF attributes: ``units``, ``long_name``, ``standard_name`` on variables and coordinates
  (:data:`aurora_loop.datasets.variables.CF_METADATA`; the store's own units win),
  ``Conventions = "CF-1.8"`` and where the forecast came from on the dataset.

One chunk per initial time (and member); Zarr format 2 with consolidated metadata (as WB2
publishes) or 3. The store is written beside its path and renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np
import xarray as xr

from aurora_loop.datasets.layout import float32_rounding, nearest
from aurora_loop.datasets.variables import ATMOS, CF_METADATA, DEFAULT_MAP, SURF
from aurora_loop.errors import UsageError

#: CF metadata of the WB2 variables: name -> (units, standard_name or "", long_name).
CF_VARIABLES: dict[str, tuple[str, str, str]] = CF_METADATA

#: The forecast store's ensemble dim (WB2's and ERA5's name; the store reader and
#: ``aurora-loop evaluate`` know it, :data:`aurora_loop.datasets.layout.MEMBER_DIMS`).
MEMBER_DIM = "number"

_WB2_NAME = {kind: {aurora: wb2 for wb2, aurora in DEFAULT_MAP[kind].items()} for kind in (SURF, ATMOS)}


def wb2_name(kind: str, aurora_name: str, store_name: str) -> str:
    """The WeatherBench2 name of Aurora variable ``aurora_name`` of ``kind`` ("surf"/"atmos");
    the store's own name when it has no standard WB2 name."""
    return _WB2_NAME.get(kind, {}).get(aurora_name, store_name)


def _positions(store_values: np.ndarray, model_values: np.ndarray) -> np.ndarray | None:
    """Index into ``store_values`` (the store's float32 coordinates) of each of
    ``model_values`` (n,), or None when one of them is not a store value (a task that
    predicts on its own grid)."""
    if np.size(store_values) == 0 or np.size(model_values) == 0:
        return None
    index, distance = nearest(store_values, model_values)
    return index if np.all(distance <= float32_rounding(model_values)) else None


def grid_coords(store: Any, lat: Any, lon: Any) -> tuple[np.ndarray, np.ndarray]:
    """The forecast store's ``latitude`` (h,) ascending and ``longitude`` (w,) coordinates for
    a prediction on ``lat`` (h,) decreasing and ``lon`` (w,) (Aurora's orientation, float32
    after the model; a model may have cropped a row).

    Where the prediction's grid is the store's (or part of it) these are the store's own
    values in its dtype (``store.grid.lat_values`` / ``lon_values``), not the float32 copies,
    so they equal the truth's labels bit for bit; otherwise (a task's own grid, or a source
    without ``grid``) the prediction's values as float64.
    """
    lat, lon = np.asarray(lat), np.asarray(lon)
    grid = getattr(store, "grid", None)
    if grid is not None and grid.lat_values is not None and grid.lon_values is not None:
        rows, cols = _positions(grid.lat, lat), _positions(grid.lon, lon)
        if rows is not None and cols is not None:
            return grid.lat_values[rows][::-1], grid.lon_values[cols]  # WB2: latitudes ascending
    return lat.astype(np.float64)[::-1], lon.astype(np.float64)


def level_coords(store: Any) -> np.ndarray:
    """The forecast store's ``level`` coordinate (c,): the store's own level values of
    ``store.levels`` (its dtype, e.g. int64 hPa as WB2 writes them), else ``store.levels``
    as int64."""
    values = getattr(store, "level_values", None)
    if values is not None and len(values) == len(store.levels):
        return np.asarray(values)
    return np.asarray(store.levels, np.int64)


class ForecastWriter:
    """Appends forecast batches to a WB2-layout Zarr store written beside ``path`` and renamed
    into place by :meth:`close` (a failed run leaves nothing at ``path``).

    Args:
      path: the store to write (must not exist unless ``overwrite``).
      store: the WeatherStore the inputs came from (grid, levels, variable names and units).
      leads: (N,) timedelta64 lead times.
      attrs: global attributes to add.
      zarr_format: 2 (consolidated metadata, as WB2 publishes) or 3.
      members: the ensemble size M: the fields then have a ``number`` dim after ``time``
        (None: no member dim).
    """

    def __init__(
        self,
        path: str,
        store: Any,
        leads: np.ndarray,
        attrs: dict[str, Any],
        zarr_format: int = 2,
        overwrite: bool = False,
        members: int | None = None,
    ) -> None:
        self.path = os.path.abspath(path)
        if os.path.exists(self.path) and not overwrite:
            raise UsageError(f"--out {path} already exists; choose a new path or pass --overwrite")
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise UsageError(f"the folder of --out {path} does not exist; create {parent} first")
        self.partial = f"{self.path}.partial-{os.getpid()}"
        shutil.rmtree(self.partial, ignore_errors=True)
        self.store, self.leads, self.attrs, self.zarr_format, self.members = store, leads, attrs, zarr_format, members
        self._written = 0
        self.names = {
            kind: {name: wb2_name(kind, name, field.store_name) for name, field in store.fields[kind].items()}
            for kind in (SURF, ATMOS)
        }

    def _name(self, kind: str, name: str) -> str:
        """The WB2 name of a predicted field (one the store lacks: its standard WB2 name)."""
        return self.names[kind].get(name) or wb2_name(kind, name, name)

    def _units(self, kind: str, name: str) -> str | None:
        field = self.store.fields[kind].get(name)
        ds = getattr(getattr(self.store, "_source", None), "ds", None)  # the store's xarray view, if it keeps one
        units = (
            ds[field.store_name].attrs.get("units") if field is not None and ds is not None and field.store_name in ds else None
        )
        wb2 = self._name(kind, name)
        return units or (CF_METADATA[wb2][0] if wb2 in CF_METADATA else None)

    def _attrs(self, kind: str, name: str) -> dict[str, Any]:
        """CF attributes of a field: units (the store's, else CF_METADATA's), standard_name
        (when CF has one), long_name, and the store's and Aurora's names."""
        wb2 = self._name(kind, name)
        attrs: dict[str, Any] = {}
        units = self._units(kind, name)
        if units:
            attrs["units"] = units
        if wb2 in CF_METADATA:
            _, standard_name, long_name = CF_METADATA[wb2]
            if standard_name:
                attrs["standard_name"] = standard_name
            if long_name:
                attrs["long_name"] = long_name
        field = self.store.fields[kind].get(name)
        if field is not None:
            attrs["source_name"] = field.store_name
        attrs["aurora_name"] = name
        return attrs

    def dataset(self, init_times: np.ndarray, prediction: Any) -> xr.Dataset:
        """One batch as an xarray Dataset. ``prediction``: a Batch with surf (b, [M,] N, h, w)
        and atmos (b, [M,] N, c, h, w) in Aurora orientation (M: with ``members``);
        ``init_times``: (b,) datetime64."""
        lat, lon = grid_coords(self.store, prediction.metadata.lat, prediction.metadata.lon)
        lead_dims = ("time", MEMBER_DIM, "prediction_timedelta") if self.members is not None else ("time", "prediction_timedelta")
        data = {}
        for kind, fields in ((SURF, prediction.surf_vars), (ATMOS, prediction.atmos_vars)):
            for name, value in fields.items():
                value = np.asarray(value, np.float32)[..., ::-1, :]  # latitudes ascending
                dims = lead_dims + (("latitude", "longitude") if kind == SURF else ("level", "latitude", "longitude"))
                data[self._name(kind, name)] = xr.Variable(dims, value, self._attrs(kind, name))
        coords = {
            "time": xr.Variable(
                "time",
                np.asarray(init_times, "datetime64[ns]"),
                {"standard_name": "forecast_reference_time", "long_name": "initialization time"},
            ),
            "prediction_timedelta": xr.Variable(
                "prediction_timedelta", self.leads, {"standard_name": "forecast_period", "long_name": "lead time"}
            ),
            "latitude": xr.Variable(
                "latitude", lat, {"units": "degrees_north", "standard_name": "latitude", "long_name": "latitude", "axis": "Y"}
            ),
            "longitude": xr.Variable(
                "longitude", lon, {"units": "degrees_east", "standard_name": "longitude", "long_name": "longitude", "axis": "X"}
            ),
        }
        if self.members is not None:
            coords[MEMBER_DIM] = xr.Variable(
                MEMBER_DIM,
                np.arange(self.members, dtype=np.int64),
                {"standard_name": "realization", "long_name": "ensemble member"},
            )
        if prediction.atmos_vars:
            coords["level"] = xr.Variable(
                "level",
                level_coords(self.store),
                {"units": "hPa", "standard_name": "air_pressure", "long_name": "pressure level", "positive": "down", "axis": "Z"},
            )
        return xr.Dataset(data, coords=coords, attrs={"Conventions": "CF-1.8", **self.attrs})

    def write(self, init_times: np.ndarray, prediction: Any) -> None:
        """Append one batch of forecasts along ``time``."""
        ds = self.dataset(init_times, prediction)
        if self._written == 0:
            lead = 2 if self.members is not None else 1  # one chunk per initial time (and member)
            encoding = {name: {"chunks": (1,) * lead + var.shape[lead:]} for name, var in ds.data_vars.items()}
            encoding["time"] = {"units": "hours since 1970-01-01", "dtype": "int64"}
            encoding["prediction_timedelta"] = (
                {"units": "hours", "dtype": "int64"} if np.all(self.leads % np.timedelta64(1, "h") == np.timedelta64(0)) else {}
            )
            ds.to_zarr(
                self.partial, mode="w", zarr_format=self.zarr_format, consolidated=self.zarr_format == 2, encoding=encoding
            )
        else:
            ds.to_zarr(self.partial, append_dim="time", zarr_format=self.zarr_format, consolidated=self.zarr_format == 2)
        self._written += len(init_times)

    def close(self) -> str:
        """Move the finished store into place; returns its path."""
        if os.path.exists(self.path):
            shutil.rmtree(self.path)
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        """Remove the partial store (nothing is left at ``path``)."""
        shutil.rmtree(self.partial, ignore_errors=True)
