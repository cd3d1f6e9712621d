"""WeatherBench2 scores: hand-computed values on small arrays, the climatology, and
``evaluate`` on real Zarr stores with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import xarray as xr

from aurora_loop.cli.tools import main as tool_main
from aurora_loop.inference.evaluation import Climatology, acc, area_weights, bias, climatology_period, evaluate, rmse

# Rows at 60N and 0N (a cropped grid, 60 degrees apart): bands 90..30 and 30..-30 have areas
# sin 90 - sin 30 = 1/2 and sin 30 - sin(-30) = 1, so the mean-1 weights are 2/3 and 4/3.
LAT = np.array([60.0, 0.0])
W = np.array([2 / 3, 4 / 3])


def test_area_weights_on_cropped_grids():
    np.testing.assert_allclose(area_weights(LAT), W, rtol=1e-6)
    np.testing.assert_allclose(area_weights(LAT[::-1]), W[::-1], rtol=1e-6)  # either order
    # Three rows 30 degrees apart from 60N: band edges 75, 45, 15, -15.
    s = np.sin(np.deg2rad([75.0, 45.0, 15.0, -15.0]))
    bands = -np.diff(s)
    np.testing.assert_allclose(area_weights([60.0, 30.0, 0.0]), bands / bands.mean(), rtol=1e-5)
    # A global grid including the poles: the polar rows get half bands.
    lat = np.linspace(90, -90, 7)
    edges = np.clip(np.array([90, 75, 45, 15, -15, -45, -75, -90.0]), -90, 90)
    bands = -np.diff(np.sin(np.deg2rad(edges)))
    np.testing.assert_allclose(area_weights(lat), bands / bands.mean(), rtol=1e-5)


def test_rmse_and_bias_by_hand():
    truth = np.zeros((2, 1, 2, 2))
    forecast = np.array([[[[1.0, -1.0], [2.0, 0.0]]], [[[0.0, 0.0], [1.0, 1.0]]]])
    # weighted MSE per init: (2/3 * 2 + 4/3 * 4) / 4 = 5/3 and (4/3 * 2) / 4 = 2/3
    np.testing.assert_allclose(rmse(forecast, truth, W), [math.sqrt((5 / 3 + 2 / 3) / 2)])
    # weighted mean error per init: (4/3 * 2) / 4 = 2/3 both times
    np.testing.assert_allclose(bias(forecast, truth, W), [2 / 3])
    # The root comes after the mean over init times (not a mean of per-init RMSEs).
    assert not np.isclose(rmse(forecast, truth, W)[0], (math.sqrt(5 / 3) + math.sqrt(2 / 3)) / 2)
    # A missing truth (NaN) drops that init time from the average.
    truth_missing = truth.copy()
    truth_missing[1] = np.nan
    np.testing.assert_allclose(rmse(forecast, truth_missing, W), [math.sqrt(5 / 3)])


def test_acc_by_hand():
    clim = np.full((2, 1, 2, 2), 5.0)
    forecast = clim + np.array([[[[1.0, 0.0], [0.0, 1.0]]], [[[1.0, 2.0], [0.0, -1.0]]]])
    truth = clim + np.array([[[[1.0, 0.0], [0.0, -1.0]]], [[[1.0, 2.0], [0.0, -1.0]]]])
    # init 0: sum w f'o' = 2/3 - 4/3 = -2/3, sum w f'^2 = sum w o'^2 = 2 -> -1/3; init 1: f' = o' -> 1
    np.testing.assert_allclose(acc(forecast, truth, clim, W), [(-1 / 3 + 1) / 2])
    # The climatology itself has no anomaly: ACC undefined.
    assert np.isnan(acc(clim, truth, clim, W)[0])


def _series(times: np.ndarray, values: np.ndarray) -> xr.DataArray:
    data = np.broadcast_to(values[:, None, None], (times.size, 2, 3)).astype(np.float32)
    return xr.DataArray(data, dims=("time", "latitude", "longitude"), coords={"time": times})


def test_climatology_day_of_year_and_hour_for_long_stores():
    times = np.arange(np.datetime64("2019-01-01T00", "ns"), np.datetime64("2021-01-01T00", "ns"), np.timedelta64(12, "h"))
    months = times.astype("datetime64[M]").astype(int) % 12 + 1
    hours = (times - times.astype("datetime64[D]")) / np.timedelta64(1, "h")
    values = hours + 1000.0 * np.isin(months, (6, 7, 8))  # a diurnal and a seasonal signal
    clim = Climatology.of(_series(times, values), (times[0], times[-1]))
    assert clim.kind == "dayofyear-hour"
    valid = np.array(["2021-07-16T00", "2021-01-16T12", "2021-04-01T12"], dtype="datetime64[ns]")
    out = clim.at(valid)
    assert out.shape == (3, 2, 3)
    np.testing.assert_allclose(out[:, 0, 0], [1000.0, 12.0, 12.0])


def test_climatology_time_mean_for_short_stores_and_its_period():
    times = np.arange(np.datetime64("2020-01-01T00", "ns"), np.datetime64("2020-01-11T00", "ns"), np.timedelta64(6, "h"))
    values = np.arange(times.size, dtype=np.float64)
    period = climatology_period(times, times[20])
    assert period == (times[0], times[19])  # the times before the first init
    clim = Climatology.of(_series(times, values), period)
    assert clim.kind == "time-mean"
    np.testing.assert_allclose(clim.at(times[30:32])[:, 1, 2], [9.5, 9.5])  # mean of 0..19
    assert climatology_period(times, times[2]) == (times[0], times[-1])  # too few before: all
    assert climatology_period(times, times[2], ["2020-01-02", "2020-01-03"]) == (np.datetime64("2020-01-02", "ns"), np.datetime64("2020-01-03", "ns"))


@pytest.fixture(scope="module")
def truth_store(tmp_path_factory):
    from aurora_loop.datasets.sample_data import write_sample_store

    path = tmp_path_factory.mktemp("truth") / "truth.zarr"
    write_sample_store(str(path), grid=(8, 16), times=20, levels=(500, 850))
    return str(path)


def _shifted_forecast(truth_path: str, out: str, inits: slice, delta: float, lat: np.ndarray | None = None) -> xr.Dataset:
    """A WB2-layout forecast (latitude descending, to test orientation) = truth + delta;
    ``lat``: its latitude labels (ascending; default the truth's)."""
    truth = xr.open_zarr(truth_path)
    init = truth.time.values[inits]
    leads = np.array([6, 12], dtype="timedelta64[h]").astype("timedelta64[ns]")
    data = {}
    for name in ("2m_temperature", "geopotential"):
        var = truth[name]
        frames = []
        for t in init:
            steps = [var.sel(time=t + lead).values if t + lead in truth.time.values else np.zeros(var.shape[1:], np.float32) for lead in leads]
            frames.append(np.stack(steps))
        dims = ("time", "prediction_timedelta") + var.dims[1:]
        values = np.stack(frames) + np.float32(delta)
        data[name] = (dims, values[..., ::-1, :], {"units": var.attrs["units"]})
    ds = xr.Dataset(data, coords={"time": init, "prediction_timedelta": leads, "level": truth.level.values,
                                  "latitude": (truth.latitude.values if lat is None else lat)[::-1], "longitude": truth.longitude.values},
                    attrs={"model": "shifted", "member": 0})
    ds.to_zarr(out, mode="w", zarr_format=2)
    return ds


def test_evaluate_known_answers(truth_store, tmp_path):
    fc_path = str(tmp_path / "fc.zarr")
    _shifted_forecast(truth_store, fc_path, slice(5, 9), delta=2.0)
    result = evaluate(fc_path, truth_store)
    labels = [f.label for f in result.fields]
    assert labels == ["2m_temperature", "geopotential 500 hPa", "geopotential 850 hPa"]
    truth = xr.open_zarr(truth_store)
    weights = area_weights(truth.latitude.values)
    for field in result.fields:
        s = field.scores["shifted"]
        np.testing.assert_allclose(s["rmse"], [2.0, 2.0], rtol=1e-4)  # weights have mean 1
        np.testing.assert_allclose(s["bias"], [2.0, 2.0], rtol=1e-4)
        np.testing.assert_allclose(field.mean_error, 2.0, rtol=1e-4)
        # Persistence by hand: the truth at init time vs the truth 6 h / 12 h later.
        var = truth[field.variable] if field.level is None else truth[field.variable].sel(level=field.level)
        x = var.values.astype(np.float64)
        for k, lag in enumerate((1, 2)):
            mse = [np.mean((x[i] - x[i + lag]) ** 2 * weights[:, None]) for i in range(5, 9)]
            assert field.scores["persistence"]["rmse"][k] == pytest.approx(math.sqrt(np.mean(mse)), rel=1e-5)
        # Climatology: the time-mean of the 5 truth times before the first init.
        clim = x[:5].mean(axis=0)
        mse = [np.mean((clim - x[i + 1]) ** 2 * weights[:, None]) for i in range(5, 9)]
        assert field.scores["climatology"]["rmse"][0] == pytest.approx(math.sqrt(np.mean(mse)), rel=1e-5)
        assert np.isnan(field.scores["climatology"]["acc"]).all()
        # ACC by hand: anomalies of forecast (truth + 2) and truth w.r.t. that climatology.
        for k, lag in enumerate((1, 2)):
            per_init = []
            for i in range(5, 9):
                o = x[i + lag] - clim
                f = o + 2.0
                w = weights[:, None]
                per_init.append(np.sum(w * f * o) / math.sqrt(np.sum(w * f * f) * np.sum(w * o * o)))
            assert s["acc"][k] == pytest.approx(np.mean(per_init), rel=1e-5)
        assert list(field.count) == [4, 4]


def test_evaluate_skips_valid_times_past_the_truth(truth_store, tmp_path):
    fc_path = str(tmp_path / "fc_end.zarr")
    _shifted_forecast(truth_store, fc_path, slice(17, 20), delta=-1.0)  # +12 h of the last two inits is past the end
    result = evaluate(fc_path, truth_store, baselines=["persistence"], variables=["2m_temperature"])
    (field,) = result.fields
    assert list(field.count) == [2, 1]
    assert set(field.scores) == {"shifted", "persistence"}
    np.testing.assert_allclose(field.scores["shifted"]["bias"], [-1.0, -1.0], rtol=1e-4)


def test_evaluate_cli_writes_tables_and_plots(truth_store, tmp_path, capsys):
    fc_path = str(tmp_path / "fc.zarr")
    _shifted_forecast(truth_store, fc_path, slice(5, 9), delta=2.0)
    out = tmp_path / "report"
    assert tool_main(["evaluate", fc_path, "--truth", truth_store, "--out", str(out), "--leads", "12"]) == 0
    printed = capsys.readouterr().out
    assert "geopotential 500 hPa" in printed and "rmse:persistence" in printed and "12h" in printed
    rows = json.loads((out / "scores.json").read_text())["rows"]
    assert len(rows) == 3 * 3 * 2  # models x fields x leads
    csv_lines = (out / "scores.csv").read_text().splitlines()
    assert csv_lines[0] == "model,variable,level,units,lead_hours,rmse,bias,acc,count" and len(csv_lines) == 19
    for name in ("rmse.png", "acc.png", "bias.png", "error_map_12h.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_matches_coordinates_within_float32_rounding_and_says_so(truth_store, tmp_path, capsys):
    """A forecast whose latitudes went through float32 (as aurora-loop forecast wrote them
    before) is matched to the truth's rows, and the report says so in one line."""
    lat = xr.open_zarr(truth_store).latitude.values
    rounded = lat.astype(np.float32).astype(np.float64)
    assert np.any(rounded != lat)  # the 8-row grid's latitudes are not float32 numbers
    fc_path = str(tmp_path / "fc32.zarr")
    _shifted_forecast(truth_store, fc_path, slice(5, 9), delta=2.0, lat=rounded)
    assert tool_main(["evaluate", fc_path, "--truth", truth_store, "--out", str(tmp_path / "report"), "--no-plots"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("grid:")]
    assert len(notes) == 1 and "float32 rounding" in notes[0] and "matched them" in notes[0], notes
    rows = json.loads((tmp_path / "report" / "scores.json").read_text())["rows"]
    assert all(r["rmse"] == pytest.approx(2.0, rel=1e-4) for r in rows if r["model"] == "shifted")


def test_evaluate_refuses_another_grid_and_writes_nothing(truth_store, tmp_path, capsys):
    """Latitudes 0.01 degrees off are another grid: one line, exit 2, the old report untouched."""
    lat = xr.open_zarr(truth_store).latitude.values
    fc_path = str(tmp_path / "moved.zarr")
    _shifted_forecast(truth_store, fc_path, slice(5, 9), delta=2.0, lat=lat + np.r_[0.0, np.full(lat.size - 1, -0.01)])
    report = tmp_path / "report"
    report.mkdir()
    (report / "scores.csv").write_text("earlier\n")
    assert tool_main(["evaluate", fc_path, "--truth", truth_store, "--out", str(report)]) == 2
    err = capsys.readouterr().err
    assert "latitudes are not the truth store" in err and "0.01 degrees" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in report.iterdir()) == ["scores.csv"] and (report / "scores.csv").read_text() == "earlier\n"


def _early_truth(truth_path: str, tmp_path) -> str:
    path = str(tmp_path / "early.zarr")
    xr.open_zarr(truth_path).isel(time=slice(0, 4)).to_zarr(path, mode="w", zarr_format=2)
    return path


def test_evaluate_cli_refuses_bad_input(truth_store, tmp_path, capsys):
    fc_path = str(tmp_path / "fc.zarr")
    _shifted_forecast(truth_store, fc_path, slice(5, 9), delta=2.0)
    cases = [
        (["evaluate", str(tmp_path / "missing.zarr"), "--truth", truth_store, "--out", str(tmp_path / "r")], "does not exist"),
        (["evaluate", fc_path, "--truth", truth_store, "--out", str(tmp_path / "r"), "--baselines", "persistance"], "unknown baseline"),
        (["evaluate", fc_path, "--truth", truth_store, "--out", str(tmp_path / "r"), "--leads", "7"], "lead time 7 h"),
        (["evaluate", fc_path, "--truth", fc_path, "--out", str(tmp_path / "r")], "the truth must be"),
        (["evaluate", fc_path, "--truth", _early_truth(truth_store, tmp_path), "--out", str(tmp_path / "r")], "no valid time"),
    ]
    for argv, message in cases:
        assert tool_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
