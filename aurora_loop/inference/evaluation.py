"""WeatherBench2 scores of a forecast store against the truth, with persistence and climatology.

Definitions (WeatherBench2, Rasp et al. 2024), for one variable at one level and lead time,
over initial times i = 1..I with forecasts f_i and truths o_i on an (h, w) grid, and the
area weights w_j of latitude row j (:func:`area_weights`, mean 1):

- spatial mean: <x> = mean over (j, k) of w_j * x_jk;
- RMSE = sqrt( mean_i <(f_i - o_i)^2> )  (the root is taken after averaging over init times);
- bias = mean_i <f_i - o_i>;
- ACC = mean_i  <f'_i o'_i> / sqrt(<f'_i^2> <o'_i^2>),  with anomalies f' = f - c, o' = o - c
  from the climatology c at the valid time (uncentred, as WB2; ACC is undefined (NaN) for
  the climatology itself).

Baselines: **persistence** forecasts the truth at the initial time for every lead;
**climatology** forecasts c at the valid time. The climatology (:class:`Climatology`) is
the mean of the truth over a climatology period (default: the truth's times before the first
initial time, i.e. the training period of a run validated on later times; all of its times
when fewer than ``MIN_CLIMATOLOGY_TIMES`` lie before it). A period of at least a year gives
a day-of-year x hour-of-day climatology (each (day, hour) averaged over a +-15-day window, as
WB2's climatologies are smoothed); a shorter one gives the time-mean (a seasonal cycle cannot
be estimated from it). Ensemble truths: the forecast's ``member`` is the truth; the
climatology averages all members.

Pairs (init, lead) whose valid time is not in the truth store are left out (``count`` tells
how many initial times each score averages).

Grid points are matched by their coordinates (:func:`match_grid`): the forecast's latitudes
and longitudes must be the truth's (or some of them) up to float32 rounding; another grid is
an error, not a silent match by position.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from aurora_loop.datasets.layout import LAT_DIMS, LEVEL_DIMS, LON_DIMS, MEMBER_DIMS
from aurora_loop.datasets.storage import is_remote
from aurora_loop.datasets.store import open_zarr_dataset
from aurora_loop.errors import UsageError

BASELINES = ("persistence", "climatology")
MIN_CLIMATOLOGY_TIMES = 4
SMOOTHING_DAYS = 15


# --- scores (pure numpy) ---------------------------------------------------------------------

def area_weights(lat: Any) -> np.ndarray:
    """WB2 area weights of latitude rows (degrees, either order, the grid may be cropped):
    the area of each row's band between midpoints, normalised to mean 1. Shape (h,), float64.
    Wraps :func:`aurora_loop.weather.metrics.latitude_weights`."""
    from aurora_loop.weather.metrics import latitude_weights

    weights = np.asarray(latitude_weights(np.asarray(lat, np.float64)), np.float64)
    return weights / weights.mean()


def spatial_mean(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Area-weighted mean over the last two axes (lat, lon): x (..., h, w), weights (h,) -> (...)."""
    return np.mean(x * weights[:, None], axis=(-2, -1))


def _mean_over_inits(per_init: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean over axis 0 ignoring NaNs (missing truth), count of non-NaN entries)."""
    count = np.sum(~np.isnan(per_init), axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN
        return np.nanmean(per_init, axis=0), count


def rmse(forecast: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """WB2 RMSE: sqrt(mean over init times of the area-weighted MSE).

    forecast, truth: (I, ..., h, w) (I initial times first; NaN truth = missing); weights (h,).
    Returns (...) (e.g. (L,) per lead time), in the variable's units.
    """
    mse, _ = _mean_over_inits(spatial_mean((forecast - truth) ** 2, weights))
    return np.sqrt(mse)


def bias(forecast: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """WB2 bias: mean over init times of the area-weighted mean of forecast - truth. Shapes as :func:`rmse`."""
    return _mean_over_inits(spatial_mean(forecast - truth, weights))[0]


def acc(forecast: np.ndarray, truth: np.ndarray, climatology: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """WB2 anomaly correlation: mean over init times of the area-weighted correlation of
    (forecast - climatology) and (truth - climatology) (uncentred). Shapes as :func:`rmse`;
    ``climatology`` broadcasts against them. NaN where an anomaly is identically zero."""
    fa, oa = forecast - climatology, truth - climatology
    with np.errstate(invalid="ignore", divide="ignore"):
        per_init = spatial_mean(fa * oa, weights) / np.sqrt(spatial_mean(fa**2, weights) * spatial_mean(oa**2, weights))
    return _mean_over_inits(per_init)[0]


def ensemble_crps(members: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Fair CRPS of an ensemble (as :func:`aurora_loop.weather.crps.fair_crps`, WB2's ``CRPS`` with the
    unbiased spread term): members (M, I, ..., h, w), truth (I, ..., h, w) -> (...) per lead,
    mean over init times of the area-weighted mean, in the variable's units."""
    m = members.shape[0]
    skill = np.mean(np.abs(members - truth[None]), axis=0)
    ranked = np.sort(members, axis=0)
    coeff = (2 * np.arange(m) - m + 1).reshape((m,) + (1,) * (members.ndim - 1))
    spread = 2 * np.sum(coeff * ranked, axis=0) / (2 * m * (m - 1))
    return _mean_over_inits(spatial_mean(skill - spread, weights))[0]


def spread_skill_ratio(members: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sqrt((M + 1) / M) * sqrt(mean ensemble variance / mean squared error of the ensemble
    mean): 1 for a calibrated ensemble (:func:`aurora_loop.weather.crps.spread_skill_ratio`)."""
    m = members.shape[0]
    variance = _mean_over_inits(spatial_mean(np.var(members, axis=0, ddof=1), weights))[0]
    mse = _mean_over_inits(spatial_mean((members.mean(axis=0) - truth) ** 2, weights))[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt((m + 1) / m) * np.sqrt(variance / mse)


# --- reading and aligning --------------------------------------------------------------------

def _rename_dims(ds: xr.Dataset) -> xr.Dataset:
    renames = {}
    for names, canonical in ((LAT_DIMS, "latitude"), (LON_DIMS, "longitude"), (LEVEL_DIMS, "level"), (MEMBER_DIMS, "number")):
        for name in names:
            if name != canonical and (name in ds.dims or name in ds.coords):
                renames[name] = canonical
                break
    return ds.rename(renames) if renames else ds


def standardise(ds: xr.Dataset, path: str) -> xr.Dataset:
    """WB2 names for dims, latitude ascending, longitude in [0, 360) ascending."""
    ds = _rename_dims(ds)
    for dim in ("latitude", "longitude"):
        if dim not in ds.coords:
            raise UsageError(f"{path} has no {dim} coordinate; write it in the WeatherBench2 layout (aurora-loop convert does)")
    ds = ds.assign_coords(longitude=np.mod(ds["longitude"].values, 360.0))
    return ds.sortby(["latitude", "longitude"])


def open_store(path: str, role: str, storage_options: dict[str, Any] | None = None, cache_dir: str | None = None) -> xr.Dataset:
    """Open a Zarr store (a local path, or a URL: see :mod:`aurora_loop.datasets.storage`)
    lazily (dask-free) with xarray, standardised; UsageError if unreadable."""
    if is_remote(path):
        return standardise(open_zarr_dataset(path, storage_options, cache_dir), path)
    if not os.path.exists(path):
        raise UsageError(f"{role} store {path} does not exist; pass the path of a Zarr store")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = xr.open_zarr(path, chunks=None)
    except Exception as err:  # noqa: BLE001 - zarr/xarray raise many kinds for "not a store"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"{role} store {path} is not a readable Zarr store ({first})") from None
    return standardise(ds, path)


def _time_index(times: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index of each ``wanted`` time in sorted ``times``, -1 where absent. Shapes: wanted (...)."""
    pos = np.clip(np.searchsorted(times, wanted), 0, max(times.size - 1, 0))
    return np.where(times[pos] == wanted, pos, -1)


@dataclasses.dataclass
class Climatology:
    """The truth's climatology of one variable (see the module docstring).

    Attributes:
      field: the truth DataArray (time, [level,] latitude, longitude), members averaged lazily.
      period: (first, last) datetime64 of the times averaged.
      kind: "time-mean" or "dayofyear-hour".
    """

    field: xr.DataArray
    period: tuple[np.datetime64, np.datetime64]
    kind: str
    _cache: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, field: xr.DataArray, period: tuple[np.datetime64, np.datetime64]) -> Climatology:
        span = (period[1] - period[0]) / np.timedelta64(1, "D")
        return cls(field=field, period=period, kind="dayofyear-hour" if span >= 364 else "time-mean")

    def _mean(self, index: np.ndarray) -> np.ndarray:
        values = self.field.isel(time=index).values.astype(np.float64)
        axes = (0,) + ((self.field.dims.index("number"),) if "number" in self.field.dims else ())
        return values.mean(axis=axes)

    def _times(self) -> np.ndarray:
        times = self.field["time"].values
        return np.nonzero((times >= self.period[0]) & (times <= self.period[1]))[0]

    def at(self, valid: np.ndarray) -> np.ndarray:
        """The climatology at ``valid`` times (any shape S) -> S + ([c,] h, w), float64."""
        valid = np.asarray(valid, "datetime64[ns]")
        index = self._times()
        if self.kind == "time-mean":
            if "all" not in self._cache:
                self._cache["all"] = self._mean(index)
            return np.broadcast_to(self._cache["all"], valid.shape + self._cache["all"].shape)
        times = self.field["time"].values[index]
        doy = _day_of_year(times)
        hour = _hour(times)
        out = None
        for pos, t in np.ndenumerate(valid):
            key = (int(_day_of_year(t)), int(_hour(t)))
            if key not in self._cache:
                distance = np.abs(doy - key[0])
                distance = np.minimum(distance, 366 - distance)
                pick = index[(distance <= SMOOTHING_DAYS) & (hour == key[1])]
                self._cache[key] = self._mean(pick if pick.size else index)
            value = self._cache[key]
            if out is None:
                out = np.empty(valid.shape + value.shape)
            out[pos] = value
        return out

    def describe(self) -> str:
        return f"{self.kind} of the truth from {str(self.period[0])[:16]} to {str(self.period[1])[:16]}"


def _day_of_year(t: np.ndarray) -> np.ndarray:
    t = np.asarray(t, "datetime64[ns]")
    return (t.astype("datetime64[D]") - t.astype("datetime64[Y]")).astype(np.int64) + 1


def _hour(t: np.ndarray) -> np.ndarray:
    t = np.asarray(t, "datetime64[ns]")
    return ((t - t.astype("datetime64[D]")) / np.timedelta64(1, "h")).astype(np.int64)


def climatology_period(truth_times: np.ndarray, first_init: np.datetime64, period: Sequence[str] | None = None) -> tuple[np.datetime64, np.datetime64]:
    """The climatology period: ``period`` (ISO start, end) if given; else the truth times before
    ``first_init`` (at least ``MIN_CLIMATOLOGY_TIMES`` of them), else all truth times."""
    if period:
        try:
            lo, hi = (np.datetime64(p.strip(), "ns") for p in period)
        except ValueError:
            raise UsageError(f"--climatology_period {','.join(period)}: write START,END as ISO times, e.g. 2020-01-01,2020-01-20") from None
        if not np.any((truth_times >= lo) & (truth_times <= hi)):
            raise UsageError(f"--climatology_period {','.join(period)} holds no time of the truth store ({truth_times[0]} to {truth_times[-1]})")
        return lo, hi
    before = truth_times[truth_times < first_init]
    if before.size >= MIN_CLIMATOLOGY_TIMES:
        return before[0], before[-1]
    return truth_times[0], truth_times[-1]


# --- evaluation ------------------------------------------------------------------------------

ENSEMBLE_METRICS = ("crps", "spread_skill")  # scored for a forecast with a ``number`` (member) dim


@dataclasses.dataclass
class FieldScores:
    """Scores of one variable at one level (``level`` None for surface variables).

    ``scores[model][metric]``: (L,) per lead time, metric in rmse / bias / acc (of the
    ensemble mean for an ensemble forecast, which also gets crps / spread_skill);
    ``count``: (L,) initial times scored per lead; ``mean_error``: (L, h, w) forecast - truth
    averaged over initial times (the forecast only), for error maps.
    """

    variable: str
    level: int | None
    units: str
    scores: dict[str, dict[str, np.ndarray]]
    count: np.ndarray
    mean_error: np.ndarray

    @property
    def label(self) -> str:
        return self.variable if self.level is None else f"{self.variable} {self.level} hPa"


@dataclasses.dataclass
class Evaluation:
    """Everything :func:`evaluate` computed. ``leads``: (L,) timedelta64; ``lat``/``lon``: (h,)/(w,)."""

    model: str
    forecast_path: str
    truth_path: str
    leads: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    fields: list[FieldScores]
    climatology: str
    init_times: np.ndarray
    grid_note: str = ""  # one line when the grids matched within rounding only (GridMatch.note)

    @property
    def lead_hours(self) -> np.ndarray:
        return self.leads / np.timedelta64(1, "h")

    def rows(self) -> list[dict[str, Any]]:
        """The table: one row per (model, variable, level, lead)."""
        out = []
        for field in self.fields:
            for model, metrics in field.scores.items():
                for k, hours in enumerate(self.lead_hours):
                    out.append({
                        "model": model,
                        "variable": field.variable,
                        "level": field.level,
                        "units": field.units,
                        "lead_hours": float(hours),
                        "rmse": _finite(metrics["rmse"][k]),
                        "bias": _finite(metrics["bias"][k]),
                        "acc": _finite(metrics["acc"][k]),
                        "count": int(field.count[k]),
                        **{name: _finite(metrics[name][k]) for name in ENSEMBLE_METRICS if name in metrics},
                    })
        return out


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _gather(read: np.ndarray, slot: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Truth fields by store time index: ``read`` (T', h, w) holds the times read, ``slot`` maps a
    store time index to its row in ``read``; ``index`` (...) of store time indices (-1 = missing)
    -> (..., h, w), NaN where missing."""
    out = np.full(index.shape + read.shape[1:], np.nan)
    ok = index >= 0
    out[ok] = read[slot[index[ok]]]
    return out


def _truth_variable(truth: xr.Dataset, name: str, forecast_var: xr.DataArray, truth_path: str) -> xr.DataArray:
    for candidate in (name, forecast_var.attrs.get("source_name"), forecast_var.attrs.get("aurora_name")):
        if candidate and candidate in truth.data_vars:
            field = truth[candidate]
            extra = set(map(str, field.dims)) - {"time", "level", "latitude", "longitude", "number"}
            if extra or "time" not in field.dims:
                raise UsageError(f"{candidate!r} in the truth store {truth_path} has dims {tuple(map(str, field.dims))}; the truth must be (time, [level,] latitude, longitude), e.g. the store the forecast started from")
            return field
    raise UsageError(f"variable {name!r} of the forecast is not in the truth store {truth_path} (it has {', '.join(sorted(map(str, truth.data_vars)))}); score a truth store with the same variables or pass --variables")


@dataclasses.dataclass
class GridMatch:
    """Where the forecast's grid points lie in the truth store.

    Attributes:
      rows: (h,) the truth's latitude index of each forecast latitude.
      cols: (w,) the truth's longitude index of each forecast longitude.
      largest: the largest difference between matched coordinates, degrees (0: the same labels).
    """

    rows: np.ndarray
    cols: np.ndarray
    largest: float

    def note(self) -> str:
        """One line for the user when the labels differ within rounding; "" when they are equal."""
        if self.largest == 0:
            return ""
        return (f"grid: the forecast's latitudes/longitudes differ from the truth's by up to {self.largest:.2g} degrees "
                "(float32 rounding); matched them point by point")


def match_grid(fc: xr.Dataset, truth: xr.Dataset, truth_path: str) -> GridMatch:
    """Match the forecast's latitudes and longitudes (both standardised) to the truth's.

    Every forecast coordinate must equal a truth coordinate up to float32 rounding (e.g. a
    forecast written with float32 copies of the grid); the forecast may cover part of the
    truth's grid (a cropped row, a region). Anything further apart is another grid, and
    matching positions would score the wrong points: a one-line UsageError.
    """
    from aurora_loop.datasets.layout import float32_rounding, nearest

    found = {}
    for dim in ("latitude", "longitude"):
        want, have = fc[dim].values, truth[dim].values
        index, distance = nearest(have, want)
        far = distance > float32_rounding(want)
        if np.any(far):
            i = int(np.argmax(distance))
            raise UsageError(
                f"the forecast's {dim}s are not the truth store {truth_path}'s: {dim} {float(want[i]):.8g} of the forecast is "
                f"{float(distance[i]):.3g} degrees from the nearest truth {dim} ({float(have[index[i]]):.8g}), more than rounding; "
                "score against the store the forecast was made from, or regrid one onto the other"
            )
        found[dim] = (index, float(distance.max(initial=0.0)))
    return GridMatch(rows=found["latitude"][0], cols=found["longitude"][0], largest=max(found["latitude"][1], found["longitude"][1]))


def evaluate(
    forecast_path: str,
    truth_path: str,
    baselines: Sequence[str] = BASELINES,
    period: Sequence[str] | None = None,
    variables: Sequence[str] | None = None,
    levels: Sequence[int] | None = None,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | None = None,
) -> Evaluation:
    """Score the forecast store ``forecast_path`` (WB2 forecast layout, e.g. written by
    ``aurora-loop forecast``) against the truth store ``truth_path`` (WB2 layout: time, [level,]
    latitude, longitude), with the ``baselines``. See the module docstring for definitions.

    ``variables``: WB2 names to score (default: all of the forecast's); ``levels``: hPa levels
    (default: all); ``period``: the climatology period (ISO start, end). ``storage_options``,
    ``cache_dir``: for stores in object storage (the truth, or the forecast).
    """
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise UsageError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")
    fc = open_store(forecast_path, "forecast", storage_options, cache_dir)
    truth = open_store(truth_path, "truth", storage_options, cache_dir)
    for dim in ("time", "prediction_timedelta"):
        if dim not in fc.dims:
            raise UsageError(f"{forecast_path} has no {dim!r} dim; pass a forecast in the WeatherBench2 layout (aurora-loop forecast writes one)")
    if "time" not in truth.dims:
        raise UsageError(f"the truth store {truth_path} has no 'time' dim; pass a WeatherBench2-layout store")
    truth = truth.sortby("time")
    member = int(fc.attrs.get("member", 0))
    if "number" in truth.dims and not 0 <= member < truth.sizes["number"]:
        raise UsageError(f"the forecast started from member {member}, but {truth_path} holds {truth.sizes['number']} members; pass the store it was made from")
    names = [str(n) for n in fc.data_vars if {"time", "prediction_timedelta"} <= set(fc[n].dims)]
    if variables:
        missing = [v for v in variables if v not in names]
        if missing:
            raise UsageError(f"--variables {missing[0]} is not in the forecast (it has {', '.join(names)})")
        names = [n for n in names if n in variables]
    if not names:
        raise UsageError(f"{forecast_path} holds no forecast variables with dims (time, prediction_timedelta, ...)")

    init = fc["time"].values.astype("datetime64[ns]")
    leads = fc["prediction_timedelta"].values.astype("timedelta64[ns]")
    lat, lon = fc["latitude"].values, fc["longitude"].values
    weights = area_weights(lat)
    grid = match_grid(fc, truth, truth_path)
    truth_times = truth["time"].values.astype("datetime64[ns]")
    valid_index = _time_index(truth_times, init[:, None] + leads[None, :])  # (I, L)
    init_index = _time_index(truth_times, init)  # (I,)
    if np.all(valid_index < 0):
        raise UsageError(f"no valid time of the forecast ({init[0] + leads[0]} ...) is in the truth store {truth_path} ({truth_times[0]} to {truth_times[-1]}); pass the store holding those times")
    clim_period = climatology_period(truth_times, init.min(), period)
    fields, clim_text = [], ""
    model = str(fc.attrs.get("model", "forecast"))
    for name in names:
        var = fc[name]
        tvar = _truth_variable(truth, name, var, truth_path).isel(latitude=grid.rows, longitude=grid.cols)
        has_level = "level" in var.dims
        field_levels = [int(v) for v in var["level"].values] if has_level else [None]
        if levels and has_level:
            field_levels = [lv for lv in field_levels if lv in levels]
        for level in field_levels:
            f = var.sel(level=level) if has_level else var
            if has_level and "level" not in tvar.dims:
                raise UsageError(f"{name!r} in the truth store {truth_path} has no level dim; pass a truth store with pressure levels")
            if has_level and level not in [int(v) for v in tvar["level"].values]:
                raise UsageError(f"level {level} hPa of {name!r} is not in the truth store {truth_path}; pass --levels from those it has")
            t = tvar.sel(level=level) if has_level else tvar
            clim = Climatology.of(t, clim_period)
            clim_text = clim.describe()
            member_t = t.isel(number=member) if "number" in t.dims else t
            ensemble = None
            if "number" in f.dims:  # an ensemble forecast: its mean is scored, and CRPS and spread/skill added
                ensemble = f.transpose("number", "time", "prediction_timedelta", "latitude", "longitude").values.astype(np.float64)
                f = f.mean("number")
            f = f.transpose("time", "prediction_timedelta", "latitude", "longitude").values.astype(np.float64)
            needed = np.unique(np.concatenate([valid_index[valid_index >= 0], init_index[init_index >= 0]]))
            read = member_t.transpose("time", "latitude", "longitude").isel(time=needed).values.astype(np.float64)
            slot = np.full(truth_times.size, -1)
            slot[needed] = np.arange(needed.size)

            o = _gather(read, slot, valid_index)  # (I, L, h, w)
            c = clim.at(init[:, None] + leads[None, :])  # (I, L, h, w)
            candidates = {model: f}
            if "persistence" in baselines:
                candidates["persistence"] = np.broadcast_to(_gather(read, slot, init_index)[:, None], o.shape)
            if "climatology" in baselines:
                candidates["climatology"] = c
            scores = {m: {"rmse": rmse(x, o, weights), "bias": bias(x, o, weights), "acc": acc(x, o, c, weights)} for m, x in candidates.items()}
            if ensemble is not None and ensemble.shape[0] >= 2:
                scores[model].update(crps=ensemble_crps(ensemble, o, weights), spread_skill=spread_skill_ratio(ensemble, o, weights))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean_error = np.nanmean(f - o, axis=0)
            fields.append(FieldScores(name, level, str(var.attrs.get("units", "")), scores, np.sum(~np.isnan(o[..., 0, 0]), axis=0), mean_error))
    return Evaluation(model=model, forecast_path=os.path.abspath(forecast_path), truth_path=os.path.abspath(truth_path), leads=leads,
                      lat=lat, lon=lon, fields=fields, climatology=clim_text, init_times=init, grid_note=grid.note())
