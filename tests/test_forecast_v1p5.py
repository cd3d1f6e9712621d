"""aurora-loop forecast with Aurora 1.5: sub-step lead times (--fine_lead_times), the ensemble
model's members (--ensemble_members, --seed), the model step on an hourly store (inputs read
one model step apart, output-only variables written with CF metadata), one-line refusals, and
the written store read back by xarray and aurora-loop evaluate.

The checkpoints are freshly initialised tiny 1.5 models (deterministic and ensemble) written
in the export layout (``model/`` + ``training_config.json``, as a run trained with
``--lead_times 1,3,6`` records it), made once per module: what is tested is the roll-out and
the store, not the training.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import xarray as xr

from aurora_loop.cli.tools import main as tool_main

INITS = "2020-01-01T12,2020-01-01T18"  # need 6 h of history each; the store runs 00..23 h hourly
ONE = ["--no-progress", "--num_devices", "1", "--batch_size", "1"]  # one example per call: the cheapest compile


def _write_checkpoint(path: str, model: str, store: str, **fields) -> str:
    import jax
    import orbax.checkpoint as ocp

    from aurora_loop.config import TrainingConfig
    from aurora_loop.datasets import SampleSpec, WeatherStore, read_sample, selection_from_config
    from aurora_loop.datasets.variables import ATMOS, AURORA_V1P5_VARS, STATIC, SURF
    from aurora_loop.task import make_task

    config = TrainingConfig(model=model, dataset_path=store, surf_vars=AURORA_V1P5_VARS[SURF], static_vars=AURORA_V1P5_VARS[STATIC],
                            atmos_vars=AURORA_V1P5_VARS[ATMOS], lead_times=(1.0, 3.0, 6.0), **fields)
    task = make_task(model, config.replace(timestep_hours=6.0))
    example = read_sample(WeatherStore(store, selection_from_config(config)), 0, SampleSpec(history=2, rollout_steps=1, stride=6))
    # Random weights of the model's shapes (Flax's own initialisation runs op by op: ~30 s),
    # norms at 1; unlike a fresh model, the zero-initialised modulations respond to the lead
    # time and the noise.
    rng = np.random.default_rng(len(model))

    def fill(key, leaf):
        name = jax.tree_util.keystr(key)
        if name.endswith("['scale']"):
            return np.ones(leaf.shape, np.float32)
        if name.endswith("['bias']"):
            return np.zeros(leaf.shape, np.float32)
        return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(fill, jax.eval_shape(task.init, jax.random.key(0), example))
    os.makedirs(path)
    ocp.PyTreeCheckpointer().save(os.path.join(path, "model"), params)
    with open(os.path.join(path, "training_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config.to_json_dict(), fh)  # timestep_hours unset: the model step is the largest lead time, 6 h
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(hourly v1p5 store, deterministic checkpoint, ensemble checkpoint, fixed-step checkpoint dir)."""
    from aurora_loop.config import TrainingConfig
    from aurora_loop.datasets.sample_data import write_sample_store

    root = tmp_path_factory.mktemp("fc15")
    store = write_sample_store(str(root / "hourly.zarr"), grid=(32, 64), times=24, step_hours=1, variables="v1p5", levels=(500, 850))
    det = _write_checkpoint(str(root / "det"), "v1p5_tiny", store)
    ens = _write_checkpoint(str(root / "ens"), "v1p5_ensemble_tiny", store, ensemble_members=2)
    # A fixed-step model (conv): its refusals come before any weight is read, so no weights.
    conv = root / "conv"
    (conv / "model").mkdir(parents=True)
    (conv / "training_config.json").write_text(json.dumps(TrainingConfig(model="conv", dataset_path=store, surf_vars=("2t", "msl"),
                                                                          static_vars=(), atmos_vars=("t",)).to_json_dict()))
    return store, det, ens, str(conv)


@pytest.fixture(scope="module")
def plain(setup, tmp_path_factory):
    """The deterministic model's forecast, 2 steps from 2 initial times; the store reads it made."""
    from aurora_loop.datasets.store import WeatherStore

    store, det, _, _ = setup
    out = str(tmp_path_factory.mktemp("plain") / "fc.zarr")
    reads = []
    original = WeatherStore.read_into

    def spy(self, surf, atmos, start, member=0, step=1):
        reads.append((int(start), int(step), next(iter(surf.values())).shape[0]))
        return original(self, surf, atmos, start, member, step)

    mp = pytest.MonkeyPatch()
    mp.setattr(WeatherStore, "read_into", spy)
    try:
        assert tool_main(["forecast", "--checkpoint", det, "--init", INITS, "--steps", "2", "--out", out, *ONE]) == 0
    finally:
        mp.undo()
    return out, reads


def test_a_1p5_forecast_on_an_hourly_store_steps_by_the_model_step(setup, plain):
    store, _, _, _ = setup
    out, reads = plain
    ds = xr.open_zarr(out)
    assert ds.sizes == {"time": 2, "prediction_timedelta": 2, "level": 2, "latitude": 32, "longitude": 64}
    truth = xr.open_zarr(store)
    for dim in ("latitude", "longitude", "level"):  # the store's own labels, not float32 copies (180/31-degree rows)
        assert ds[dim].dtype == truth[dim].dtype and np.array_equal(ds[dim].values, truth[dim].values), dim
    assert (ds.prediction_timedelta.values / np.timedelta64(1, "h")).tolist() == [6.0, 12.0]
    assert [str(t)[:13] for t in ds.time.values] == ["2020-01-01T12", "2020-01-01T18"]
    # Inputs: two times 6 store steps (6 h) apart, the newest the initial time (12 h, 18 h).
    assert (6, 6, 2) in reads and (12, 6, 2) in reads and all(step == 6 for _, step, _ in reads)
    assert ds.attrs["time_step_hours"] == 6.0 and ds.attrs["store_time_step_hours"] == 1.0 and "stochastic" not in ds.attrs
    # Every predicted variable, the output-only ones included, under its WB2 name with CF metadata.
    assert len(ds.data_vars) == 26 + 5
    blh, tp, lcc = ds["boundary_layer_height"], ds["total_precipitation_1hr"], ds["low_cloud_cover"]
    assert blh.attrs["units"] == "m" and blh.attrs["standard_name"] == "atmosphere_boundary_layer_thickness"
    assert tp.attrs["standard_name"] == "precipitation_amount" and tp.attrs["aurora_name"] == "scaled_tp_1h"
    assert "standard_name" not in lcc.attrs and lcc.attrs["long_name"] == "low cloud cover" and lcc.attrs["units"] == "1"
    assert ds["instantaneous_10m_wind_gust"].dims == ("time", "prediction_timedelta", "latitude", "longitude")
    for name in ds.data_vars:
        assert np.isfinite(ds[name].values).all(), name


def test_sub_steps_write_every_lead_time_and_agree_with_the_plain_forecast(setup, plain, tmp_path, capsys):
    store, det, _, _ = setup
    out = str(tmp_path / "fine.zarr")
    assert tool_main(["forecast", "--checkpoint", det, "--init", INITS, "--steps", "2", "--fine_lead_times", "1,2,3,4,5,6",
                      "--out", out, *ONE]) == 0
    assert "12 lead time(s), 1 h to 12 h" in capsys.readouterr().out
    ds = xr.open_zarr(out)
    hours = ds.prediction_timedelta.values / np.timedelta64(1, "h")
    assert hours.tolist() == list(range(1, 13)) and ds.attrs["fine_lead_times_hours"] == [1, 2, 3, 4, 5, 6]
    assert ds["temperature"].shape == (2, 12, 2, 32, 64) and ds["2m_temperature"].shape == (2, 12, 32, 64)
    valid = ds.time.values[:, None] + ds.prediction_timedelta.values[None, :]
    assert str(valid[1, 0])[:13] == "2020-01-01T19" and str(valid[0, -1])[:13] == "2020-01-02T00"
    # The sub-steps differ (the lead time is encoded), and the 6 h / 12 h entries are the plain forecast.
    fine_t2m = ds["2m_temperature"].values
    assert not np.allclose(fine_t2m[:, 0], fine_t2m[:, 5])
    reference = xr.open_zarr(plain[0])
    for name in ("2m_temperature", "temperature", "boundary_layer_height"):
        np.testing.assert_allclose(ds[name].values[:, [5, 11]], reference[name].values, rtol=1e-5, atol=1e-5 * float(np.abs(reference[name].values).max()))


def test_ensemble_members_differ_along_number_and_member_0_is_the_single_forecast(setup, tmp_path, capsys):
    store, _, ens, _ = setup
    out = str(tmp_path / "ens.zarr")
    argv = ["forecast", "--checkpoint", ens, "--init", INITS, "--steps", "2", *ONE]
    assert tool_main([*argv, "--ensemble_members", "3", "--out", out]) == 0
    assert "x 3 member(s) along 'number'" in capsys.readouterr().out
    ds = xr.open_zarr(out)
    assert ds["geopotential"].dims == ("time", "number", "prediction_timedelta", "level", "latitude", "longitude")
    assert ds.sizes["number"] == 3 and ds.number.values.tolist() == [0, 1, 2]
    assert ds.attrs["ensemble_members"] == 3 and ds.attrs["noise_seed"] == 0
    t = ds["temperature"].values
    assert np.isfinite(t).all()
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not np.allclose(t[:, a], t[:, b]), (a, b)
    assert not np.allclose(t[0, 0], t[1, 0])  # each initial time draws its own noise

    single = str(tmp_path / "single.zarr")
    assert tool_main([*argv, "--out", single]) == 0
    assert "Note: the model is stochastic" in capsys.readouterr().out
    one = xr.open_zarr(single)
    assert "number" not in one.dims and one.attrs["ensemble_members"] == 1
    np.testing.assert_allclose(one["temperature"].values, t[:, 0], rtol=1e-5, atol=1e-3)

    # The store reader takes ``number`` as the ensemble dim; evaluate scores the ensemble's
    # mean (rmse/bias/acc, the same as scoring a mean store) and adds CRPS and spread/skill.
    from aurora_loop.datasets.layout import MEMBER_DIMS

    assert "number" in MEMBER_DIMS
    assert tool_main(["evaluate", out, "--truth", store, "--out", str(tmp_path / "report"), "--no-plots"]) == 0
    rows = json.loads((tmp_path / "report" / "scores.json").read_text())["rows"]
    ours = [r for r in rows if r["model"] not in ("persistence", "climatology") and r["rmse"] is not None]  # 12 h: no truth
    assert ours
    assert {r["lead_hours"] for r in rows} == {6.0, 12.0}
    assert all(r["crps"] is not None and 0 <= r["crps"] <= r["rmse"] * 1.01 + 1e-9 for r in ours)
    assert all(r["spread_skill"] is not None and r["spread_skill"] > 0 for r in ours if "solar" not in r["variable"])
    assert "crps" in (tmp_path / "report" / "scores.csv").read_text().splitlines()[0]
    mean = str(tmp_path / "mean.zarr")
    ds.mean("number", keep_attrs=True).to_zarr(mean, zarr_format=2, consolidated=True)
    assert tool_main(["evaluate", mean, "--truth", store, "--out", str(tmp_path / "mean_report"), "--no-plots"]) == 0
    mean_rows = json.loads((tmp_path / "mean_report" / "scores.json").read_text())["rows"]
    key = lambda r: (r["model"], r["variable"], r["level"], r["lead_hours"])  # noqa: E731
    by_key = {key(r): r for r in mean_rows}
    for r in ours:
        assert r["rmse"] == pytest.approx(by_key[key(r)]["rmse"], rel=1e-5), key(r)


def test_sub_step_forecast_evaluates_at_every_lead(setup, plain, tmp_path):
    store, det, _, _ = setup
    out = str(tmp_path / "fine.zarr")
    assert tool_main(["forecast", "--checkpoint", det, "--init", "2020-01-01T12", "--steps", "1", "--fine_lead_times", "3,6",
                      "--out", out, *ONE]) == 0
    report = tmp_path / "report"
    assert tool_main(["evaluate", out, "--truth", store, "--out", str(report), "--no-plots", "--variables",
                      "2m_temperature,boundary_layer_height,geopotential"]) == 0
    rows = json.loads((report / "scores.json").read_text())["rows"]
    mine = [r for r in rows if r["model"] == "v1p5_tiny"]
    assert {r["lead_hours"] for r in mine} == {3.0, 6.0} and all(r["count"] == 1 and r["rmse"] is not None for r in mine)
    # Persistence at 3 h is the truth at 12 h against the truth at 15 h: the valid times are right.
    truth = xr.open_zarr(store)["2m_temperature"]
    from aurora_loop.inference.evaluation import area_weights

    x0, x3 = (truth.sel(time=t).values.astype(np.float64) for t in ("2020-01-01T12", "2020-01-01T15"))
    w = area_weights(truth.latitude.values)[:, None]
    persistence = next(r for r in rows if r["model"] == "persistence" and r["variable"] == "2m_temperature" and r["lead_hours"] == 3.0)
    assert persistence["rmse"] == pytest.approx(float(np.sqrt(np.mean((x0 - x3) ** 2 * w))), rel=1e-5)


@pytest.mark.parametrize("which, flags, message", [
    ("det", ["--ensemble_members", "2"], "--ensemble_members 2 needs a stochastic model"),
    ("conv", ["--fine_lead_times", "1,2,3,4,5,6"], "--fine_lead_times needs a model with variable lead times"),
    ("det", ["--fine_lead_times", "1,2,3"], "must end at the model step, 6 h"),
    ("det", ["--fine_lead_times", "3,1,6"], "increasing order"),
    ("det", ["--fine_lead_times", "1,x"], "comma list of hours"),
    ("ens", ["--ensemble_members", "0"], "--ensemble_members must be at least 1"),
    ("det", ["--timestep_hours", "2.5"], "not a whole multiple of the store's 1 h time step"),
    ("det", ["--init", "2020-01-01T03"], "earlier step(s) of history in the store (6 store steps apart)"),
])
def test_forecast_options_the_model_cannot_take_are_one_line_errors(setup, tmp_path, capsys, which, flags, message):
    store, det, ens, conv = setup
    checkpoint = {"det": det, "ens": ens, "conv": conv}[which]
    out = tmp_path / "f.zarr"
    argv = ["forecast", "--checkpoint", checkpoint, "--init", "2020-01-01T12", "--steps", "1", "--out", str(out), *ONE]
    if "--init" in flags:
        argv[argv.index("--init") + 1] = flags[1]
        flags = []
    assert tool_main([*argv, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not any(p.name.startswith("f.zarr") for p in tmp_path.iterdir())
