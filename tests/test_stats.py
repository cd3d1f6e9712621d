"""Normalisation statistics: ``aurora-loop stats`` (exact, streamed) and ``aurora-train --stats``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from aurora_loop.datasets.sample_data import sample_dataset, write_sample_store
from aurora_loop.datasets.store import WeatherStore
from aurora_loop.datasets.variables import VariableSelection
from aurora_loop.datasets.writer import write_store
from aurora_loop.errors import UsageError
from aurora_loop.model.normalisation import ATMOS_STATS, SURFACE_STATS, stats_key
from aurora_loop.weather.stats import Moments, compute, fill_model_stats

LEVELS = (100, 500, 850)
TIMES = 20
SURF = {"2t": "2m_temperature", "msl": "mean_sea_level_pressure", "tp": "total_precipitation"}
ATMOS = {"z": "geopotential", "t": "temperature", "q": "specific_humidity"}
STATIC = {"lsm": "land_sea_mask", "z": "geopotential_at_surface"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """An 8x16 store of 20 times with a new variable (``tp``, some NaNs), chunked by 4 times."""
    ds = sample_dataset(grid=(8, 16), times=TIMES, seed=1, levels=LEVELS)
    rng = np.random.default_rng(0)
    tp = rng.gamma(0.5, 2e-3, size=ds["2m_temperature"].shape).astype(np.float32)
    tp[3, 2, 5] = tp[11, 0, 0] = np.nan  # missing values are left out
    ds["total_precipitation"] = (ds["2m_temperature"].dims, tp)
    path = write_store(ds, tmp_path_factory.mktemp("small") / "s.zarr", chunks={"time": 4})
    return path, ds.load()


def _selection() -> VariableSelection:
    return VariableSelection(surf=tuple(SURF), static=tuple(STATIC), atmos=tuple(ATMOS),
                             variable_map={"total_precipitation": "tp"})


def _expected(ds, times: slice) -> dict[str, tuple[float, float]]:
    """numpy's float64 mean and std of the same (float32) values."""
    out = {}
    for name, wb2 in SURF.items():
        x = ds[wb2].values[times].astype(np.float64)
        out[name] = (np.nanmean(x), np.nanstd(x))
    for name, wb2 in STATIC.items():
        x = ds[wb2].values.astype(np.float64)
        out[name] = (x.mean(), x.std())
    for name, wb2 in ATMOS.items():
        x = ds[wb2].values[times].astype(np.float64)  # (t, level, lat, lon)
        for i, level in enumerate(LEVELS):
            out[f"{name}_{level}"] = (x[:, i].mean(), x[:, i].std())
    return out


@pytest.mark.parametrize("chunk", [1, 3, TIMES])
def test_compute_equals_numpy_float64_for_any_chunking(small, chunk, monkeypatch):
    path, ds = small
    widest = []
    original = WeatherStore.read_into

    def spy(self, surf, atmos, start, member=0):
        widest.extend(a.shape[0] for a in (*surf.values(), *atmos.values()))
        assert len(surf) + len(atmos) == 1  # one variable at a time
        return original(self, surf, atmos, start, member)

    monkeypatch.setattr(WeatherStore, "read_into", spy)
    stats = compute(path, _selection(), chunk_times=chunk)
    assert max(widest) == min(chunk, TIMES)  # bounded memory: never more than a chunk of times
    expected = _expected(ds, slice(None))
    assert set(stats["locations"]) == set(stats["scales"]) == set(expected)
    for key, (loc, scale) in expected.items():
        np.testing.assert_allclose(stats["locations"][key], loc, rtol=1e-12, atol=0, err_msg=key)
        np.testing.assert_allclose(stats["scales"][key], scale, rtol=1e-12, atol=0, err_msg=key)
    src = stats["source"]
    assert src["times"] == TIMES and src["grid_points"] == 8 * 16 and src["levels"] == list(LEVELS)
    assert src["first_time"] == "2020-01-01T00:00:00" and src["missing_values"] == {"tp": 2}


def test_time_range_subset_matches_numpy_on_the_subset(small):
    path, ds = small
    times = ds["time"].values
    stats = compute(path, _selection(), start=str(times[5]), end=str(times[13]), chunk_times=4)
    assert stats["source"]["times"] == 9
    for key, (loc, scale) in _expected(ds, slice(5, 14)).items():
        np.testing.assert_allclose(stats["locations"][key], loc, rtol=1e-12, atol=0, err_msg=key)
        np.testing.assert_allclose(stats["scales"][key], scale, rtol=1e-12, atol=0, err_msg=key)


def test_chan_merge_is_exact_on_badly_conditioned_data():
    """A large offset with a tiny spread: the naive sum-of-squares formula would lose it all."""
    x = 1e6 + np.random.default_rng(1).standard_normal((30, 2, 4, 5))
    merged = Moments.zeros(2)
    for i in range(0, 30, 7):
        merged = merged.add(x[i : i + 7])
    np.testing.assert_allclose(merged.mean, x.mean(axis=(0, 2, 3)), rtol=1e-14)
    np.testing.assert_allclose(merged.std, x.std(axis=(0, 2, 3)), rtol=1e-9)


def test_sample_store_statistics_have_the_reference_form(tmp_path):
    levels = (100, 250, 500, 850)
    path = write_sample_store(tmp_path / "sample.zarr", grid=(8, 16), times=TIMES, levels=levels)
    stats = compute(path, VariableSelection(), chunk_times=6)
    surf, static, atmos = ("2t", "10u", "10v", "msl"), ("lsm", "z", "slt"), ("z", "u", "v", "t", "q")
    want = {*surf, *static, *(f"{v}_{lv}" for v in atmos for lv in levels)}
    assert set(stats["locations"]) == set(stats["scales"]) == want
    assert list(stats["locations"]) == [*surf, *static, *(f"{v}_{lv}" for v in atmos for lv in levels)]
    for key in want:
        loc, scale = stats["locations"][key], stats["scales"][key]
        assert np.isfinite(loc) and np.isfinite(scale) and scale > 0, key
        ref = SURFACE_STATS[key] if key in SURFACE_STATS else ATMOS_STATS[key.split("_")[0]][int(key.split("_")[1])]
        # Everything within an order of magnitude of the base model's ERA5 statistics ...
        assert 1 / 20 < scale / ref[1] < 20, key
        # ... and the weather (not the static masks, whose reference entries are fixed ranges,
        # nor the synthetic stratosphere at 100 hPa) within a factor 3, the mean within 3 scales.
        if key in surf or (key not in static and not key.endswith("_100")):
            assert 1 / 3 < scale / ref[1] < 3, (key, scale, ref)
            assert abs(loc - ref[0]) < 3 * ref[1], (key, loc, ref)


# --- the command line --------------------------------------------------------------------------

def _cli(args, capsys):
    from aurora_loop.cli.tools import main

    code = main(["stats", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_the_file(small, tmp_path, capsys):
    path, ds = small
    out = tmp_path / "stats.json"
    code, stdout, err = _cli([path, "--out", out, "--surf_vars", "2t,tp", "--static_vars", "", "--atmos_vars", "t",
                              "--levels", "500,850", "--variable_map", "total_precipitation=tp", "--chunk_times", "7"], capsys)
    assert code == 0, err
    data = json.loads(out.read_text())
    assert set(data["locations"]) == {"2t", "tp", "t_500", "t_850"}
    np.testing.assert_allclose(data["scales"]["t_850"], ds["temperature"].values[:, 2].astype(np.float64).std(), rtol=1e-12)
    assert data["source"]["times"] == TIMES and data["source"]["store"] == os.path.abspath(path)
    assert "20/20 times" in err and f"wrote {out}" in stdout
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]  # no temp file left


@pytest.mark.parametrize("args, message", [
    (["{missing}", "--out", "{out}"], "does not exist"),
    (["{store}", "--out", "{out}", "--surf_vars", "nope"], "surf variable 'nope' is not in"),
    (["{store}", "--out", "{out}", "--train_start", "2031-01-01"], "no time of"),
    (["{store}", "--out", "{out}", "--train_start", "2020-01-03", "--train_end", "2020-01-02"], "no time of"),
    (["{store}", "--out", "{out}", "--train_end", "yesterday"], "not an ISO date/time"),
    (["{store}", "--out", "{out}", "--levels", "300"], "hPa are not in"),
    (["{store}", "--out", "{out}", "--chunk_times", "0"], "--chunk_times must be at least 1"),
    (["{store}", "--out", "{existing}"], "exists; choose another --out or pass --overwrite"),
])
def test_cli_refuses_bad_input_with_one_line(small, tmp_path, capsys, args, message):
    existing = tmp_path / "old.json"
    existing.write_text("keep me")
    fill = {"missing": tmp_path / "none.zarr", "out": tmp_path / "stats.json", "store": small[0], "existing": existing}
    code, _, err = _cli([a.format(**fill) for a in args], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("aurora-loop stats: error: ") and message in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"] and existing.read_text() == "keep me"


# --- aurora-train --stats ----------------------------------------------------------------------

def _stats_file(path, entries):
    path.write_text(json.dumps({"locations": {k: v[0] for k, v in entries.items()}, "scales": {k: v[1] for k, v in entries.items()}}))
    return str(path)


def test_train_stats_fill_gaps_and_keep_built_in_statistics(tmp_path):
    from aurora_loop.config import TrainingConfig
    from aurora_loop.model.batch import Batch, Metadata
    from aurora_loop.tasks.aurora import model_config

    path = _stats_file(tmp_path / "s.json", {"2t": (1.0, 2.0), "foo": (3.0, 4.0), "w2_70": (4.0, 5.0), "w2_500": (5.0, 6.0),
                                             "w2_850": (7.0, 8.0), "t_70": (200.0, 9.0), "t_500": (0.0, 1.0)})
    cfg = TrainingConfig(surf_vars=("2t", "foo"), atmos_vars=("t", "w2"), levels=(70, 500, 850), stats=path)
    model = model_config("tiny", cfg)
    assert dict(model.surf_stats) == {"foo": (3.0, 4.0)}  # 2t keeps its built-in statistics
    assert dict(model.atmos_stats) == {"t_70": (200.0, 9.0), "w2_70": (4.0, 5.0), "w2_500": (5.0, 6.0), "w2_850": (7.0, 8.0)}  # t_500 too
    assert type(model).from_json(model.to_json()) == model  # round-trips, as a checkpoint's config.json

    # The statistics reach the normalisation the model and the loss use (config.surf_stats_dict).
    rng = np.random.default_rng(0)
    batch = Batch(surf_vars={"2t": rng.normal(280, 10, (1, 1, 4, 8)), "foo": rng.normal(3, 4, (1, 1, 4, 8))},
                  static_vars={}, atmos_vars={k: rng.normal(size=(1, 1, 3, 4, 8)) for k in ("t", "w2")},
                  metadata=Metadata(lat=np.linspace(90, -90, 4), lon=np.arange(8) * 45.0, time=0.0, atmos_levels=(70, 500, 850)))
    norm = batch.normalise(model.surf_stats_dict)
    np.testing.assert_allclose(norm.surf_vars["foo"], (batch.surf_vars["foo"] - 3) / 4)
    np.testing.assert_allclose(norm.surf_vars["2t"], (batch.surf_vars["2t"] - SURFACE_STATS["2t"][0]) / SURFACE_STATS["2t"][1])
    np.testing.assert_allclose(norm.atmos_vars["w2"][0, 0, 2], (batch.atmos_vars["w2"][0, 0, 2] - 7) / 8)
    np.testing.assert_allclose(norm.atmos_vars["t"][0, 0, 0], (batch.atmos_vars["t"][0, 0, 0] - 200) / 9)
    t500 = ATMOS_STATS["t"][500]
    np.testing.assert_allclose(norm.atmos_vars["t"][0, 0, 1], (batch.atmos_vars["t"][0, 0, 1] - t500[0]) / t500[1])
    np.testing.assert_allclose(norm.unnormalise(model.surf_stats_dict).atmos_vars["w2"], batch.atmos_vars["w2"], rtol=1e-12)


def test_train_stats_levels_from_the_store_when_not_given(tmp_path):
    from aurora_loop.config import TrainingConfig
    from aurora_loop.tasks.aurora import model_config

    store = write_sample_store(tmp_path / "d.zarr", grid=(4, 8), times=3, levels=(70, 500))
    path = _stats_file(tmp_path / "s.json", {"t_70": (200.0, 9.0), "t_500": (0.0, 1.0), "t_600": (1.0, 1.0)})
    model = model_config("tiny", TrainingConfig(dataset_path=store, atmos_vars=("t",), stats=path))
    assert dict(model.atmos_stats) == {"t_70": (200.0, 9.0)}
    with pytest.raises(UsageError, match=r"atmospheric variable 'z' at 70 hPa;"):
        model_config("tiny", TrainingConfig(dataset_path=store, atmos_vars=("z", "t"), stats=path))


@pytest.mark.parametrize("fields, message", [
    (dict(surf_vars=("2t", "tp")), "no normalisation statistics for surface variable 'tp'; compute them with aurora-loop stats STORE --out stats.json and pass --stats stats.json"),
    (dict(static_vars=("lsm", "orography")), "static variable 'orography'"),
    (dict(atmos_vars=("z", "w2"), levels=(500, 850)), "atmospheric variable 'w2' at {w2_levels} hPa;"),
    (dict(atmos_vars=("z", "o3")), "atmospheric variable 'o3';"),
    (dict(atmos_vars=("z", "t"), levels=(70, 500)), "atmospheric variable 'z' at 70 hPa, atmospheric variable 't' at 70 hPa;"),
    (dict(surf_vars=("tp",), static_vars=("lsm",), atmos_vars=("o3",)), "for surface variable 'tp', atmospheric variable 'o3';"),
])
@pytest.mark.parametrize("with_file", [False, True])
def test_a_variable_without_statistics_is_one_clear_error(tmp_path, fields, message, with_file):
    from aurora_loop.config import TrainingConfig
    from aurora_loop.tasks.aurora import model_config

    stats = _stats_file(tmp_path / "s.json", {"foo": (0.0, 1.0), "w2_500": (0.0, 1.0)}) if with_file else None
    message = message.format(w2_levels="850" if with_file else "500, 850")  # the file has w2 at 500 hPa
    with pytest.raises(UsageError) as err:
        model_config("tiny", TrainingConfig(stats=stats, **fields))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).count("no normalisation statistics") == 1
    if with_file:
        assert f"--stats {stats} has none for" in str(err.value)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "is not readable JSON"),
    ('{"locations": {}}', "holds no 'locations' and 'scales'"),
    ('{"locations": {"tp": 1.0}, "scales": {"tp": 0.0}}', "a scale must be positive"),
    ('{"locations": {"tp": 1.0}, "scales": {}}', "has a location but no scale"),
])
def test_a_bad_stats_file_is_one_clear_error(tmp_path, content, message):
    from aurora_loop.model.config import AuroraConfig

    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message):
        fill_model_stats(AuroraConfig.preset("tiny", surf_vars=("2t", "tp")), str(path))


def test_stats_keys_follow_the_reference():
    assert stats_key("z", 500) == "z_500" and stats_key("t", 500.0) == "t_500" and stats_key("q", 2.5) == "q_2_5"
    assert stats_key("u", 1000.0004) == "u_1000"


@pytest.mark.parametrize("extra, message", [
    ([], "aurora-train: error: no normalisation statistics for surface variable 'tp'; compute them with aurora-loop stats"),
    (["--stats", "{missing}"], "--stats {missing} does not exist"),
])
def test_aurora_train_refuses_a_variable_without_statistics(small, tmp_path, capsys, extra, message):
    from aurora_loop.cli.train import main

    missing = str(tmp_path / "none.json")
    args = ["--dataset_path", small[0], "--variable_map", "total_precipitation=tp", "--surf_vars", "2t,tp", "--static_vars", "lsm,z",
            "--atmos_vars", "z,t", "--model", "tiny", "--num_gpus", "1", "--batch_size", "1", "--max_steps", "1",
            "--output_dir", str(tmp_path / "out"), *[a.format(missing=missing) for a in extra]]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message.format(missing=missing) in err, err
    assert not os.path.exists(tmp_path / "out" / "config.json")
