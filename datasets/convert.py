"""NetCDF / GRIB (anything xarray opens) -> a WeatherBench2-layout Zarr store.

What the conversion does, in order:

1. opens every source with ``xarray.open_dataset`` (GRIB through the ``cfgrib`` engine, which
   needs ``pip install cfgrib eccodes``) and merges them by coordinates;
2. renames dims to WB2's: ``isobaricInhPa`` / ``pressure_level`` / ``plev`` -> ``level`` (Pa
   become hPa), ``lat`` / ``lon`` -> ``latitude`` / ``longitude``, ``valid_time`` -> ``time``
   where it is the time dim; an ensemble dim (``number``, ``member``, ``realization``) stays
   as ``number`` unless one member is picked;
3. renames variables: the user's map first, then ERA5 short names (:data:`ERA5_NAMES`: ``z t u
   v q w t2m u10 v10 msl lsm slt``, GRIB's ``2t 10u 10v``, and the extension / Aurora 1.5 ones:
   ``tp u100 v100 tcc sp d2m tcwv sst lcc mcc hcc skt stl1 swvl1 siconc sd tisr i10fg blh uvb
   ssrd ttr sf`` and the statics ``anor isor sdor sdfor slor cl dl cvh cvl tvh tvl``, each
   under its NetCDF and GRIB spelling) to WB2 names; ``z`` on pressure levels is
   ``geopotential``, without levels ``geopotential_at_surface``; static fields lose their time
   dim (first time kept). ERA5's accumulations (``tp sf ssrd ttr uvb tisr``) are sums over the
   hour before each time, so they become the ``_1hr`` WB2 names (``tp`` ->
   ``total_precipitation_1hr``, Aurora 1.5's ``scaled_tp_1h``); ``tisr`` keeps WB2's
   ``toa_incident_solar_radiation`` (J m-2: not Aurora 1.5's dimensionless insolation, which
   aurora-loop computes from the time and grid);
4. orients as WB2 does: latitude ascending (-90 -> 90), longitude in [0, 360) ascending,
   levels ascending, time sorted (duplicate times are an error). Only the order changes:
   latitudes, and longitudes already in [0, 360), keep the source's values and dtype bit for
   bit (other longitudes are wrapped in float64), so a truth converted from the same files
   aligns with anything else made from them;
5. for Aurora 1.5: ERA5's categorical ``slt``, ``tvh`` and ``tvl`` (category codes) also
   become the one-hot maps the 1.5 model reads, ``soil_type_<k>``,
   ``type_of_high_vegetation_<k>`` and ``type_of_low_vegetation_<k>`` (1 where the code is k,
   else 0; NaN codes, as GRIB writes over the sea, count as 0 "none"; k over
   :data:`~aurora_loop.datasets.variables.SOIL_TYPES` and the vegetation type lists), and
   when the sources hold any of 1.5's surface inputs beyond the standard four, the
   dimensionless insolation 1.5 reads (``toa_incident_solar_radiation_normalized``) is
   computed from the times and the grid (:func:`aurora_loop.model.insolation.insolation_numpy`);
6. casts floating data to ``dtype`` (float32 by default), drops the sources' encodings, gives
   every variable without ``units`` the CF units of its WB2 name
   (:data:`aurora_loop.datasets.variables.CF_METADATA`; ``long_name`` likewise) and writes with
   ``to_zarr``, one time step per chunk.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from aurora_loop.datasets.layout import LAT_DIMS, LEVEL_DIMS, LON_DIMS, MEMBER_DIMS
from aurora_loop.datasets.variables import (
    CF_METADATA,
    DEFAULT_MAP,
    HIGH_VEGETATION_TYPES,
    LOW_VEGETATION_TYPES,
    SOIL_TYPES,
    STATIC,
)
from aurora_loop.datasets.writer import write_store
from aurora_loop.errors import UsageError

#: ERA5 / GRIB short names -> WB2 names (``z`` is decided by whether it has levels).
ERA5_NAMES: dict[str, str] = {
    "t": "temperature",
    "u": "u_component_of_wind",
    "v": "v_component_of_wind",
    "q": "specific_humidity",
    "t2m": "2m_temperature",
    "2t": "2m_temperature",
    "u10": "10m_u_component_of_wind",
    "10u": "10m_u_component_of_wind",
    "v10": "10m_v_component_of_wind",
    "10v": "10m_v_component_of_wind",
    "msl": "mean_sea_level_pressure",
    "lsm": "land_sea_mask",
    "slt": "soil_type",
    "w": "vertical_velocity",
    # Surface fields beyond Aurora's standard four (NetCDF and GRIB spellings).
    "tp": "total_precipitation_1hr",  # m, the hour before the valid time
    "u100": "100m_u_component_of_wind",
    "100u": "100m_u_component_of_wind",
    "v100": "100m_v_component_of_wind",
    "100v": "100m_v_component_of_wind",
    "tcc": "total_cloud_cover",
    "sp": "surface_pressure",
    "d2m": "2m_dewpoint_temperature",
    "2d": "2m_dewpoint_temperature",
    "tcwv": "total_column_water_vapour",
    "sst": "sea_surface_temperature",
    "lcc": "low_cloud_cover",
    "mcc": "medium_cloud_cover",
    "hcc": "high_cloud_cover",
    "skt": "skin_temperature",
    "stl1": "soil_temperature_level_1",
    "swvl1": "volumetric_soil_water_layer_1",
    "siconc": "sea_ice_cover",
    "ci": "sea_ice_cover",
    "sd": "snow_depth",  # m of water equivalent
    "tisr": "toa_incident_solar_radiation",  # J m-2 over the hour (not Aurora 1.5's insolation)
    "i10fg": "instantaneous_10m_wind_gust",
    "blh": "boundary_layer_height",
    "uvb": "downward_uv_radiation_at_the_surface_1hr",
    "ssrd": "surface_solar_radiation_downwards_1hr",
    "ttr": "top_net_thermal_radiation_1hr",
    "sf": "snowfall_1hr",
    # Statics.
    "anor": "angle_of_sub_gridscale_orography",
    "isor": "anisotropy_of_sub_gridscale_orography",
    "sdor": "standard_deviation_of_orography",
    "sdfor": "standard_deviation_of_filtered_subgrid_orography",
    "slor": "slope_of_sub_gridscale_orography",
    "cl": "lake_cover",
    "dl": "lake_depth",
    "cvh": "high_vegetation_cover",
    "cvl": "low_vegetation_cover",
    "tvh": "type_of_high_vegetation",
    "tvl": "type_of_low_vegetation",
}
STATIC_WB2 = set(DEFAULT_MAP[STATIC])
#: ERA5's categorical statics (WB2 names) -> the category codes Aurora 1.5 takes one-hot maps of.
CATEGORICAL = {"soil_type": SOIL_TYPES, "type_of_high_vegetation": HIGH_VEGETATION_TYPES, "type_of_low_vegetation": LOW_VEGETATION_TYPES}
#: Aurora 1.5's surface inputs beyond the standard four (WB2 names): sources with any of them get the insolation.
V1P5_SURFACE_INPUTS = ("low_cloud_cover", "medium_cloud_cover", "high_cloud_cover", "skin_temperature", "soil_temperature_level_1",
                       "volumetric_soil_water_layer_1", "sea_ice_cover", "snow_depth", "toa_incident_solar_radiation")


def add_one_hot(ds: xr.Dataset, dtype: str = "float32") -> xr.Dataset:
    """Add the one-hot maps of ERA5's category codes (:data:`CATEGORICAL`) that ``ds`` lacks;
    each (latitude, longitude) like its source, 1 where the code is k, else 0."""
    for name, categories in CATEGORICAL.items():
        if name not in ds.data_vars:
            continue
        source = ds[name]
        codes = np.rint(np.nan_to_num(np.asarray(source.values, dtype=np.float64), nan=0.0)).astype(np.int64)
        for k in categories:
            if f"{name}_{k}" not in ds.data_vars:
                ds[f"{name}_{k}"] = xr.DataArray((codes == k).astype(dtype), dims=source.dims, coords=source.coords)
    return ds


def add_insolation(ds: xr.Dataset, dtype: str = "float32") -> xr.Dataset:
    """Add Aurora 1.5's dimensionless insolation (time, latitude, longitude) when ``ds`` holds
    any of 1.5's surface inputs beyond the standard four and not the insolation already."""
    from aurora_loop.model.batch import hours_since_epoch
    from aurora_loop.model.insolation import insolation_numpy

    name = "toa_incident_solar_radiation_normalized"
    if name in ds.data_vars or not any(v in ds.data_vars for v in V1P5_SURFACE_INPUTS):
        return ds
    hours = hours_since_epoch(np.asarray(ds["time"].values))
    lat = np.asarray(ds["latitude"].values, np.float64)
    lon = np.asarray(ds["longitude"].values, np.float64)
    values = insolation_numpy(hours, lat, lon).astype(dtype)
    ds[name] = xr.DataArray(values, dims=("time", "latitude", "longitude"), coords={d: ds[d] for d in ("time", "latitude", "longitude")})
    return ds
GRIB_SUFFIXES = (".grib", ".grb", ".grib1", ".grib2", ".grb2")


def _engine(path: str, engine: str | None) -> str | None:
    if engine:
        return engine
    if path.lower().endswith(GRIB_SUFFIXES):
        return "cfgrib"
    if os.path.isdir(path):
        return "zarr"
    return None


def open_source(path: str | os.PathLike, engine: str | None = None) -> xr.Dataset:
    """Open one NetCDF / GRIB / Zarr source lazily; a one-line UsageError if that fails."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"source {path!r} does not exist; pass NetCDF or GRIB files")
    chosen = _engine(path, engine)
    kwargs = {"backend_kwargs": {"indexpath": ""}} if chosen == "cfgrib" else {}  # no .idx files beside the source
    try:
        return xr.open_dataset(path, engine=chosen, decode_timedelta=False, **kwargs)
    except (ImportError, ValueError, OSError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        if chosen == "cfgrib" and importlib.util.find_spec("cfgrib") is None:
            raise UsageError(f"reading GRIB {path!r} needs the cfgrib engine; pip install cfgrib eccodes") from err
        raise UsageError(f"xarray cannot open {path!r} ({reason}); pass NetCDF (.nc) or GRIB (.grib) files") from err


def _rename_dims(ds: xr.Dataset) -> xr.Dataset:
    renames: dict[str, str] = {}
    for names, target in ((LEVEL_DIMS, "level"), (LAT_DIMS, "latitude"), (LON_DIMS, "longitude"), (MEMBER_DIMS, "number")):
        for name in names:
            if name in ds.dims and name != target:
                renames[name] = target
                break
    if "time" not in ds.dims and "valid_time" in ds.dims:
        if "time" in ds.coords:
            ds = ds.drop_vars("time")
        renames["valid_time"] = "time"
    ds = ds.rename(renames)
    if "step" in ds.dims and ds.sizes["step"] > 1:
        raise UsageError("the sources are forecasts with several lead times ('step' dim); convert analyses or one lead time (select it with xarray first)")
    if "level" in ds.coords:
        level = ds["level"]
        values = np.asarray(level.values, dtype=np.float64)
        if str(level.attrs.get("units", "")).lower() in ("pa", "pascal") or values.max() > 2000:
            ds = ds.assign_coords(level=values / 100.0)
        ds = ds.assign_coords(level=np.round(ds["level"].values).astype(np.int64))
        ds["level"].attrs["units"] = "hPa"
    return ds


def _name_geopotential(ds: xr.Dataset) -> xr.Dataset:
    """ERA5's ``z`` gets its WB2 name per source file (the pressure-level and the single-level
    files both call it ``z``), so the files merge."""
    if "z" in ds.data_vars:
        return ds.rename({"z": "geopotential" if "level" in ds["z"].dims else "geopotential_at_surface"})
    return ds


def _wb2_name(name: str, var: xr.DataArray, variable_map: Mapping[str, str]) -> str:
    if name in variable_map:
        return variable_map[name]
    if name == "z":
        return "geopotential" if "level" in var.dims else "geopotential_at_surface"
    return ERA5_NAMES.get(name, name)


def to_wb2(ds: xr.Dataset, variable_map: Mapping[str, str] | None = None, member: int | None = None, dtype: str = "float32") -> xr.Dataset:
    """Rename, orient and cast ``ds`` into the WeatherBench2 layout (see the module docstring).

    Args:
      variable_map: source name -> WB2 name, applied before the ERA5 names.
      member: keep only this ensemble member (index along the ensemble dim).
      dtype: floating dtype of the data variables ("float32" or "float64").
    """
    ds = _rename_dims(ds)
    if "time" not in ds.dims:
        raise UsageError(f"the sources have no time dimension (dims: {', '.join(map(str, ds.dims))}); convert files with a 'time' or 'valid_time' dim")
    for dim in ("latitude", "longitude"):
        if dim not in ds.dims:
            raise UsageError(f"the sources have no {dim} dimension (dims: {', '.join(map(str, ds.dims))}); convert gridded latitude/longitude fields")
    if member is not None:
        if "number" not in ds.dims:
            raise UsageError("--member given but the sources have no ensemble dimension; leave --member out")
        if not 0 <= member < ds.sizes["number"]:
            raise UsageError(f"--member {member} is out of range; the sources hold {ds.sizes['number']} members (0..{ds.sizes['number'] - 1})")
        ds = ds.isel(number=member, drop=True)
    ds = ds.drop_vars([c for c in ds.coords if c not in ds.dims])
    variable_map = dict(variable_map or {})
    names = {name: _wb2_name(str(name), ds[name], variable_map) for name in ds.data_vars}
    if len(set(names.values())) != len(names):
        raise UsageError(f"two source variables map to the same WB2 name ({names}); fix the variable map")
    ds = ds.rename({k: v for k, v in names.items() if k != v})
    for name in STATIC_WB2 & set(map(str, ds.data_vars)):
        if "time" in ds[name].dims:
            ds[name] = ds[name].isel(time=0, drop=True)
        if "number" in ds[name].dims:
            ds[name] = ds[name].isel(number=0, drop=True)
    times = ds["time"].values
    if np.unique(times).size != times.size:
        raise UsageError("the sources repeat some times; pass each time once")
    lon = ds["longitude"].values
    if np.any((lon < 0) | (lon >= 360)):  # wrap; a [0, 360) source keeps its own values and dtype
        ds = ds.assign_coords(longitude=np.mod(lon.astype(np.float64), 360.0))
    ds = ds.sortby("time").sortby("latitude").sortby("longitude")
    if "level" in ds.dims:
        ds = ds.sortby("level")
    order = [d for d in ("time", "number", "level", "latitude", "longitude") if d in ds.dims]
    ds = add_insolation(add_one_hot(ds, dtype), dtype)
    ds = ds.transpose(*order)
    for name in ds.data_vars:
        if np.issubdtype(ds[name].dtype, np.floating) and ds[name].dtype != np.dtype(dtype):
            ds[name] = ds[name].astype(dtype)
    for var in (*ds.data_vars.values(), *ds.coords.values()):
        var.encoding = {}
    for name in ds.data_vars:
        if str(name) in CF_METADATA:
            units, _standard, long_name = CF_METADATA[str(name)]
            ds[name].attrs.setdefault("units", units)
            ds[name].attrs.setdefault("long_name", long_name)
    ds["latitude"].attrs.setdefault("units", "degrees_north")
    ds["longitude"].attrs.setdefault("units", "degrees_east")
    return ds


def convert(sources: Sequence[str | os.PathLike], out: str | os.PathLike, variable_map: Mapping[str, str] | None = None, member: int | None = None, dtype: str = "float32",
            engine: str | None = None, zarr_format: int = 2, chunks: Mapping[str, int] | None = None) -> xr.Dataset:
    """Convert ``sources`` into the WB2-layout store ``out`` (refusing an existing ``out``);
    returns the dataset written. Nothing is written when anything is wrong."""
    if not sources:
        raise UsageError("no sources given; pass one or more NetCDF/GRIB files before OUT.zarr")
    if os.path.exists(out):
        raise UsageError(f"{os.fspath(out)!r} already exists; choose a new output path or remove it first")
    parts = [_name_geopotential(_rename_dims(open_source(p, engine))) for p in sources]
    try:
        merged = parts[0] if len(parts) == 1 else xr.combine_by_coords(parts, combine_attrs="drop_conflicts")
    except (ValueError, KeyError) as err:
        raise UsageError(f"the sources do not fit together ({str(err).splitlines()[0]}); pass files on one grid that differ in time or variables") from err
    ds = to_wb2(merged, variable_map=variable_map, member=member, dtype=dtype)
    ds.load()
    write_store(ds, out, zarr_format=zarr_format, chunks=chunks)
    return ds
