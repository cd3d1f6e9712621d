"""`aurora-loop convert`: NetCDF and GRIB (via cfgrib, in the [test] extra) -> WB2-layout Zarr."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from aurora_loop.cli.tools import main as aurora_loop
from aurora_loop.datasets.convert import convert
from aurora_loop.datasets.store import WeatherStore
from aurora_loop.datasets.variables import VariableSelection
from aurora_loop.errors import UsageError

ERA5 = Path(__file__).parent / "data" / "era5-levels-members.nc"
ATMOS_ONLY = VariableSelection(surf=(), static=(), atmos=("z", "t"))


@pytest.fixture(scope="module")
def era5() -> xr.Dataset:
    return xr.open_dataset(ERA5)


def test_era5_converts_to_the_wb2_layout_and_reads_back(tmp_path, era5, capsys):
    out = tmp_path / "era5.zarr"
    assert aurora_loop(["convert", str(ERA5), str(out)]) == 0
    assert "geopotential, temperature" in capsys.readouterr().out
    ds = xr.open_zarr(out, chunks=None)
    assert set(ds.data_vars) == {"geopotential", "temperature"}
    assert ds["geopotential"].dims == ("time", "number", "level", "latitude", "longitude")
    assert ds["level"].values.tolist() == [500, 850] and ds["latitude"].values[0] == -90.0
    assert ds["geopotential"].dtype == np.float32

    store = WeatherStore(out, VariableSelection(surf=(), static=(), atmos=("z", "t"), levels=(850, 500)))
    assert store.members == 10 and store.time_step == np.timedelta64(12, "h") and store.levels == (850, 500)
    _, atmos = store.read(1, 3, member=7)
    # the source is already in Aurora's orientation (lat 90 -> -90, lon 0 -> 357, levels 850, 500)
    src_z = era5["z"].isel(number=7, time=slice(1, 3)).values
    src_t = era5["t"].isel(number=7, time=slice(1, 3)).values
    np.testing.assert_allclose(atmos["z"], src_z, rtol=1e-6)
    np.testing.assert_allclose(atmos["t"], src_t, rtol=1e-6)
    assert 40000 < atmos["z"][:, 1].mean() < 60000 and 200 < atmos["t"].mean() < 300  # z500 ~ 5.5 km


def test_one_member_and_float64(tmp_path, era5):
    ds = convert([ERA5], tmp_path / "m.zarr", member=3, dtype="float64", zarr_format=3)
    assert "number" not in ds.dims and ds["temperature"].dtype == np.float64
    store = WeatherStore(tmp_path / "m.zarr", ATMOS_ONLY)
    assert store.members == 1 and store.levels == (500, 850)
    _, atmos = store.read(0, 4)
    np.testing.assert_array_equal(atmos["t"][:, 0], era5["t"].isel(number=3, isobaricInhPa=1).values.astype(np.float32))


def test_netcdf_with_other_conventions(tmp_path):
    """lat/lon names, -180..180 longitudes, levels in Pa, ERA5 surface names, two files by time,
    static fields with a time dim: written by netCDF4, read back in Aurora's orientation."""
    rng = np.random.default_rng(0)
    lat = np.linspace(90, -90, 7)
    lon = np.arange(-180, 180, 45.0)
    def part(t0: int) -> xr.Dataset:
        time = np.datetime64("2021-06-01T00", "ns") + np.arange(t0, t0 + 3) * np.timedelta64(6, "h")
        return xr.Dataset(
            {
                "t2m": (("time", "lat", "lon"), 280 + rng.standard_normal((3, 7, 8))),
                "msl": (("time", "lat", "lon"), 1e5 + rng.standard_normal((3, 7, 8))),
                "q": (("time", "plev", "lat", "lon"), rng.random((3, 2, 7, 8)) * 1e-2),
                "lsm": (("time", "lat", "lon"), np.broadcast_to((rng.random((1, 7, 8)) > 0.5) * 1.0, (3, 7, 8))),
            },
            coords={"time": time, "plev": ("plev", [85000.0, 50000.0], {"units": "Pa"}), "lat": lat, "lon": lon},
        )
    files = []
    for i, t0 in enumerate((3, 0)):  # out of order on purpose
        path = tmp_path / f"part{i}.nc"
        part(t0).to_netcdf(path, engine="netcdf4")
        files.append(path)
    whole = xr.concat([xr.open_dataset(files[1]), xr.open_dataset(files[0])], dim="time")
    out = tmp_path / "o.zarr"
    convert(files, out)
    written = xr.open_zarr(out, chunks=None)
    assert written["level"].values.tolist() == [500, 850]
    assert written["land_sea_mask"].dims == ("latitude", "longitude")
    store = WeatherStore(out, VariableSelection(surf=("2t", "msl"), static=("lsm",), atmos=("q",)))
    assert len(store) == 6 and store.levels == (500, 850)
    np.testing.assert_allclose(store.lon, np.arange(0, 360, 45.0))
    surf, atmos = store.read(0, 6)
    expected = whole.assign_coords(lon=whole.lon % 360).sortby("lon")
    np.testing.assert_allclose(surf["2t"], expected["t2m"].values, rtol=1e-6)
    np.testing.assert_allclose(atmos["q"], expected["q"].isel(plev=[1, 0]).values, rtol=1e-6)
    np.testing.assert_array_equal(store.static["lsm"], expected["lsm"].isel(time=0).values)


def test_converted_coordinates_are_the_sources_bit_for_bit(tmp_path):
    """float32 latitudes (descending, 180/7 degrees apart: not round numbers) and float32
    longitudes already in [0, 360) come out reordered but with the source's values and dtype,
    and the reader keeps them for the forecast writer."""
    lat = np.linspace(90, -90, 8).astype(np.float32)
    lon = np.arange(0, 360, 45.0).astype(np.float32)
    time = np.datetime64("2021-06-01T00", "ns") + np.arange(3) * np.timedelta64(6, "h")
    source = xr.Dataset({"t2m": (("time", "latitude", "longitude"), 280 + np.zeros((3, 8, 8), np.float32))},
                        coords={"time": time, "latitude": lat, "longitude": lon})
    source.to_netcdf(tmp_path / "s.nc", engine="netcdf4")
    convert([tmp_path / "s.nc"], tmp_path / "o.zarr")
    written = xr.open_zarr(tmp_path / "o.zarr", chunks=None)
    assert written.latitude.dtype == written.longitude.dtype == np.float32
    np.testing.assert_array_equal(written.latitude.values, lat[::-1])
    np.testing.assert_array_equal(written.longitude.values, lon)
    store = WeatherStore(tmp_path / "o.zarr", VariableSelection(surf=("2t",), static=(), atmos=()))
    np.testing.assert_array_equal(store.grid.lat_values, lat)  # Aurora's order: descending
    np.testing.assert_array_equal(store.grid.lon_values, lon)


def test_bad_sources_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "o.zarr"
    with pytest.raises(UsageError, match="does not exist"):
        convert([tmp_path / "missing.nc"], out)
    junk = tmp_path / "junk.nc"
    junk.write_text("not netcdf")
    with pytest.raises(UsageError, match="cannot open"):
        convert([junk], out)
    with pytest.raises(UsageError, match="out of range; the sources hold 10 members"):
        convert([ERA5], out, member=10)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if "partial" in p]
    out.mkdir()
    assert aurora_loop(["convert", str(ERA5), str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1


def test_grib_converts_like_the_netcdf(tmp_path, era5):
    # cfgrib and eccodes are in the [test] extra: without them this fails (ImportError), it does not skip.
    import cfgrib  # noqa: F401
    import eccodes  # noqa: F401

    grib = Path(__file__).parent / "data" / "era5-levels-members.grib"
    assert grib.is_file(), f"the GRIB sample {grib} is shipped with the tests and missing"
    ds = convert([grib], tmp_path / "g.zarr")
    np.testing.assert_allclose(ds["temperature"].isel(number=0, level=1).values[:, ::-1], era5["t"].isel(number=0, isobaricInhPa=0).values, rtol=1e-6)
