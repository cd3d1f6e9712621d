"""aurora-loop forecast -> evaluate: a conv model trained with aurora-train on the synthetic
sample beats persistence; the store has the WB2 forecast layout; every checkpoint form gives
the same forecast; the real ERA5 sample forecasts and evaluates; bad input exits with 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from aurora_loop.cli.tools import main as tool_main

ERA5 = Path(__file__).parent / "data" / "era5-levels-members.nc"
TRAIN = ["--model", "conv", "--num_gpus", "1", "--batch_size", "2", "--learning_rate", "1e-3", "--warmup_steps", "20",
         "--log_every_n_steps", "100", "--num_workers", "1", "--epochs", "1000"]
INITS = "2020-01-12T00/2020-01-14T18/6h"  # 12 init times in the validation period (the last 20% of 60 times)


def train(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    done = subprocess.run([sys.executable, "-m", "aurora_loop.cli.train", *TRAIN, *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(store, run dir): conv trained 300 steps on a 16 x 32 synthetic store of 60 times."""
    from aurora_loop.datasets.sample_data import write_sample_store

    root = tmp_path_factory.mktemp("forecast")
    store = str(root / "sample.zarr")
    write_sample_store(store, grid=(16, 32), times=60, levels=(500, 850))
    run = str(root / "run")
    train("--dataset_path", store, "--output_dir", run, "--levels", "500,850", "--max_steps", "300",
          "--save_every_n_steps", "150", "--val_every_n_steps", "300")
    return store, run


@pytest.fixture(scope="module")
def forecast(trained, tmp_path_factory):
    store, run = trained
    out = str(tmp_path_factory.mktemp("fc") / "forecast.zarr")
    assert tool_main(["forecast", "--checkpoint", run, "--init", INITS, "--steps", "4", "--out", out, "--batch_size", "8"]) == 0
    return out


def test_forecast_store_has_the_wb2_layout(trained, forecast, capsys):
    store, run = trained
    ds = xr.open_zarr(forecast)
    assert ds.sizes == {"time": 12, "prediction_timedelta": 4, "level": 2, "latitude": 16, "longitude": 32}
    assert ds["prediction_timedelta"].values.tolist() == [np.timedelta64(h, "h").astype("timedelta64[ns]") for h in (6, 12, 18, 24)]
    assert str(ds.time.values[0])[:13] == "2020-01-12T00" and str(ds.time.values[-1])[:13] == "2020-01-14T18"
    assert set(ds.data_vars) == {"2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind", "mean_sea_level_pressure",
                                 "geopotential", "u_component_of_wind", "v_component_of_wind", "temperature", "specific_humidity"}
    assert ds["geopotential"].dims == ("time", "prediction_timedelta", "level", "latitude", "longitude")
    assert ds["2m_temperature"].dims == ("time", "prediction_timedelta", "latitude", "longitude")
    assert ds["geopotential"].attrs["units"] == "m**2 s**-2" and ds["geopotential"].attrs["standard_name"] == "geopotential"
    assert ds["2m_temperature"].attrs["units"] == "K"
    assert ds["latitude"].attrs["units"] == "degrees_north" and np.all(np.diff(ds.latitude.values) > 0)
    assert ds["longitude"].attrs["units"] == "degrees_east" and ds["level"].attrs["units"] == "hPa"
    assert ds.attrs["Conventions"] == "CF-1.8" and ds.attrs["model"] == "conv" and ds.attrs["checkpoint_step"] == 300
    assert "3 init" not in capsys.readouterr().err  # (progress goes to stderr; nothing else asserted about it)
    for name in ds.data_vars:
        assert np.isfinite(ds[name].values).all()


def test_forecast_matches_the_task_on_one_device(trained, forecast):
    """The sharded, batched roll-out written to the store equals task.predict on one example."""
    import jax

    from aurora_loop.datasets import SampleSpec, WeatherStore, read_sample, selection_from_config
    from aurora_loop.inference.forecast import load_model
    from aurora_loop.inference.runs import resolve_checkpoint

    store_path, run = trained
    resolved = resolve_checkpoint(run)
    store = WeatherStore(store_path, selection_from_config(resolved[0]))
    t = int(np.nonzero(store.times == np.datetime64("2020-01-13T06"))[0][0])
    sample = read_sample(store, t - 1, SampleSpec(history=2, rollout_steps=4))
    loaded = load_model(resolved, sample)
    # jitted, as the trainer ran it (jit flattens dicts in sorted key order; the conv task's
    # channel order follows dict order, so an eager call would shuffle its channels)
    expected = jax.device_get(jax.jit(loaded.task.predict)(loaded.params, sample))
    ds = xr.open_zarr(forecast).sel(time="2020-01-13T06")
    np.testing.assert_allclose(ds["geopotential"].values[:, :, ::-1], expected.atmos_vars["z"][0], rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(ds["2m_temperature"].values[:, ::-1], expected.surf_vars["2t"][0], rtol=1e-5, atol=1e-4)


def test_trained_model_beats_persistence(trained, forecast, tmp_path, capsys):
    store, _ = trained
    out = tmp_path / "report"
    assert tool_main(["evaluate", forecast, "--truth", store, "--out", str(out), "--no-plots"]) == 0  # plots: test_evaluation
    printed = capsys.readouterr().out
    assert "rmse:persistence" in printed and "rmse:climatology" in printed
    rows = json.loads((out / "scores.json").read_text())["rows"]
    first = {(r["model"], r["variable"], r["level"]): r for r in rows if r["lead_hours"] == 6.0}
    fields = {(v, lv) for m, v, lv in first if m == "conv"}
    assert len(fields) == 4 + 5 * 2
    for variable, level in fields:
        model, persistence = first["conv", variable, level], first["persistence", variable, level]
        assert model["count"] == 12
        assert model["rmse"] < persistence["rmse"], (variable, level, model["rmse"], persistence["rmse"])
        assert model["acc"] > 0.9
    assert (out / "scores.csv").stat().st_size > 0 and not list(out.glob("*.png"))


def test_every_checkpoint_form_gives_the_same_forecast(trained, forecast, tmp_path):
    store, run = trained
    from aurora_loop.cli.export_checkpoint import export

    export(run, str(tmp_path / "export"), step="latest")
    forms = {"step": os.path.join(run, "checkpoints", "150"), "export": str(tmp_path / "export")}
    reference = xr.open_zarr(forecast).isel(time=[0, 5])
    for name, path in forms.items():
        out = str(tmp_path / f"{name}.zarr")
        assert tool_main(["forecast", "--checkpoint", path, "--init", "2020-01-12T00,2020-01-13T06", "--steps", "4", "--out", out, "--no-progress"]) == 0
        ds = xr.open_zarr(out)
        same = np.allclose(ds["temperature"].values, reference["temperature"].values, rtol=1e-6, atol=1e-4)
        assert same == (name != "step"), name  # step 150 is an earlier model than the run's newest (300)
        assert ds.attrs["checkpoint_step"] == (150 if name == "step" else 300)


def _wb2_rmse(forecast: xr.DataArray, truth: xr.DataArray) -> xr.DataArray:
    """WeatherBench2's RMSE, written in xarray as WB2 writes it: ``forecast - truth`` aligned on
    the coordinates, cell-area latitude weights (bands between row midpoints, the poles' bands
    ending at +-90, mean 1), the root after averaging the MSE over initial times. Per lead."""
    lat = np.deg2rad(truth.latitude.values)
    bounds = np.concatenate([[-np.pi / 2], (lat[:-1] + lat[1:]) / 2, [np.pi / 2]])
    area = np.sin(bounds[1:]) - np.sin(bounds[:-1])
    weights = xr.DataArray(area / area.mean(), coords={"latitude": truth.latitude}, dims="latitude")
    per_lead = []
    for lead in forecast.prediction_timedelta.values:
        valid = truth.sel(time=forecast.time.values + lead).assign_coords(time=forecast.time.values)
        error = forecast.sel(prediction_timedelta=lead).astype(np.float64) - valid.astype(np.float64)
        assert error.sizes["latitude"] == truth.sizes["latitude"]  # the inner join kept every row
        per_lead.append(np.sqrt((error**2 * weights).mean(("latitude", "longitude")).mean("time")))
    return xr.concat(per_lead, "prediction_timedelta")


def test_forecast_coordinates_are_the_stores_and_xarray_scores_as_evaluate(trained, tmp_path, capsys):
    """On the built-in sample's 32 x 64 grid (latitudes 180/31 degrees apart: not float32
    numbers) the forecast's latitude/longitude/level are the store's bit for bit, so
    xr.align(join="exact") succeeds and WB2's RMSE in plain xarray equals aurora-loop evaluate's."""
    _, run = trained
    store, fc, report = str(tmp_path / "sample.zarr"), str(tmp_path / "fc.zarr"), tmp_path / "report"
    assert tool_main(["sample-data", store, "--times", "24", "--levels", "500,850"]) == 0
    truth = xr.open_zarr(store)
    assert np.any(truth.latitude.values.astype(np.float32) != truth.latitude.values)  # float32 copies would differ
    # the conv model is grid-agnostic: trained on 16 x 32, it forecasts on the sample's 32 x 64
    assert tool_main(["forecast", "--checkpoint", run, "--dataset_path", store, "--init", "2020-01-03T00/2020-01-04T00/12h",
                      "--steps", "2", "--out", fc, "--no-progress"]) == 0
    forecast = xr.open_zarr(fc)
    for dim in ("latitude", "longitude", "level"):
        assert forecast[dim].dtype == truth[dim].dtype
        np.testing.assert_array_equal(forecast[dim].values, truth[dim].values)
    aligned_fc, aligned_truth = xr.align(forecast, truth, join="exact", exclude=["time"])  # raises on any difference
    assert aligned_fc.sizes["latitude"] == 32 and aligned_fc.sizes["longitude"] == 64

    capsys.readouterr()
    assert tool_main(["evaluate", fc, "--truth", store, "--out", str(report), "--no-plots", "--baselines", ""]) == 0
    assert "grid:" not in capsys.readouterr().out  # equal labels: nothing matched within rounding
    rows = json.loads((report / "scores.json").read_text())["rows"]
    for name, level in (("2m_temperature", None), ("geopotential", 500), ("specific_humidity", 850)):
        f, o = aligned_fc[name], aligned_truth[name]
        if level is not None:
            f, o = f.sel(level=level), o.sel(level=level)
        expected = _wb2_rmse(f, o).values
        ours = sorted((r["lead_hours"], r["rmse"]) for r in rows if r["variable"] == name and r["level"] == level)
        assert [h for h, _ in ours] == [6.0, 12.0]
        np.testing.assert_allclose([v for _, v in ours], expected, rtol=1e-6)  # evaluate's weights are float32 (jax)


def test_writer_coordinates_of_a_cropped_reoriented_float32_grid(tmp_path):
    """A store with float32 latitudes descending and longitudes in [-180, 180): the forecast
    writer's coordinates of a prediction cropped by a row (as Aurora crops 721 -> 720) are the
    store's own float32 values, oriented as xarray users (and evaluate) orient the store."""
    from aurora_loop.config import TrainingConfig
    from aurora_loop.datasets import WeatherStore, selection_from_config
    from aurora_loop.datasets.sample_data import sample_dataset
    from aurora_loop.inference.evaluation import standardise
    from aurora_loop.inference.writer import grid_coords, level_coords

    ds = sample_dataset(grid=(17, 32), times=3, levels=(500, 850))
    ds = ds.assign_coords(latitude=ds.latitude.values.astype(np.float32), longitude=(ds.longitude.values.astype(np.float32) + 180) % 360 - 180)
    ds = ds.isel(latitude=slice(None, None, -1)).sortby("longitude")
    ds.to_zarr(tmp_path / "s.zarr", zarr_format=2)
    store = WeatherStore(str(tmp_path / "s.zarr"), selection_from_config(TrainingConfig(levels=(850, 500))))
    lat, lon = grid_coords(store, store.lat[:-1], store.lon)  # the southernmost row cropped
    wb2 = standardise(xr.open_zarr(tmp_path / "s.zarr"), "s.zarr")
    assert lat.dtype == lon.dtype == np.float32
    np.testing.assert_array_equal(lat, wb2.latitude.values[1:])
    np.testing.assert_array_equal(lon, wb2.longitude.values)
    assert level_coords(store).tolist() == [850, 500] and level_coords(store).dtype == ds.level.dtype


def test_forecast_refuses_bad_input(trained, tmp_path, capsys):
    store, run = trained
    out = str(tmp_path / "f.zarr")
    cases = [
        (["--checkpoint", str(tmp_path / "nope"), "--init", "2020-01-12T00", "--steps", "2", "--out", out], "does not exist"),
        (["--checkpoint", run, "--init", "2021-01-12T00", "--steps", "2", "--out", out], "is not a time of the store"),
        (["--checkpoint", run, "--init", "2020-01-01T00", "--steps", "2", "--out", out], "earlier step"),
        (["--checkpoint", run, "--init", "2020-01-12T00", "--steps", "0", "--out", out], "--steps must be at least 1"),
        (["--checkpoint", run, "--init", "2020-01-12T00", "--steps", "2", "--out", out, "--levels", "500"], "shape"),
        (["--checkpoint", run, "--init", "2020-01-12T00", "--steps", "2", "--out", store], "already exists"),
    ]
    for argv, message in cases:
        assert tool_main(["forecast", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(out) and not any(p.name.startswith("f.zarr") for p in tmp_path.iterdir())


def test_real_era5_forecasts_and_evaluates(tmp_path, capsys):
    from aurora_loop.datasets.convert import convert

    store = str(tmp_path / "era5.zarr")
    convert([ERA5], store)
    run = str(tmp_path / "run")
    # 4 times 12 h apart x 10 members: train on the first two starts' windows, a few steps
    train("--dataset_path", store, "--output_dir", run, "--surf_vars", "", "--static_vars", "", "--atmos_vars", "z,t",
          "--levels", "500,850", "--train_start", "2017-01-01T00", "--train_end", "2017-01-02T00",
          "--val_start", "2017-01-01T12", "--val_end", "2017-01-02T12", "--max_steps", "6", "--save_every_n_steps", "6")
    fc = str(tmp_path / "era5_fc.zarr")
    assert tool_main(["forecast", "--checkpoint", run, "--init", "2017-01-01T12", "--steps", "2", "--member", "3", "--out", fc, "--no-progress"]) == 0
    ds = xr.open_zarr(fc)
    assert ds.sizes == {"time": 1, "prediction_timedelta": 2, "level": 2, "latitude": 61, "longitude": 120}
    assert set(ds.data_vars) == {"geopotential", "temperature"} and ds.attrs["member"] == 3
    z500 = ds["geopotential"].sel(level=500).values
    assert np.isfinite(z500).all() and 45000 < z500.mean() < 60000  # m2 s-2: a 500 hPa height field

    report = tmp_path / "report"
    assert tool_main(["evaluate", fc, "--truth", store, "--out", str(report), "--no-plots"]) == 0
    rows = json.loads((report / "scores.json").read_text())["rows"]
    by_key = {(r["model"], r["variable"], r["level"], r["lead_hours"]): r for r in rows}
    assert by_key["conv", "geopotential", 500, 12.0]["count"] == 1 and by_key["conv", "temperature", 850, 24.0]["count"] == 1
    assert all(r["rmse"] is not None and r["rmse"] > 0 for r in rows)
    # Persistence by hand on the real fields (member 3): z500 at 2017-01-01T12 vs 12 h later.
    from aurora_loop.inference.evaluation import area_weights

    truth = xr.open_zarr(store)["geopotential"].sel(level=500).isel(number=3)
    x0 = truth.sel(time="2017-01-01T12").values.astype(np.float64)
    x1 = truth.sel(time="2017-01-02T00").values.astype(np.float64)
    w = area_weights(truth.latitude.values)[:, None]
    expected = float(np.sqrt(np.mean((x0 - x1) ** 2 * w)))
    assert by_key["persistence", "geopotential", 500, 12.0]["rmse"] == pytest.approx(expected, rel=1e-5)
