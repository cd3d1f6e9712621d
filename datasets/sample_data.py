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

The dynamics run in physical time: one step of ``step_hours`` advects, damps and forces the
waves by ``step_hours / 6`` of what a 6-hour step does (so a 6-hour store is unchanged and an
hourly store is the same kind of weather sampled six times as often, as sub-6-hour lead
times need).

``variables="v1p5"`` (``aurora-loop sample-data --variables v1p5``) writes every variable of
Aurora 1.5 (:data:`~aurora_loop.datasets.variables.AURORA_V1P5_VARS`): its 26 surface fields
(output-only ones included, as targets) and 36 static ones, besides z/u/v/t/q and the standard
statics; see :func:`v1p5_surface_fields` and :func:`v1p5_static_fields`.

Written with xarray's ``Dataset.to_zarr`` in the WB2 layout: ascending latitudes -90 -> 90,
longitudes [0, 360), ``level`` in hPa, ``time`` every ``step_hours``, WB2 variable names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from aurora_loop.datasets.variables import (
    AURORA_V1P5_VARS,
    CF_METADATA,
    DEFAULT_MAP,
    HIGH_VEGETATION_TYPES,
    LOW_VEGETATION_TYPES,
    SOIL_TYPES,
    STATIC,
    SURF,
)
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
    # Aurora 1.5's other surface variables (output-only ones included), see v1p5_surface_fields.
    **{name: next(wb2 for wb2, a in DEFAULT_MAP[SURF].items() if a == name)
       for name in AURORA_V1P5_VARS[SURF] if name not in ("2t", "10u", "10v", "msl", "tp", "100u", "100v", "tcc")},
}
STANDARD_SURFACE = ("2t", "10u", "10v", "msl")
#: Variable presets: the surface variables written by default, and whether Aurora 1.5's
#: statics are written besides the standard three (lsm, z, slt).
PRESETS = ("standard", "v1p5")
#: The surface fields :func:`extra_surface_fields` makes; the rest come from v1p5_surface_fields.
EXTRA_SURFACE = ("tp", "100u", "100v", "tcc")
#: WB2 names of Aurora 1.5's statics that the standard three do not cover.
V1P5_STATIC = tuple(next(wb2 for wb2, a in DEFAULT_MAP[STATIC].items() if a == name) for name in AURORA_V1P5_VARS[STATIC] if name not in ("lsm", "z"))
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


def latent_fields(rng: np.random.Generator, n_fields: int, n_times: int, lat: np.ndarray, n_lon: int, burn_in: int = 0, rate: float = 1.0) -> np.ndarray:
    """Advected, diffusing, weakly forced zonal waves: (n_fields, n_times, h, w) float32, ~unit std.

    Row ``j`` moves by ``c(lat_j)`` degrees per 6 hours (5.5 deg eastward at 45 deg, 1.5 deg
    westward at the equator); wavenumber ``k`` decays by ``exp(-NU k^2)`` per 6 hours; the
    stationary spectrum falls as ``k^-2.5`` up to ``k = min(w/4, 32)``. ``rate``: the step in
    units of 6 hours (``step_hours / 6``; 1 = the 6-hour step, bit for bit as before); the
    forcing per step shrinks with it so the spectrum stays the same.
    """
    h = lat.size
    nk = n_lon // 2 + 1
    k = np.arange(nk, dtype=np.float64)
    k_max = max(2, min(n_lon // 4, 32))
    var = np.where((k >= 1) & (k <= k_max), np.maximum(k, 1.0) ** -2.5, 0.0)
    var[0] = 0.3
    phi = np.deg2rad(lat)
    speed = np.deg2rad(7.0 * np.sin(2.0 * phi) ** 2 - 1.5)  # rad per step
    exponent = -1j * k[None, :] * speed[:, None] - NU * k[None, :] ** 2
    decay = np.exp(exponent if rate == 1.0 else exponent * rate)  # (h, nk)
    decay[:, 0] = 0.995 if rate == 1.0 else 0.995**rate
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


def _one_hot(codes: np.ndarray, categories: Sequence[int], prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}_{k}": (codes == k).astype(np.float32) for k in categories}


def v1p5_static_fields(seed: int, lat: np.ndarray, n_lon: int, standard: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Aurora 1.5's statics beyond lsm and z, by WB2 name, (h, w), from the standard statics
    (``standard``: land_sea_mask, geopotential_at_surface, soil_type) and their own random
    stream. Values stay O(1), as the reference's normalisation (location 0, scale 1 for all
    of them) expects: sub-grid orography (``standard_deviation_of_orography``,
    ``standard_deviation_of_filtered_subgrid_orography``) and ``lake_depth`` in km, slope
    (0..0.1), angle (radians, -pi/2..pi/2) and anisotropy (0..1) of the sub-grid orography,
    cover fractions (lake, high and low vegetation; high + low <= 1) and one-hot maps of the
    soil type (``soil_type_<k>``, from ``soil_type``; k = 0 at sea), high vegetation
    (``type_of_high_vegetation_<k>``: tropical evergreen broadleaf, mid-latitude broadleaf or
    mixed, boreal needleleaf; 0 without forest) and low vegetation (``type_of_low_vegetation_<k>``:
    grass, semidesert, crops, tundra, ...; 0 without). Everything is 0 over the sea except
    the ``_0`` categories, which are 1 there.
    """
    rng = np.random.default_rng([int(seed), 7933])
    blobs = latent_fields(rng, 7, 1, lat, n_lon)[:, 0]
    land = standard["land_sea_mask"] > 0.5
    height = standard["geopotential_at_surface"] / G  # m
    lat2 = np.broadcast_to(lat[:, None], land.shape)
    abs_lat = np.abs(lat2)
    sdor = np.where(land, (0.02 + 0.2 * height / 1000.0) * (0.7 + 0.3 * _sigmoid(blobs[0])), 0.0)  # km
    anor = np.where(land, 0.5 * np.pi * np.tanh(0.8 * blobs[6]), 0.0)
    forest = np.where(land, _sigmoid(1.5 * blobs[1] + 1.2 * np.exp(-((lat2 / 15.0) ** 2)) + 1.0 * np.exp(-(((abs_lat - 58.0) / 10.0) ** 2)) - 1.2), 0.0)
    forest = np.where(lat2 < -60.0, 0.0, forest)  # no forest on the ice sheet
    cvh = np.where(forest > 0.3, forest, 0.0)
    cvl = np.where(land & (lat2 >= -60.0), (1.0 - cvh) * _sigmoid(1.2 * blobs[2] + 0.5), 0.0)
    lakes = np.where(land, np.clip(blobs[3] - 1.6, 0.0, 1.0), 0.0)
    high_type = np.select(
        [cvh <= 0.0, abs_lat < 23.0, abs_lat < 40.0, abs_lat < 55.0, abs_lat >= 55.0],
        [0, 6, np.where(blobs[4] > 0, 5, 18), np.where(blobs[4] > 0, 3, 18), np.where(blobs[4] > 0, 4, np.where(blobs[4] > -0.8, 3, 19))],
    )
    low_type = np.select(
        [cvl <= 0.0, abs_lat >= 60.0, abs_lat < 15.0, abs_lat < 35.0, abs_lat < 60.0],
        [0, np.where(blobs[5] > 1.0, 13, 9), np.where(blobs[5] > 0, 7, 2), np.where(blobs[5] > 0.3, 11, np.where(blobs[5] > -0.5, 16, 10)),
         np.where(blobs[5] > 0.4, 1, np.where(blobs[5] > -0.6, 2, 17))],
    )
    out = {
        "angle_of_sub_gridscale_orography": anor,
        "anisotropy_of_sub_gridscale_orography": np.where(land, 0.15 + 0.7 * _sigmoid(blobs[0] - blobs[2]), 0.0),
        "high_vegetation_cover": cvh,
        "lake_cover": lakes,
        "lake_depth": np.where(lakes > 0, 0.005 + 0.08 * lakes, 0.0),  # km
        "low_vegetation_cover": cvl,
        "slope_of_sub_gridscale_orography": np.where(land, np.clip(0.001 + 0.08 * sdor, 0.0, 0.1), 0.0),
        **_one_hot(standard["soil_type"], SOIL_TYPES, "soil_type"),
        "standard_deviation_of_filtered_subgrid_orography": 0.6 * sdor,  # km
        "standard_deviation_of_orography": sdor,  # km
        **_one_hot(high_type, HIGH_VEGETATION_TYPES, "type_of_high_vegetation"),
        **_one_hot(low_type, LOW_VEGETATION_TYPES, "type_of_low_vegetation"),
    }
    return {name: np.asarray(out[name], dtype=np.float32) for name in V1P5_STATIC}


def check_surface_variables(surf_vars: Sequence[str] | None, variables: str = "standard") -> tuple[str, ...]:
    """The sample's surface variables (Aurora names; None: the preset's: the standard four,
    or Aurora 1.5's 26 for ``variables="v1p5"``), or a UsageError."""
    if variables not in PRESETS:
        raise UsageError(f"the sample data has no variable set {variables!r}; choose one of {', '.join(PRESETS)}")
    default = AURORA_V1P5_VARS[SURF] if variables == "v1p5" else STANDARD_SURFACE
    names = default if surf_vars is None else tuple(dict.fromkeys(surf_vars))
    unknown = [n for n in names if n not in SURFACE_VARIABLES]
    if unknown:
        raise UsageError(f"the sample data has no surface variable {unknown[0]!r}; choose from {', '.join(SURFACE_VARIABLES)}")
    return names


def _rate(step_hours: float) -> float:
    """The step in units of the latent fields' 6-hour step."""
    return float(step_hours) / 6.0


def _burn_in(steps_at_6h: int, step_hours: float) -> int:
    """Spin-up steps covering the time ``steps_at_6h`` 6-hour steps cover."""
    return int(round(steps_at_6h / _rate(step_hours)))


def _wetness(moist: np.ndarray, pressure: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Unit-spread rain potential: high where the moisture anomaly is high and the pressure low."""
    return _unit(0.6 * moist - 0.5 * pressure + 0.6 * noise)


def _rain_region(lat: np.ndarray) -> np.ndarray:
    """(1, h, 1) rain climatology factor: most in the ITCZ and the mid-latitude storm tracks."""
    phi = np.deg2rad(lat)[None, :, None]
    abs_lat = np.abs(np.rad2deg(phi))
    return 0.5 + 1.5 * np.exp(-((np.rad2deg(phi) - 5.0) / 10.0) ** 2) + 0.8 * np.exp(-(((abs_lat - 50.0) / 12.0) ** 2))


def _extra_noise(seed: int, lat: np.ndarray, n_lon: int, times: int, step_hours: float) -> np.ndarray:
    """The 3 latent fields of the optional surface variables (their own random stream)."""
    rng = np.random.default_rng([int(seed), 7919])
    return latent_fields(rng, 3, times, lat, n_lon, burn_in=_burn_in(5, step_hours), rate=_rate(step_hours))


def _cloud_cover(moist: np.ndarray, pressure: np.ndarray, noise: np.ndarray) -> np.ndarray:
    cloudy = _unit(0.7 * moist - 0.4 * pressure + 0.5 * noise)
    return np.clip(1.0 / (1.0 + np.exp(-(1.8 * cloudy + 0.45))), 0.0, 1.0)


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
    names = [n for n in names if n in EXTRA_SURFACE]
    if not names:
        return {}
    noise = _extra_noise(seed, lat, n_lon, times, step_hours)
    out: dict[str, np.ndarray] = {}
    if "tp" in names:
        wet = _wetness(moist, pressure, noise[0])
        out["total_precipitation_6hr"] = 4e-3 * (step_hours / 6.0) * _rain_region(lat) * np.maximum(wet - 0.4, 0.0) ** 1.5
    if "100u" in names or "100v" in names:
        out["100m_u_component_of_wind"] = 1.3 * ten_m_wind[0] + 0.8 * noise[1]
        out["100m_v_component_of_wind"] = 1.3 * ten_m_wind[1] + 0.8 * noise[2]
    if "tcc" in names:
        out["total_cloud_cover"] = _cloud_cover(moist, pressure, noise[0])
    return {SURFACE_VARIABLES[n]: out[SURFACE_VARIABLES[n]] for n in names if SURFACE_VARIABLES[n] in out}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def v1p5_surface_fields(seed: int, lat: np.ndarray, lon: np.ndarray, hours: np.ndarray, step_hours: float, surf: Mapping[str, np.ndarray],
                        static: Mapping[str, np.ndarray], moist: np.ndarray, pressure: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Aurora 1.5's surface fields beyond the standard four and tp/100u/100v/tcc, by WB2 name,
    (time, lat, lon), in ERA5's units; tied to the standard fields (``surf``: 2t, 10u, 10v,
    msl by WB2 name), the statics, the moisture and pressure latents and the insolation, plus
    a few latents of their own random stream (the other fields do not change when these are
    written). ``hours`` (t,): the times, hours since 1970; ``lat``/``lon``: the store's grid.

    - ``toa_incident_solar_radiation_normalized`` (insolation): exactly
      ``aurora_loop.model.insolation.insolation_numpy(hours, lat, lon)``.
    - clouds (0..1): ``low/medium/high_cloud_cover``, each a fraction of the total cloud cover
      (so never above it).
    - ``2m_dewpoint_temperature`` <= 2t (a depression of 0.5..9.5 K, large where it is dry);
      ``total_column_water_vapour`` (kg m-2) grows exponentially with the dewpoint;
      ``surface_pressure`` = msl reduced over the orography (``exp(-z_sfc / (R T))``).
    - ``skin_temperature``, ``soil_temperature_level_1`` (K): 2t plus a diurnal cycle driven
      by the insolation over land; ``volumetric_soil_water_layer_1`` (m3 m-3): 0.08..0.42 over
      land, 0 over the sea; ``sea_ice_cover`` (0..1) where the sea is colder than -1.75 C;
      ``snow_depth`` (m of water equivalent, 0..10) on cold land.
    - outputs: ``instantaneous_10m_wind_gust`` (m s-1, above the 10 m wind speed),
      ``boundary_layer_height`` (m, deepest over sunlit land); hourly accumulations (J m-2 or
      m) of the hour before each time: ``surface_solar_radiation_downwards_1hr`` (insolation
      half an hour earlier x the solar constant x a cloud transmittance),
      ``downward_uv_radiation_at_the_surface_1hr`` (about 11% of it),
      ``top_net_thermal_radiation_1hr`` (negative: the outgoing long-wave flux of the 2t
      field under high and medium clouds), ``total_precipitation_1hr`` (>= 0, mostly zero:
      the rain potential of ``total_precipitation_6hr`` at an hourly rate) and
      ``snowfall_1hr`` (the part of it falling below about 1 C).
    """
    from aurora_loop.model.insolation import insolation_numpy

    wanted = {SURFACE_VARIABLES[n] for n in names}
    if not wanted:
        return {}
    rng = np.random.default_rng([int(seed), 7927])
    noise = latent_fields(rng, 6, hours.size, lat, lon.size, burn_in=_burn_in(5, step_hours), rate=_rate(step_hours))
    extra = _extra_noise(seed, lat, lon.size, hours.size, step_hours)
    t2, msl = surf["2m_temperature"], surf["mean_sea_level_pressure"]
    wind = np.hypot(surf["10m_u_component_of_wind"], surf["10m_v_component_of_wind"])
    lsm, zs = static["land_sea_mask"][None], static["geopotential_at_surface"][None]
    phi = np.deg2rad(lat)[None, :, None]
    abs_lat = np.abs(np.rad2deg(phi))
    tropics = np.exp(-((np.rad2deg(phi) - 5.0) / 15.0) ** 2)
    insolation = insolation_numpy(hours, lat, lon)
    day = np.maximum(insolation, 0.0)
    sun_last_hour = np.maximum(insolation_numpy(hours - 0.5, lat, lon), 0.0)  # mid-point of the accumulation hour
    tcc = _cloud_cover(moist, pressure, extra[0])
    lcc = tcc * _sigmoid(0.8 + 0.8 * noise[0] - 0.5 * pressure)
    mcc = tcc * _sigmoid(-0.2 + 0.8 * noise[1] + 0.5 * moist)
    hcc = tcc * _sigmoid(-0.3 + 0.8 * noise[2] + 0.6 * moist + 0.8 * tropics)
    dry = np.exp(-(((abs_lat - 25.0) / 12.0) ** 2))
    d2m = t2 - (0.5 + 9.0 * _sigmoid(-1.5 * moist + 1.2 * dry - 0.3))
    tp_1h = 4e-3 / 6.0 * _rain_region(lat) * np.maximum(_wetness(moist, pressure, extra[0]) - 0.4, 0.0) ** 1.5
    ssrd = 1361.0 * 3600.0 * sun_last_hour * (0.82 - 0.55 * tcc)
    out = {
        "2m_dewpoint_temperature": d2m,
        "total_column_water_vapour": 1.0 + 52.0 * np.exp(0.07 * (d2m - 300.0)),
        "surface_pressure": msl * np.exp(-zs / (287.05 * t2)),
        "low_cloud_cover": lcc,
        "medium_cloud_cover": mcc,
        "high_cloud_cover": hcc,
        "skin_temperature": t2 + lsm * (12.0 * day * (1.0 - 0.6 * tcc) - 3.0) + (1.0 - lsm) * 0.8,
        "soil_temperature_level_1": t2 + lsm * (4.0 * day - 1.0) + (1.0 - lsm) * 0.8,
        "volumetric_soil_water_layer_1": lsm * (0.08 + 0.34 * _sigmoid(1.2 * moist + 0.8 * noise[3] + tropics - 0.8 * dry)),
        "sea_ice_cover": (1.0 - lsm) * np.clip((271.4 - t2) / 8.0, 0.0, 1.0),
        "snow_depth": np.clip(lsm * 0.4 * np.clip((273.15 - t2) / 10.0, 0.0, None) ** 1.5, 0.0, 10.0),
        "toa_incident_solar_radiation_normalized": insolation,
        "instantaneous_10m_wind_gust": 1.45 * wind + 1.5 + 1.5 * _softplus(noise[4]),
        "boundary_layer_height": np.clip(150.0 + 45.0 * wind + lsm * 1400.0 * day * (1.0 - 0.5 * tcc) + 120.0 * _softplus(noise[5]), 20.0, 4000.0),
        "surface_solar_radiation_downwards_1hr": ssrd,
        "downward_uv_radiation_at_the_surface_1hr": 0.11 * ssrd * (1.1 - 0.2 * tcc),
        "top_net_thermal_radiation_1hr": -3600.0 * 5.670374e-8 * (t2 - 25.0) ** 4 * (1.0 - 0.25 * hcc - 0.1 * mcc),
        "total_precipitation_1hr": tp_1h,
        "snowfall_1hr": tp_1h * np.clip((274.15 - t2) / 3.0, 0.0, 1.0),
    }
    return {k: v for k, v in out.items() if k in wanted}


def sample_dataset(grid: tuple[int, int] = (32, 64), times: int = 120, seed: int = 0, levels: Sequence[int] = DEFAULT_LEVELS, start: str = "2020-01-01T00", step_hours: int = 6, dtype: str = "float32",
                   surf_vars: Sequence[str] | None = None, variables: str = "standard") -> xr.Dataset:
    """The synthetic data as an in-memory :class:`xarray.Dataset` in the WB2 layout.

    Args:
      grid: (h, w) latitudes x longitudes; latitudes span -90..90 inclusive (ascending, as
        WB2 stores them), longitudes ``360 * j / w``.
      times: number of time steps, ``step_hours`` apart from ``start``.
      seed: all randomness comes from ``numpy.random.default_rng(seed)``.
      levels: pressure levels (hPa) of the atmospheric variables.
      dtype: "float32" or "float64" of the data variables.
      surf_vars: Aurora names of the surface variables to write (default: the preset's);
        besides 2t, 10u, 10v, msl also tp, 100u, 100v, tcc (:func:`extra_surface_fields`) and
        every other Aurora 1.5 surface variable (:func:`v1p5_surface_fields`). The standard
        fields' values do not depend on which others are written.
      variables: "standard" (2t, 10u, 10v, msl; statics lsm, z, slt) or "v1p5": Aurora 1.5's
        26 surface variables and its statics too (:func:`v1p5_static_fields`).
    """
    surf_names = check_surface_variables(surf_vars, variables)
    h, w = int(grid[0]), int(grid[1])
    if h < 2 or w < 4 or times < 1 or not levels:
        raise UsageError(f"sample data needs a grid of at least 2x4, one time and one level; got grid {h}x{w}, {times} times, levels {list(levels)}")
    if not step_hours > 0:
        raise UsageError(f"sample data needs a positive step_hours, got {step_hours}")
    levels = [int(v) for v in levels]
    rng = np.random.default_rng(seed)
    lat = np.linspace(-90.0, 90.0, h)
    lon = np.arange(w) * (360.0 / w)
    c = len(levels)
    # latents: 0 barotropic, 1..c per level, c+1 surface, c+2 moisture
    lat_fields = latent_fields(rng, c + 3, times, lat, w, burn_in=_burn_in(20, step_hours), rate=_rate(step_hours))
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
    extra = [n for n in surf_names if n in EXTRA_SURFACE]
    surf_fields.update(extra_surface_fields(seed, lat, w, times, step_hours, (surf_fields["10m_u_component_of_wind"], surf_fields["10m_v_component_of_wind"]),
                                            moist, pressure, extra))
    statics = static_fields(rng, lat, w)
    time = np.datetime64(start, "ns") + np.arange(times) * np.timedelta64(int(round(float(step_hours) * 3600)), "s")
    newer = [n for n in surf_names if n not in STANDARD_SURFACE and n not in EXTRA_SURFACE]
    if newer:
        from aurora_loop.model.batch import hours_since_epoch

        surf_fields.update(v1p5_surface_fields(seed, lat, lon, hours_since_epoch(time), step_hours, surf_fields, statics, moist, pressure, newer))
    if variables == "v1p5":
        statics.update(v1p5_static_fields(seed, lat, w, statics))
    wanted = [SURFACE_VARIABLES[n] for n in surf_names]
    for name in [k for k in surf_anomalies if k in wanted] + [k for k in wanted if k not in surf_anomalies]:
        data[name] = (("time", "latitude", "longitude"), surf_fields[name])
    for name, field in statics.items():
        data[name] = (("latitude", "longitude"), field)
    data = {k: (dims, np.asarray(v, dtype=dtype)) for k, (dims, v) in data.items()}
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
    # Aurora 1.5's: CF units, except the sub-grid orography and lake depth, written in km.
    units.update({name: CF_METADATA[name][0] for name in ds.data_vars if name not in units and name in CF_METADATA})
    units.update({name: "km" for name in ("standard_deviation_of_orography", "standard_deviation_of_filtered_subgrid_orography", "lake_depth") if variables == "v1p5"})
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
    variables: str = "standard",
) -> str:
    """Write a synthetic WB2-layout store (see the module docstring) and return its path.

    ``times`` steps of ``step_hours`` from 2020-01-01 00 UTC; all 9 WB2 dynamic variables
    (surface: 2m_temperature K, 10m_u/v_component_of_wind m/s, mean_sea_level_pressure Pa;
    atmospheric on ``levels`` hPa: geopotential m2/s2, u/v_component_of_wind m/s,
    temperature K, specific_humidity kg/kg) and 3 static ones (land_sea_mask,
    geopotential_at_surface, soil_type). Same (grid, times, seed, levels) -> same values.
    ``surf_vars`` (Aurora names) picks the surface variables instead: any of the standard four
    and ``tp`` (total_precipitation_6hr, m), ``100u`` / ``100v`` (100 m wind, m/s) and ``tcc``
    (total_cloud_cover, 0..1) and any other Aurora 1.5 surface variable; ``variables="v1p5"``
    writes all of Aurora 1.5's surface and static variables; see :func:`sample_dataset`.
    """
    ds = sample_dataset(grid=grid, times=times, seed=seed, levels=levels, step_hours=step_hours, dtype=dtype, surf_vars=surf_vars, variables=variables)
    return write_store(ds, path, zarr_format=zarr_format, chunks=chunks, overwrite=overwrite)
