"""The WeatherBench2 Zarr reader on stores written by xarray's to_zarr (formats 2 and 3)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from aurora_loop.datasets.sample_data import sample_dataset
from aurora_loop.datasets.store import WeatherStore
from aurora_loop.datasets.variables import VariableSelection
from aurora_loop.datasets.writer import write_store
from aurora_loop.errors import UsageError

LEVELS = (100, 500, 850)
SURF_MAP = {"2t": "2m_temperature", "10u": "10m_u_component_of_wind", "10v": "10m_v_component_of_wind", "msl": "mean_sea_level_pressure"}
ATMOS_MAP = {"z": "geopotential", "u": "u_component_of_wind", "v": "v_component_of_wind", "t": "temperature", "q": "specific_humidity"}
STATIC_MAP = {"lsm": "land_sea_mask", "z": "geopotential_at_surface", "slt": "soil_type"}


@pytest.fixture(scope="module")
def ds() -> xr.Dataset:
    return sample_dataset(grid=(9, 16), times=12, seed=3, levels=LEVELS)


def aurora_view(ds: xr.Dataset, name: str) -> np.ndarray:
    """Reference orientation computed independently with xarray: lat 90 -> -90, lon 0 -> 360."""
    lon = ds["longitude"] % 360
    return ds.assign_coords(longitude=lon).sortby("latitude", ascending=False).sortby("longitude")[name].values


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("chunks", [None, {"time": 5, "level": 2, "latitude": 4, "longitude": 7}])
def test_reads_every_variable_in_aurora_orientation(tmp_path, ds, zarr_format, chunks):
    path = write_store(ds, tmp_path / "s.zarr", zarr_format=zarr_format, chunks=chunks)
    store = WeatherStore(path, VariableSelection())
    assert np.all(np.diff(store.lat) < 0) and store.lat[0] == 90 and store.lat[-1] == -90
    assert np.all(np.diff(store.lon) > 0) and store.lon.min() >= 0 and store.lon.max() < 360
    assert store.levels == LEVELS
    assert store.time_step == np.timedelta64(6, "h")
    surf, atmos = store.read(3, 7)
    for name, wb2 in SURF_MAP.items():
        assert surf[name].shape == (4, 9, 16) and surf[name].dtype == np.float32
        np.testing.assert_array_equal(surf[name], aurora_view(ds, wb2)[3:7])
    for name, wb2 in ATMOS_MAP.items():
        assert atmos[name].shape == (4, 3, 9, 16)
        np.testing.assert_array_equal(atmos[name], aurora_view(ds, wb2)[3:7])
    for name, wb2 in STATIC_MAP.items():
        np.testing.assert_array_equal(store.static[name], aurora_view(ds, wb2))


def test_float64_longitudes_from_minus_180_and_descending_latitudes(tmp_path, ds):
    quirky = ds.astype("float64")
    quirky = quirky.assign_coords(longitude=((quirky.longitude + 180) % 360) - 180).sortby("longitude")
    quirky = quirky.sortby("latitude", ascending=False)
    assert float(quirky.longitude[0]) == -180.0
    store = WeatherStore(write_store(quirky, tmp_path / "q.zarr", zarr_format=3), VariableSelection(levels=(500,)))
    np.testing.assert_allclose(store.lon, np.arange(16) * 22.5)
    surf, atmos = store.read(0, 2)
    assert surf["2t"].dtype == np.float32
    np.testing.assert_allclose(surf["2t"], aurora_view(ds, "2m_temperature")[:2], rtol=1e-6)
    np.testing.assert_allclose(atmos["t"], aurora_view(ds, "temperature")[:2, 1:2], rtol=1e-6)


def test_level_subset_in_the_order_asked(tmp_path, ds):
    store = WeatherStore(write_store(ds, tmp_path / "s.zarr"), VariableSelection(levels=(850, 100)))
    _, atmos = store.read(0, 1)
    ref = aurora_view(ds, "geopotential")[0:1]
    np.testing.assert_array_equal(atmos["z"][:, 0], ref[:, 2])
    np.testing.assert_array_equal(atmos["z"][:, 1], ref[:, 0])
    assert store.levels == (850, 100)
    with pytest.raises(UsageError, match=r"\[300\] hPa are not in .* \(it has \[100, 500, 850\]\)"):
        WeatherStore(tmp_path / "s.zarr", VariableSelection(levels=(300, 500)))


def test_packed_integers_are_decoded_like_xarray(tmp_path, ds):
    out = tmp_path / "packed.zarr"
    ds.to_zarr(out, zarr_format=2, encoding={"2m_temperature": {"dtype": "int16", "scale_factor": 0.01, "add_offset": 280.0, "_FillValue": -32768}})
    store = WeatherStore(out, VariableSelection(surf=("2t",), atmos=(), static=()))
    surf, _ = store.read(0, 12)
    expected = aurora_view(xr.open_zarr(out, chunks=None), "2m_temperature")
    np.testing.assert_allclose(surf["2t"], expected, atol=1e-3)
    np.testing.assert_allclose(surf["2t"], aurora_view(ds, "2m_temperature"), atol=0.006)


def test_uneven_time_spacing_is_a_clear_error(tmp_path, ds):
    gap = ds.isel(time=[0, 1, 2, 4, 5, 6])
    with pytest.raises(UsageError, match=r"uneven time spacing .*6\.0 h steps.*12\.0 h"):
        WeatherStore(write_store(gap, tmp_path / "g.zarr"), VariableSelection())


def test_missing_path_and_not_a_store(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        WeatherStore(tmp_path / "nope.zarr", VariableSelection())
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.txt").write_text("hello")
    with pytest.raises(UsageError, match="not a readable Zarr store"):
        WeatherStore(tmp_path / "dir", VariableSelection())


def test_missing_variable_names_what_is_missing_and_what_the_store_has(tmp_path, ds):
    path = write_store(ds.drop_vars("specific_humidity"), tmp_path / "s.zarr")
    with pytest.raises(UsageError) as err:
        WeatherStore(path, VariableSelection())
    message = str(err.value)
    assert "'q'" in message and "specific_humidity" in message and "temperature" in message and "\n" not in message
    store = WeatherStore(path, VariableSelection(atmos=("z", "u", "v", "t")))
    assert set(store.fields["atmos"]) == {"z", "u", "v", "t"}


def test_variable_map_overrides_names(tmp_path, ds):
    path = write_store(ds.rename({"2m_temperature": "t2m", "temperature": "air"}), tmp_path / "s.zarr")
    with pytest.raises(UsageError, match="'2t' is not in"):
        WeatherStore(path, VariableSelection())
    store = WeatherStore(path, VariableSelection(variable_map={"t2m": "2t", "air": "t"}))
    surf, atmos = store.read(0, 1)
    np.testing.assert_array_equal(surf["2t"], aurora_view(ds, "2m_temperature")[:1])
    np.testing.assert_array_equal(atmos["t"], aurora_view(ds, "temperature")[:1])


def test_wrong_dimensions_are_named(tmp_path, ds):
    bad = ds.assign(temperature=ds["temperature"].isel(level=0, drop=True))
    with pytest.raises(UsageError, match=r"'temperature' .*has dims \('time', 'latitude', 'longitude'\)"):
        WeatherStore(write_store(bad, tmp_path / "s.zarr"), VariableSelection())


def test_static_fields_from_another_store(tmp_path, ds):
    statics = list(STATIC_MAP.values())
    main = write_store(ds.drop_vars(statics), tmp_path / "main.zarr", zarr_format=3)
    with pytest.raises(UsageError, match=r"static variable 'lsm' is in neither"):
        WeatherStore(main, VariableSelection())
    # the static store is WB2-like but with its own quirk: longitudes in [-180, 180)
    static_ds = ds[statics].assign_coords(longitude=((ds.longitude + 180) % 360) - 180).sortby("longitude")
    spath = write_store(static_ds, tmp_path / "static.zarr")
    store = WeatherStore(main, VariableSelection(), static_path=spath)
    for name, wb2 in STATIC_MAP.items():
        np.testing.assert_array_equal(store.static[name], aurora_view(ds, wb2))
    other = write_store(sample_dataset(grid=(5, 8), times=2, levels=LEVELS)[statics], tmp_path / "coarse.zarr")
    with pytest.raises(UsageError, match="5x8 grid unlike the data's 9x16"):
        WeatherStore(main, VariableSelection(), static_path=other)


@pytest.mark.parametrize(
    "quirk",
    ["wb2", "descending_lat", "float64", "lon_minus_180", "level_run", "level_pick", "members", "member_first", "packed"],
)
def test_reading_into_a_batch_matches_reading(tmp_path, ds, quirk):
    """The batch fast path (zarr decompressing into the batch, or into a latitude-reversed view
    of it) and the general path (read, decode, copy) give the same values for every layout."""
    from aurora_loop.datasets.samples import BatchArrays, SampleSpec

    levels: tuple[int, ...] = ()
    data = ds
    if quirk == "descending_lat":
        data = ds.sortby("latitude", ascending=False)
    elif quirk == "float64":
        data = ds.astype("float64")
    elif quirk == "lon_minus_180":
        data = ds.assign_coords(longitude=((ds.longitude + 180) % 360) - 180).sortby("longitude")
    elif quirk == "level_run":
        levels = (500, 850)
    elif quirk == "level_pick":
        levels = (850, 100)
    elif quirk in ("members", "member_first"):
        data = xr.concat([ds, ds + 1.0, ds * 2.0], dim="number").transpose("time", "number", ...)
        data = data.assign(land_sea_mask=ds["land_sea_mask"])
        if quirk == "member_first":
            data = data.transpose("number", "time", ...)
    path = tmp_path / "s.zarr"
    if quirk == "packed":
        ds.to_zarr(path, zarr_format=2, encoding={"temperature": {"dtype": "int16", "scale_factor": 0.01, "add_offset": 250.0, "_FillValue": -32768}})
    else:
        write_store(data, path, zarr_format=3)
    store = WeatherStore(path, VariableSelection(levels=levels), cache_mb=0)
    cached = WeatherStore(path, VariableSelection(levels=levels))
    assert not store.cached and cached.cached
    spec = SampleSpec(history=2, rollout_steps=2)
    member = 2 if quirk.startswith("member") else 0
    direct = store.fields["atmos"]["t"].reads_directly(store._level_index)
    assert direct == (quirk in ("wb2", "descending_lat", "level_run", "members", "member_first"))
    surf, atmos = store.read(4, 8, member=member)
    for source in (store, cached):
        arrays = BatchArrays(source, spec, size=2)
        arrays.fill(1, start=4, member=member)
        sample = arrays.sample()
        for name in surf:
            np.testing.assert_array_equal(sample.inputs.surf_vars[name][1], surf[name][:2])
            np.testing.assert_array_equal(sample.targets.surf_vars[name][1], surf[name][2:])
        for name in atmos:
            np.testing.assert_array_equal(sample.inputs.atmos_vars[name][1], atmos[name][:2])
            np.testing.assert_array_equal(sample.targets.atmos_vars[name][1], atmos[name][2:])
    if quirk.startswith("member"):
        assert store.members == 3
        np.testing.assert_allclose(atmos["z"], 2.0 * aurora_view(ds, "geopotential")[4:8], rtol=1e-6)
    if quirk == "level_pick":
        np.testing.assert_array_equal(atmos["t"][:, 0], aurora_view(ds, "temperature")[4:8, 2])


def test_static_fields_with_nans_are_refused(tmp_path, ds):
    holes = ds.copy(deep=True)
    holes["soil_type"][2, 3] = np.nan
    path = write_store(holes, tmp_path / "s.zarr")
    with pytest.raises(UsageError, match="static field 'slt' .* holds NaNs"):
        WeatherStore(path, VariableSelection())
    assert set(WeatherStore(path, VariableSelection(static=("lsm", "z"))).static) == {"lsm", "z"}


def test_only_stores_that_fit_are_cached(tmp_path, ds):
    path = write_store(ds, tmp_path / "s.zarr")
    selection = VariableSelection(levels=(500,))
    # 4 surface + 5 atmospheric fields (1 level) x 12 times x 9 x 16 float32 = 62208 bytes
    assert WeatherStore(path, selection, cache_mb=62208 / 2**20).cached
    assert not WeatherStore(path, selection, cache_mb=62207 / 2**20).cached
