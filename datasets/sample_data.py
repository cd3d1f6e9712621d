"""Synthetic WeatherBench2-layout stores whose fields evolve learnably.

Each field is a climatological mean (realistic per variable, pressure level and latitude:
a standard-atmosphere temperature profile with an equator-to-pole contrast, geopotential
heights, a mid-latitude jet, moisture falling off with height and latitude) plus anomalies
built from a few latent fields. A latent field is a sum of zonal waves on every latitude row
that are advected eastward (westward in the tropics) by a latitude-dependent phase speed,
damped by diffusion (``exp(-nu k^2)`` per step) and kept alive by weak random forcing that is
smooth in latitude: ``S[t+1] = S[t] * exp(-i k c(lat) - nu k^2) + sigma_k * noise``. Most of
each step is thus predictable from the previous two, so a model's loss falls.

Variables are tied together the way the atmosphere ties them: the anomalies of z, t, u, v at
a level share one latent stream function (u, v are its meridional / zonal derivatives), q is
a positive multiple of its mean, the surface fields follow the lowest level.

Written with xarray's ``Dataset.to_zarr`` in the WB2 layout: ascending latitudes -90 -> 90,
longitudes [0, 360), ``level`` in hPa, ``time`` every ``step_hours``, WB2 variable names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from aurora_loop.datasets.writer import write_store
from aurora_loop.errors import UsageError

G = 9.80665  # m s-2
DEFAULT_LEVELS = (100, 250, 500, 850)
#: Aurora name -> WB2 name of every surface variable the sample can hold; the first four are
#: Aurora's standard set (the default), the others are optional (``surf_vars=``).
SURFACE_VARIABLES: dict[str, str] = {
    "2t": "2m_temperature",
    "10u": "10m_u_component_of_wind",
    "10v": "10m_v_component_of_wind",
    "msl": "mean_sea_level_pressure",
    "tp": "total_precipitation_6hr",
    "100u": "100m_u_component_of_wind",
    "100v": "100m_v_component_of_wind",
    "tcc": "total_cloud_cover",
}
STANDARD_SURFACE = ("2t", "10u", "10v", "msl")
NU = 0.0015  # diffusion: wavenumber k decays by exp(-NU k^2) per step


def _height(p: np.ndarray) -> np.ndarray:
    """Standard-atmosphere height (m) of pressure ``p`` (hPa)."""
    return 44330.8 * (1.0 - (p / 1013.25) ** 0.190263)


def _standard_temperature(p: np.ndarray) -> np.ndarray:
    """Standard-atmosphere temperature (K) at pressure ``p`` (hPa)."""
    h = _height(p)
    return np.where(h < 11000.0, 288.15 - 0.0065 * h, 216.65 + 0.001 * np.maximum(h - 20000.0, 0.0))


def climatology(lat: np.ndarray, levels: Sequence[int]) -> dict[str, np.ndarray]:
    """Mean fields by WB2 name: surface ones (h,), atmospheric ones (c, h); units SI."""
    phi = np.deg2rad(lat)[None, :]
    p = np.asarray(levels, dtype=np.float64)[:, None]
    cos2 = np.cos(phi) ** 2
    contrast = 45.0 * np.clip((p - 150.0) / 850.0, 0.0, 1.0) - 8.0 * np.clip((300.0 - p) / 200.0, 0.0, 1.0)
    jet = 5.0 + 30.0 * np.exp(-(((p - 250.0) / 300.0) ** 2))
    abs_lat = np.abs(np.rad2deg(phi[0]))
    return {
        "temperature": _standard_temperature(p) + contrast * (cos2 - 2.0 / 3.0),
        "geopotential": G * _height(p) * (1.0 + 0.12 * (cos2 - 2.0 / 3.0)),
        "u_component_of_wind": jet * np.sin(2.0 * phi) ** 2 - 4.0 * cos2**4,
        "v_component_of_wind": np.zeros_like(p * phi),
        "specific_humidity": 0.018 * np.cos(phi) ** 4 * (p / 1000.0) ** 3 + 2e-6,
        "2m_temperature": 300.0 - 45.0 * np.sin(phi[0]) ** 2,
        "mean_sea_level_pressure": 101325.0 + 900.0 * np.exp(-(((abs_lat - 35.0) / 12.0) ** 2)) - 1100.0 * np.exp(-(((abs_lat - 60.0) / 10.0) ** 2)),
        "10m_u_component_of_wind": -5.0 * np.cos(phi[0]) ** 8 + 7.0 * np.exp(-(((abs_lat - 50.0) / 12.0) ** 2)),
        "10m_v_component_of_wind": np.zeros_like(phi[0]),
    }


def anomaly_spread(levels: Sequence[int]) -> dict[str, np.ndarray]:
    """Standard deviation of the anomalies by WB2 name: scalars or (c, 1) per level."""
    p = np.asarray(levels, dtype=np.float64)[:, None]
    return {
        "geopotential": G * (20.0 + 0.015 * _height(p)),
        "temperature": 2.5 + 1.5 * p / 1000.0,
        "u_component_of_wind": 5.0 + 6.0 * np.exp(-(((p - 250.0) / 250.0) ** 2)),
        "v_component_of_wind": 4.0 + 5.0 * np.exp(-(((p - 250.0) / 250.0) ** 2)),
        "specific_humidity": np.full_like(p, 0.35),  # log-space spread
        "2m_temperature": np.float64(3.0),
        "mean_sea_level_pressure": np.float64(900.0),
        "10m_u_component_of_wind": np.float64(3.0),
        "10m_v_component_of_wind": np.float64(3.0),
    }


def _lat_smoother(h: int, width: float) -> np.ndarray:
    """(h, h) Gaussian smoothing matrix along latitude rows, rows normalised to unit energy."""
    i = np.arange(h)
    k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / max(width, 0.5)) ** 2)
    return k / np.sqrt((k**2).sum(axis=1, keepdims=True))


def latent_fields(rng: np.random.Generator, n_fields: int, n_times: int, lat: np.ndarray, n_lon: int, burn_in: int = 0) -> np.ndarray:
    """Advected, diffusing, weakly forced zonal waves: (n_fields, n_times, h, w) float32, ~unit std.

    Row ``j`` moves by ``c(lat_j)`` degrees per step (5.5 deg/step eastward at 45 deg,
    1.5 deg/step westward at the equator); wavenumber ``k`` decays by ``exp(-NU k^2)`` per step;
    the stationary spectrum falls as ``k^-2.5`` up to ``k = min(w/4, 32)``.
    """
    h = lat.size
    nk = n_lon // 2 + 1
    k = np.arange(nk, dtype=np.float64)
    k_max = max(2, min(n_lon // 4, 32))
    var = np.where((k >= 1) & (k <= k_max), np.maximum(k, 1.0) ** -2.5, 0.0)
    var[0] = 0.3
    phi = np.deg2rad(lat)
    speed = np.deg2rad(7.0 * np.sin(2.0 * phi) ** 2 - 1.5)  # rad per step
    decay = np.exp(-1j * k[None, :] * speed[:, None] - NU * k[None, :] ** 2)  # (h, nk)
    decay[:, 0] = 0.995
    sigma = np.sqrt(var[None, :] * (1.0 - np.abs(decay) ** 2))
    smooth = _lat_smoother(h, width=h / 24.0)
    envelope = (np.cos(phi) ** 0.5 * (0.4 + 0.6 * np.sin(2.0 * phi) ** 2))[:, None]

    def noise() -> np.ndarray:
        z = rng.standard_normal((n_fields, h, nk)) + 1j * rng.standard_normal((n_fields, h, nk))
        return np.einsum("ij,fjk->fik", smooth, z) / np.sqrt(2.0)

    state = noise() * np.sqrt(var)[None, None, :]
    out = np.empty((n_fields, n_times, h, n_lon), dtype=np.float32)
    for t in range(-burn_in, n_times):
        if t >= 0:
            out[:, t] = np.fft.irfft(state, n=n_lon, axis=-1) * envelope * n_lon
        state = state * decay[None] + sigma[None] * noise()
    std = out.reshape(n_fields, -1).std(axis=1)
    out /= np.maximum(std, 1e-12)[:, None, None, None]
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / max(float(x.std()), 1e-12)


def static_fields(rng: np.random.Generator, lat: np.ndarray, n_lon: int) -> dict[str, np.ndarray]:
    """``land_sea_mask`` (0/1), ``geopotential_at_surface`` (m2 s-2), ``soil_type`` (0..7): (h, w)."""
    blobs = latent_fields(rng, 3, 1, lat, n_lon)[:, 0]
    land = (blobs[0] > np.quantile(blobs[0], 0.7)) | (lat[:, None] < -70.0)
    height = np.where(land, 400.0 + 1500.0 * np.clip(blobs[1] + 0.5, 0.0, None), 0.0)
    soil = np.where(land, 1 + np.clip(np.floor((blobs[2] + 2.0) * 1.75), 0, 6), 0)
    return {
        "land_sea_mask": land.astype(np.float32),
        "geopotential_at_surface": (G * height).astype(np.float32),
        "soil_type": soil.astype(np.float32),
    }


def check_surface_variables(surf_vars: Sequence[str] | None) -> tuple[str, ...]:
    """The sample's surface variables (Aurora names; None: the standard four), or a UsageError."""
    names = STANDARD_SURFACE if surf_vars is None else tuple(dict.fromkeys(surf_vars))
    unknown = [n for n in names if n not in SURFACE_VARIABLES]
    if unknown:
        raise UsageError(f"the sample data has no surface variable {unknown[0]!r}; choose from {', '.join(SURFACE_VARIABLES)}")
    return names


def extra_surface_fields(seed: int, lat: np.ndarray, n_lon: int, times: int, step_hours: int, ten_m_wind: tuple[np.ndarray, np.ndarray],
                         moist: np.ndarray, pressure: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The optional surface fields by WB2 name, (time, lat, lon), from their own random stream
    (so the standard fields do not change when they are asked for):

    - ``total_precipitation_6hr`` (m per ``step_hours`` accumulation, >= 0, mostly zero): falls
      where the moisture anomaly is high and the pressure low, most in the tropics (ITCZ) and
      the mid-latitude storm tracks; the global mean is about 0.7 mm per 6 h, as ERA5's.
    - ``100m_{u,v}_component_of_wind`` (m/s): the 10 m wind strengthened by the log profile
      (about 1.3x) plus a little shear noise.
    - ``total_cloud_cover`` (0..1): a logistic function of moisture and pressure anomalies,
      mean about 0.6.
    """
    if not names:
        return {}
    rng = np.random.default_rng([int(seed), 7919])
    noise = latent_fields(rng, 3, times, lat, n_lon, burn_in=5)
    phi = np.deg2rad(lat)[None, :, None]
    abs_lat = np.abs(np.rad2deg(phi))
    out: dict[str, np.ndarray] = {}
    if "tp" in names:
        wet = _unit(0.6 * moist - 0.5 * pressure + 0.6 * noise[0])
        region = 0.5 + 1.5 * np.exp(-((np.rad2deg(phi) - 5.0) / 10.0) ** 2) + 0.8 * np.exp(-(((abs_lat - 50.0) / 12.0) ** 2))
        out["total_precipitation_6hr"] = 4e-3 * (step_hours / 6.0) * region * np.maximum(wet - 0.4, 0.0) ** 1.5
    if "100u" in names or "100v" in names:
        out["100m_u_component_of_wind"] = 1.3 * ten_m_wind[0] + 0.8 * noise[1]
        out["100m_v_component_of_wind"] = 1.3 * ten_m_wind[1] + 0.8 * noise[2]
    if "tcc" in names:
        cloudy = _unit(0.7 * moist - 0.4 * pressure + 0.5 * noise[0])
        out["total_cloud_cover"] = np.clip(1.0 / (1.0 + np.exp(-(1.8 * cloudy + 0.45))), 0.0, 1.0)
    return {SURFACE_VARIABLES[n]: out[SURFACE_VARIABLES[n]] for n in names if SURFACE_VARIABLES[n] in out}


def sample_dataset(grid: tuple[int, int] = (32, 64), times: int = 120, seed: int = 0, levels: Sequence[int] = DEFAULT_LEVELS, start: str = "2020-01-01T00", step_hours: int = 6, dtype: str = "float32",
                   surf_vars: Sequence[str] | None = None) -> xr.Dataset:
    """The synthetic data as an in-memory :class:`xarray.Dataset` in the WB2 layout.

    Args:
      grid: (h, w) latitudes x longitudes; latitudes span -90..90 inclusive (ascending, as
        WB2 stores them), longitudes ``360 * j / w``.
      times: number of time steps, ``step_hours`` apart from ``start``.
      seed: all randomness comes from ``numpy.random.default_rng(seed)``.
      levels: pressure levels (hPa) of the atmospheric variables.
      dtype: "float32" or "float64" of the data variables.
      surf_vars: Aurora names of the surface variables to write (default: 2t, 10u, 10v, msl);
        also tp, 100u, 100v, tcc (:func:`extra_surface_fields`). The standard fields' values
        do not depend on which others are written.
    """
    surf_names = check_surface_variables(surf_vars)
    h, w = int(grid[0]), int(grid[1])
    if h < 2 or w < 4 or times < 1 or not levels:
        raise UsageError(f"sample data needs a grid of at least 2x4, one time and one level; got grid {h}x{w}, {times} times, levels {list(levels)}")
    levels = [int(v) for v in levels]
    rng = np.random.default_rng(seed)
    lat = np.linspace(-90.0, 90.0, h)
    lon = np.arange(w) * (360.0 / w)
    c = len(levels)
    # latents: 0 barotropic, 1..c per level, c+1 surface, c+2 moisture
    lat_fields = latent_fields(rng, c + 3, times, lat, w, burn_in=20)
    baro, per_level, surface, moist = lat_fields[0], lat_fields[1 : c + 1], lat_fields[c + 1], lat_fields[c + 2]
    psi = np.stack([_unit(0.8 * baro + 0.6 * per_level[i]) for i in range(c)], axis=1)  # (T, c, h, w)
    mean, spread = climatology(lat, levels), anomaly_spread(levels)
    dlat = np.gradient(psi, axis=-2)
    dlon = np.gradient(psi, axis=-1)
    shift = max(1, w // 16)
    anomalies = {
        "geopotential": psi,
        "temperature": _unit(0.6 * psi + 0.8 * np.roll(psi, shift, axis=-1)),
        "u_component_of_wind": -_unit(dlat),
        "v_component_of_wind": _unit(dlon),
        "specific_humidity": _unit(0.5 * psi + 0.87 * moist[:, None]),
    }
    data: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    atmos_dims = ("time", "level", "latitude", "longitude")
    for name, anomaly in anomalies.items():
        m = mean[name][None, :, :, None]
        s = spread[name][None, :, :, None]
        if name == "specific_humidity":
            field = m * np.exp(s * anomaly - 0.5 * s**2)
        else:
            field = m + s * anomaly
        data[name] = (atmos_dims, field)
    low = psi[:, int(np.argmax(levels))]
    pressure = _unit(0.7 * baro + 0.71 * surface)
    surf_anomalies = {
        "2m_temperature": _unit(0.5 * low + 0.87 * surface),
        "mean_sea_level_pressure": pressure,
        "10m_u_component_of_wind": -_unit(np.gradient(pressure, axis=-2)),
        "10m_v_component_of_wind": _unit(np.gradient(pressure, axis=-1)),
    }
    surf_fields = {name: mean[name][None, :, None] + spread[name] * anomaly for name, anomaly in surf_anomalies.items()}
    extra = [n for n in surf_names if n not in STANDARD_SURFACE]
    surf_fields.update(extra_surface_fields(seed, lat, w, times, step_hours, (surf_fields["10m_u_component_of_wind"], surf_fields["10m_v_component_of_wind"]),
                                            moist, pressure, extra))
    wanted = [SURFACE_VARIABLES[n] for n in surf_names]
    for name in [k for k in surf_anomalies if k in wanted] + [k for k in wanted if k not in surf_anomalies]:
        data[name] = (("time", "latitude", "longitude"), surf_fields[name])
    for name, field in static_fields(rng, lat, w).items():
        data[name] = (("latitude", "longitude"), field)
    data = {k: (dims, np.asarray(v, dtype=dtype)) for k, (dims, v) in data.items()}
    time = np.datetime64(start, "ns") + np.arange(times) * np.timedelta64(step_hours, "h")
    ds = xr.Dataset(
        data,
        coords={
            "time": ("time", time),
            "level": ("level", np.asarray(levels, dtype=np.int64)),
            "latitude": ("latitude", lat),
            "longitude": ("longitude", lon),
        },
        attrs={"title": "aurora_loop synthetic weather (WeatherBench2 layout)", "seed": int(seed)},
    )
    units = {"geopotential": "m**2 s**-2", "temperature": "K", "u_component_of_wind": "m s**-1", "v_component_of_wind": "m s**-1", "specific_humidity": "kg kg**-1",
             "2m_temperature": "K", "mean_sea_level_pressure": "Pa", "10m_u_component_of_wind": "m s**-1", "10m_v_component_of_wind": "m s**-1",
             "land_sea_mask": "1", "geopotential_at_surface": "m**2 s**-2", "soil_type": "1",
             "total_precipitation_6hr": "m", "100m_u_component_of_wind": "m s**-1", "100m_v_component_of_wind": "m s**-1",
             "total_cloud_cover": "(0 - 1)"}
    for name, unit in units.items():
        if name in ds:
            ds[name].attrs["units"] = unit
    ds["level"].attrs["units"] = "hPa"
    ds["latitude"].attrs["units"] = "degrees_north"
    ds["longitude"].attrs["units"] = "degrees_east"
    return ds


def write_sample_store(
    path: str | os.PathLike,
    grid: tuple[int, int] = (32, 64),
    times: int = 120,
    seed: int = 0,
    levels: Sequence[int] = DEFAULT_LEVELS,
    zarr_format: int = 2,
    chunks: Mapping[str, int] | None = None,
    dtype: str = "float32",
    step_hours: int = 6,
    overwrite: bool = False,
    surf_vars: Sequence[str] | None = None,
) -> str:
    """Write a synthetic WB2-layout store (see the module docstring) and return its path.

    ``times`` steps of ``step_hours`` from 2020-01-01 00 UTC; all 9 WB2 dynamic variables
    (surface: 2m_temperature K, 10m_u/v_component_of_wind m/s, mean_sea_level_pressure Pa;
    atmospheric on ``levels`` hPa: geopotential m2/s2, u/v_component_of_wind m/s,
    temperature K, specific_humidity kg/kg) and 3 static ones (land_sea_mask,
    geopotential_at_surface, soil_type). Same (grid, times, seed, levels) -> same values.
    ``surf_vars`` (Aurora names) picks the surface variables instead: any of the standard four
    and ``tp`` (total_precipitation_6hr, m), ``100u`` / ``100v`` (100 m wind, m/s) and ``tcc``
    (total_cloud_cover, 0..1); see :func:`sample_dataset`.
    """
    ds = sample_dataset(grid=grid, times=times, seed=seed, levels=levels, step_hours=step_hours, dtype=dtype, surf_vars=surf_vars)
    return write_store(ds, path, zarr_format=zarr_format, chunks=chunks, overwrite=overwrite)
