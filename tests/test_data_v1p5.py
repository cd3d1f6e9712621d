"""Aurora 1.5 data: every 1.5 variable in the sample data, the WB2 names, ERA5 conversion,
and training samples whose last lead time is drawn per example (``--lead_times``).

Real Zarr stores written by xarray (``aurora-loop sample-data``) on a 16 x 32 grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from aurora_loop.cli.tools import main as aurora_loop
from aurora_loop.cli.train import main as aurora_train
from aurora_loop.config import TrainingConfig
from aurora_loop.datasets import build_loaders
from aurora_loop.datasets.build import lead_steps
from aurora_loop.datasets.convert import convert
from aurora_loop.datasets.loader import ZarrLoader
from aurora_loop.datasets.samples import SampleSpec, valid_starts
from aurora_loop.datasets.store import WeatherStore
from aurora_loop.datasets.variables import ATMOS, AURORA_V1P5_VARS, DEFAULT_MAP, STATIC, SURF, V1P5_OUTPUT_ONLY, VariableSelection
from aurora_loop.errors import UsageError
from aurora_loop.model.batch import hours_since_epoch
from aurora_loop.model.insolation import insolation_numpy

GRID = (16, 32)
LEVELS = (500, 850)
WB2 = {kind: {aurora: wb2 for wb2, aurora in DEFAULT_MAP[kind].items()} for kind in (SURF, STATIC, ATMOS)}
V1P5 = VariableSelection(surf=AURORA_V1P5_VARS[SURF], static=AURORA_V1P5_VARS[STATIC], atmos=AURORA_V1P5_VARS[ATMOS])

#: Physical bounds per Aurora surface name (inclusive), in the store's units.
SURF_BOUNDS = {
    "2t": (200, 330), "2d": (200, 330), "skt": (200, 340), "stl1": (200, 340), "10u": (-60, 60), "10v": (-60, 60),
    "100u": (-80, 80), "100v": (-80, 80), "msl": (9.0e4, 1.1e5), "sp": (4.5e4, 1.1e5), "tcwv": (0, 90),
    "tcc": (0, 1), "lcc": (0, 1), "mcc": (0, 1), "hcc": (0, 1), "ci": (0, 1), "swvl1": (0, 0.7), "scaled_sd": (0, 10),
    "insolation": (-1.1, 1.1), "i10fg": (0, 80), "blh": (10, 5000), "uvb_1h": (0, 6e5), "ssrd_1h": (0, 5e6),
    "ttr_1h": (-1.5e6, -1e5), "scaled_tp_1h": (0, 0.05), "scaled_sf_1h": (0, 0.05),
}


@pytest.fixture(scope="module")
def hourly(tmp_path_factory) -> str:
    """Every Aurora 1.5 variable, hourly, 60 times, written by the tool."""
    path = tmp_path_factory.mktemp("v1p5") / "hourly.zarr"
    argv = ["sample-data", str(path), "--variables", "v1p5", "--step_hours", "1", "--times", "60",
            "--grid", "x".join(map(str, GRID)), "--levels", ",".join(map(str, LEVELS))]
    assert aurora_loop(argv) == 0
    return str(path)


@pytest.fixture(scope="module")
def six_hourly(tmp_path_factory) -> str:
    from aurora_loop.datasets.sample_data import write_sample_store

    return write_sample_store(tmp_path_factory.mktemp("v1p5") / "six.zarr", grid=GRID, times=24, levels=LEVELS)


def lead_config(path: str, **kw) -> TrainingConfig:
    base = dict(dataset_path=path, lead_times=(1.0, 3.0, 6.0), batch_size=4, num_workers=0, rollout_steps=1,
                surf_vars=("2t", "scaled_tp_1h"), static_vars=("lsm",), atmos_vars=("z",), seed=3)
    return TrainingConfig(**{**base, **kw})


# --- the sample data ---------------------------------------------------------------------


def test_sample_data_writes_every_v1p5_variable_in_plausible_ranges(hourly):
    ds = xr.open_zarr(hourly, chunks=None)
    for kind in (SURF, STATIC, ATMOS):
        for name in AURORA_V1P5_VARS[kind]:
            assert WB2[kind][name] in ds.data_vars, (kind, name)
    assert {"land_sea_mask", "geopotential_at_surface", "soil_type"} <= set(ds.data_vars)  # the standard statics stay
    assert ds.sizes == {"time": 60, "level": 2, "latitude": GRID[0], "longitude": GRID[1]}
    assert np.all(np.diff(ds["time"].values) == np.timedelta64(1, "h"))
    for name, (lo, hi) in SURF_BOUNDS.items():
        x = ds[WB2[SURF][name]].values
        assert np.isfinite(x).all() and lo <= x.min() and x.max() <= hi, (name, x.min(), x.max())
        assert ds[WB2[SURF][name]].attrs.get("units"), name
    # Physical ties: dewpoint <= temperature, each cloud layer <= the total cover, snowfall <= precipitation.
    surf = {name: ds[WB2[SURF][name]].values for name in SURF_BOUNDS}
    assert (surf["2d"] <= surf["2t"]).all()
    for layer in ("lcc", "mcc", "hcc"):
        assert (surf[layer] <= surf["tcc"] + 1e-6).all()
    assert (surf["scaled_sf_1h"] <= surf["scaled_tp_1h"]).all()
    assert 0.5 < (surf["scaled_tp_1h"] == 0).mean() < 0.95  # mostly dry, but it rains
    assert 1e-5 < surf["scaled_tp_1h"].mean() < 5e-4  # ~0.1 mm per hour, as ERA5
    assert (surf["ssrd_1h"] == 0).mean() > 0.3 and surf["ssrd_1h"].max() > 1e6  # night and day
    assert 0 < (surf["scaled_sd"] > 0).mean() < 0.5 and 0 < (surf["ci"] > 0).mean() < 0.5
    # Statics: O(1), as the reference's normalisation (location 0, scale 1) expects; one-hot maps.
    for name in AURORA_V1P5_VARS[STATIC]:
        x = ds[WB2[STATIC][name]].values
        assert x.shape == GRID and np.isfinite(x).all(), name
        low, high = {"z": (-1e3, 1e5), "anor": (-np.pi / 2, np.pi / 2)}.get(name, (0.0, 1.0))  # anor: radians
        assert low <= x.min() and x.max() <= high, (name, x.min(), x.max())
    for prefix in ("slt", "tvh", "tvl"):
        maps = np.stack([ds[WB2[STATIC][n]].values for n in AURORA_V1P5_VARS[STATIC] if n.startswith(prefix + "_")])
        assert set(np.unique(maps)) <= {0.0, 1.0} and (maps.sum(axis=0) == 1).all(), prefix
    lsm = ds["land_sea_mask"].values
    assert (ds["soil_type_0"].values == 1 - lsm).all()  # soil type 0 is the sea
    assert (ds["volumetric_soil_water_layer_1"].values[:, lsm == 0] == 0).all()


def test_insolation_is_the_formula_at_the_store_times(hourly):
    ds = xr.open_zarr(hourly, chunks=None)
    expected = insolation_numpy(hours_since_epoch(ds["time"].values), ds["latitude"].values, ds["longitude"].values)
    np.testing.assert_array_equal(ds["toa_incident_solar_radiation_normalized"].values, expected)
    # ... and read by its Aurora name, in Aurora's orientation (latitudes flipped), still the formula.
    store = WeatherStore(hourly, V1P5)
    surf, _ = store.read(0, 5)
    np.testing.assert_array_equal(surf["insolation"], insolation_numpy(store.hours[:5], store.lat, store.lon))
    assert set(surf) == set(AURORA_V1P5_VARS[SURF]) and set(store.static) == set(AURORA_V1P5_VARS[STATIC])


def test_the_weather_evolves_in_physical_time_and_the_standard_fields_stay(hourly, six_hourly):
    """An hourly store is the same kind of weather sampled six times as often: its 6-step
    change matches the 6-hourly store's 1-step change, its 1-step change is much smaller;
    the 1.5 preset leaves the standard fields as they were."""
    from aurora_loop.datasets.sample_data import sample_dataset

    def change(x: np.ndarray, lag: int) -> float:
        return float(np.sqrt(((x[lag:] - x[:-lag]) ** 2).mean()))

    h = xr.open_zarr(hourly, chunks=None)["geopotential"].sel(level=500).values
    s = xr.open_zarr(six_hourly, chunks=None)["geopotential"].sel(level=500).values
    assert change(h, 1) < 0.4 * change(h, 6)
    assert 0.5 < change(h, 6) / change(s, 1) < 2.0
    for name in ("skin_temperature", "total_precipitation_1hr", "total_cloud_cover"):  # tied to the moving latents
        x = xr.open_zarr(hourly, chunks=None)[name].values
        assert 0 < change(x, 1) < change(x, 6), name
    standard = sample_dataset(grid=(8, 16), times=6, levels=LEVELS, step_hours=1)
    full = sample_dataset(grid=(8, 16), times=6, levels=LEVELS, step_hours=1, variables="v1p5")
    for name in standard.data_vars:
        np.testing.assert_array_equal(full[name].values, standard[name].values)


def test_a_missing_output_only_variable_is_an_error_only_when_asked_for(six_hourly):
    WeatherStore(six_hourly, VariableSelection(surf=("2t",), static=("lsm",), atmos=("z",)))  # not asked: fine
    with pytest.raises(UsageError, match="output-only") as err:
        WeatherStore(six_hourly, VariableSelection(surf=("2t", "i10fg"), static=("lsm",), atmos=("z",)))
    assert "instantaneous_10m_wind_gust" in str(err.value) and len(str(err.value).splitlines()) == 1
    assert set(V1P5_OUTPUT_ONLY) < set(AURORA_V1P5_VARS[SURF])


def test_convert_knows_the_era5_short_names_and_units(tmp_path):
    pytest.importorskip("netCDF4")
    rng = np.random.default_rng(0)
    times = np.datetime64("2021-03-01T00", "ns") + np.arange(3) * np.timedelta64(1, "h")
    lat, lon = np.linspace(90, -90, 5), np.arange(8) * 45.0
    dims = ("valid_time", "latitude", "longitude")

    def field(scale: float = 1.0) -> tuple:
        return dims, (scale * rng.random((3, 5, 8))).astype(np.float32)

    src = xr.Dataset(
        {"tp": field(1e-3), "u100": field(10), "v100": field(10), "tcc": field(), "lcc": field(), "sd": field(), "siconc": field(),
         "i10fg": field(20), "ssrd": field(1e6), "ttr": field(-1e6), "sf": field(1e-4), "d2m": field(300), "skt": field(300),
         "tvh": (dims, rng.integers(0, 20, (3, 5, 8)).astype(np.float32)), "sdfor": field(100)},
        coords={"valid_time": times, "latitude": lat, "longitude": lon},
    )
    src.to_netcdf(tmp_path / "era5.nc")
    ds = convert([tmp_path / "era5.nc"], tmp_path / "era5.zarr")
    expected = {"total_precipitation_1hr": "m", "100m_u_component_of_wind": "m s-1", "total_cloud_cover": "1", "low_cloud_cover": "1",
                "snow_depth": "m", "sea_ice_cover": "1", "instantaneous_10m_wind_gust": "m s-1", "surface_solar_radiation_downwards_1hr": "J m-2",
                "top_net_thermal_radiation_1hr": "J m-2", "snowfall_1hr": "m", "2m_dewpoint_temperature": "K", "skin_temperature": "K"}
    for name, units in expected.items():
        assert ds[name].attrs["units"] == units, name
    assert ds["type_of_high_vegetation"].dims == ("latitude", "longitude")  # a static: its first time
    store = WeatherStore(tmp_path / "era5.zarr", VariableSelection(surf=("scaled_tp_1h", "ssrd_1h", "ci", "scaled_sd", "100u"), static=("sdfor", "tvh"), atmos=()))
    surf, _ = store.read(0, 3)
    np.testing.assert_array_equal(surf["scaled_tp_1h"], src["tp"].values)  # already 90 -> -90, 0 -> 315
    assert store.static["tvh"].shape == (5, 8)


# --- sampled lead times ------------------------------------------------------------------


def check_batch(batch, store: WeatherStore, spec: SampleSpec) -> None:
    """Inputs T apart ending at the inputs' time, targets T apart after it, the last one
    ``lead_hours`` after the step before it: compared with the store's own values."""
    full = store.fields[SURF]["2t"].read(slice(0, len(store.times)))
    newest = np.rint(batch.inputs.metadata.time - store.hours[0]).astype(int)  # hourly store: index = hours
    stride = spec.stride
    lead_hours = np.full(newest.size, stride, np.float32) if batch.lead_hours is None else batch.lead_hours
    lead = np.rint(lead_hours).astype(int)
    for b in range(newest.size):
        inputs = newest[b] - stride * np.arange(spec.history - 1, -1, -1)
        targets = newest[b] + stride * np.arange(1, spec.rollout_steps + 1)
        targets[-1] = targets[-2] + lead[b] if spec.rollout_steps > 1 else newest[b] + lead[b]
        np.testing.assert_array_equal(batch.inputs.surf_vars["2t"][b], full[inputs])
        np.testing.assert_array_equal(batch.targets.surf_vars["2t"][b], full[targets])
        assert batch.targets.metadata.time[b] == store.hours[targets[0]]  # the first target's valid time
    first_lead = batch.targets.metadata.time - batch.inputs.metadata.time
    if spec.rollout_steps == 1:
        np.testing.assert_array_equal(first_lead, lead_hours)
    else:
        assert (first_lead == stride).all()


@pytest.mark.parametrize("rollout_steps", [1, 2])
def test_lead_time_samples_read_what_they_claim(hourly, rollout_steps):
    train, val = build_loaders(lead_config(hourly, rollout_steps=rollout_steps))
    assert train.spec == SampleSpec(2, rollout_steps, stride=6, leads=(1, 3, 6))
    assert train.time_step == np.timedelta64(6, "h")  # the model step: aurora-train's default --timestep_hours
    seen = set()
    for batch in train:
        assert batch.lead_hours.dtype == np.float32 and batch.lead_hours.shape == (4,)
        check_batch(batch, train.store, train.spec)
        seen |= set(batch.lead_hours.tolist())
    assert seen == {1.0, 3.0, 6.0}
    for batch in val:  # validation: every step one model step after the last, no draw
        assert batch.lead_hours is None
        assert ((batch.targets.metadata.time - batch.inputs.metadata.time) == 6).all()
        check_batch(batch, val.store, val.spec)


def test_zarr_reads_match_the_cache_and_only_needed_times_are_read(hourly):
    config = lead_config(hourly, rollout_steps=2)
    cached, _ = build_loaders(config)
    direct, _ = build_loaders(config.replace(cache_mb=0))
    assert cached.store.cached and not direct.store.cached
    a, b = cached.example_batch(), direct.example_batch()
    np.testing.assert_array_equal(a.lead_hours, b.lead_hours)
    for name in a.targets.surf_vars:
        np.testing.assert_array_equal(a.targets.surf_vars[name], b.targets.surf_vars[name])
        np.testing.assert_array_equal(a.inputs.surf_vars[name], b.inputs.surf_vars[name])
    reads: list[slice] = []
    field = direct.store.fields[SURF]["2t"]
    original, original_async = field.read_into, field.read_into_async
    field.read_into = lambda out, time, *args, **kw: (reads.append(time), original(out, time, *args, **kw))[-1]

    async def spy(out, time, *args, **kw):
        reads.append(time)
        return await original_async(out, time, *args, **kw)

    field.read_into_async = spy
    direct.example_batch()
    read_steps = sum(len(range(len(direct.store.times))[t]) for t in reads)
    # 4 examples x (2 inputs + 2 targets) at most (a time two examples share is read once),
    # not their 19-hour spans
    assert 0 < read_steps <= 4 * direct.spec.steps


def test_draws_are_reproducible_resumable_and_seeded(hourly):
    config = lead_config(hourly)
    store = build_loaders(config)[0].store
    spec = SampleSpec(2, 1, stride=6, leads=(1, 3, 6))
    starts = valid_starts(store.times, spec)

    def loader(seed: int = 3, workers: int = 0, **kw) -> ZarrLoader:
        return ZarrLoader(store, starts, spec, batch_size=4, seed=seed, num_workers=workers, **kw)

    def draws(batches) -> list[tuple]:
        return [(tuple(b.inputs.metadata.time), tuple(b.lead_hours)) for b in batches]

    whole = loader()
    whole.set_epoch(1)
    run = draws(whole)
    assert draws(_at_epoch(loader(workers=2), 1)) == run  # threads change nothing
    again = _at_epoch(loader(), 1)
    first = draws(b for _, b in zip(range(3), again))
    state = again.state_dict()
    assert state["lead_hours"] == [1.0, 3.0, 6.0]
    resumed = loader()
    resumed.load_state_dict(state)
    assert first + draws(resumed) == run  # a resumed run reads exactly the samples of an uninterrupted one
    other = _at_epoch(loader(seed=4), 1)
    assert [d[1] for d in draws(other)] != [d[1] for d in run]
    assert [d[1] for d in draws(_at_epoch(loader(), 2))] != [d[1] for d in run]  # and another epoch, another draw
    # two processes read halves of the same global batch, with the same draws
    halves = [next(iter(_at_epoch(loader(process_index=r, process_count=2), 1))) for r in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h.lead_hours for h in halves]), np.asarray(run[0][1], np.float32))
    with pytest.raises(UsageError, match="lead times 1,3,6 h, this one 1,6 h"):
        ZarrLoader(store, valid_starts(store.times, SampleSpec(2, 1, 6, (1, 6))), SampleSpec(2, 1, 6, (1, 6)), batch_size=4).load_state_dict(
            {**state, "batches": len(valid_starts(store.times, SampleSpec(2, 1, 6, (1, 6)))) // 4})


def _at_epoch(loader: ZarrLoader, epoch: int) -> ZarrLoader:
    loader.set_epoch(epoch)
    return loader


@pytest.mark.parametrize(
    ("leads", "timestep", "message"),
    [
        ((1.5, 6), None, "--lead_times 1.5 h is not a multiple of the store's 1 h time step"),
        ((1, 3, 6), 4.5, "the model step 4.5 h (--timestep_hours) is not a multiple of the store's 1 h time step"),
        ((0, 6), None, "lead_times must be positive"),
    ],
)
def test_bad_lead_times_are_one_line_errors(leads, timestep, message):
    with pytest.raises(UsageError) as err:
        lead_steps(leads, timestep, np.timedelta64(1, "h"))
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1
    assert lead_steps((1, 3, 6), None, np.timedelta64(1, "h")) == (6, (1, 3, 6))
    assert lead_steps((2, 4), 6.0, np.timedelta64(2, "h")) == (3, (1, 2))  # T from --timestep_hours


def test_lead_times_on_a_coarser_store_are_refused(six_hourly):
    with pytest.raises(UsageError, match="not a multiple of the store's 6 h time step") as err:
        build_loaders(lead_config(six_hourly, surf_vars=("2t",)))
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lead_times", "1,3,6"], "--lead_times 1 h is not a multiple of the store's 6 h time step"),
        (["--lead_times", "0,6"], "lead_times must be positive"),
        (["--lead_times", "1,six"], "lead_times must be a list of float"),
        (["--ensemble_members", "0"], "ensemble_members must be at least 1"),
    ],
)
def test_the_cli_refuses_bad_lead_times_in_one_line(six_hourly, tmp_path, capsys, flags, message):
    argv = ["--dataset_path", six_hourly, "--output_dir", str(tmp_path / "o"), "--model", "conv", "--batch_size", "2",
            "--num_gpus", "1", "--levels", "500,850", "--max_steps", "1", *flags]
    code = aurora_train(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o" / "config.json").exists()


def test_config_fields_and_defaults():
    config = TrainingConfig()
    assert config.lead_times == () and config.ensemble_members == 1
