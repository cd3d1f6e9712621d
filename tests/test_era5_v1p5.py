"""Aurora 1.5 from ERA5 as the CDS delivers it: ``aurora-loop convert`` turns ERA5-style
NetCDF files (short names, a pressure-level file and a single-level file that both call
geopotential ``z``, the categorical ``slt``/``tvh``/``tvl`` codes, no output-only variables, no
normalised insolation) into a store the 1.5 model reads, and ``aurora-loop forecast`` runs a
1.5 model from it, predicting the output-only variables the store lacks.

The ERA5-style files are made from the synthetic 1.5 store (hourly, 32 x 64), renamed back
to ERA5's short names, so every converted field can be checked against what it came from.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from aurora_loop.cli.tools import main as aurora_loop
from aurora_loop.datasets.convert import CATEGORICAL, ERA5_NAMES
from aurora_loop.datasets.variables import DEFAULT_MAP, SURF, V1P5_OUTPUT_ONLY

WB2_OUTPUT_ONLY = {wb2 for wb2, aurora in DEFAULT_MAP[SURF].items() if aurora in V1P5_OUTPUT_ONLY}
SHORT = {}
for short, wb2 in ERA5_NAMES.items():
    SHORT.setdefault(wb2, short)  # NetCDF spellings come first in ERA5_NAMES
SHORT["geopotential"] = "z"


@pytest.fixture(scope="module")
def era5(tmp_path_factory):
    """(synthetic 1.5 store, converted store): the ERA5-style files written and converted."""
    from aurora_loop.datasets.sample_data import write_sample_store

    root = tmp_path_factory.mktemp("era5-v1p5")
    sample = write_sample_store(str(root / "sample.zarr"), grid=(32, 64), times=24, step_hours=1, variables="v1p5", levels=(500, 850))
    ds = xr.open_zarr(sample, chunks=None).load()
    drop = [v for v in ds.data_vars if v in WB2_OUTPUT_ONLY or v == "toa_incident_solar_radiation_normalized"
            or any(v.startswith(f"{name}_") for name in CATEGORICAL)]
    codes = {}
    for name, categories in CATEGORICAL.items():  # one-hot maps -> ERA5's category codes
        maps = np.stack([ds[f"{name}_{k}"].values for k in categories])
        codes[name] = xr.DataArray(np.asarray(categories, np.float32)[maps.argmax(0)], dims=("latitude", "longitude"))
    flat = ds.drop_vars(drop).assign(**{n: v for n, v in codes.items() if n not in ds})
    levels = ["geopotential", "temperature", "u_component_of_wind", "v_component_of_wind", "specific_humidity"]
    pressure = flat[levels].rename({"level": "pressure_level", **{v: SHORT[v] for v in levels}})
    single = flat.drop_vars(levels + ["level"])
    single = single.rename({v: SHORT.get(v, "z" if v == "geopotential_at_surface" else v) for v in single.data_vars})
    # Longitudes in [-180, 180) and latitudes descending, as the CDS writes them.
    for part, name in ((pressure, "pressure.nc"), (single, "single.nc")):
        part = part.assign_coords(longitude=((part.longitude + 180) % 360) - 180).sortby("longitude").sortby("latitude", ascending=False)
        part.to_netcdf(root / name)
    out = root / "era5.zarr"
    assert aurora_loop(["convert", str(root / "pressure.nc"), str(root / "single.nc"), str(out)]) == 0
    return sample, str(out)


def test_convert_makes_the_one_hot_maps_and_the_insolation_of_aurora_1p5(era5):
    sample, converted = era5
    want, got = xr.open_zarr(sample, chunks=None), xr.open_zarr(converted, chunks=None)
    for name, categories in CATEGORICAL.items():
        assert name in got.data_vars  # the codes stay (Aurora 1.0 reads slt)
        for k in categories:
            np.testing.assert_array_equal(got[f"{name}_{k}"].values, want[f"{name}_{k}"].values, err_msg=f"{name}_{k}")
            assert got[f"{name}_{k}"].dims == ("latitude", "longitude")
    np.testing.assert_allclose(got["toa_incident_solar_radiation_normalized"].values, want["toa_incident_solar_radiation_normalized"].values,
                               atol=1e-6)
    assert not WB2_OUTPUT_ONLY & set(got.data_vars)
    assert got["geopotential"].dims == ("time", "level", "latitude", "longitude") and got["geopotential_at_surface"].dims == ("latitude", "longitude")


def test_a_1p5_model_forecasts_from_the_converted_store(era5, tmp_path):
    from tests.test_forecast_v1p5 import _write_checkpoint

    sample, converted = era5
    checkpoint = _write_checkpoint(str(tmp_path / "det"), "v1p5_tiny", sample)
    out = tmp_path / "fc.zarr"
    assert aurora_loop(["forecast", "--checkpoint", checkpoint, "--init", "2020-01-01T12", "--steps", "1", "--out", str(out),
                        "--dataset_path", converted, "--no-progress", "--num_devices", "1", "--batch_size", "1"]) == 0
    fc = xr.open_zarr(out, chunks=None)
    for name in WB2_OUTPUT_ONLY:  # predicted, though the store never held them
        assert name in fc.data_vars and np.isfinite(fc[name].values).all(), name
    # The same model from the synthetic store it was converted from gives the same forecast.
    again = tmp_path / "fc-sample.zarr"
    assert aurora_loop(["forecast", "--checkpoint", checkpoint, "--init", "2020-01-01T12", "--steps", "1", "--out", str(again),
                        "--dataset_path", sample, "--no-progress", "--num_devices", "1", "--batch_size", "1"]) == 0
    ref = xr.open_zarr(again, chunks=None)
    for name in ("2m_temperature", "boundary_layer_height", "temperature"):
        np.testing.assert_allclose(fc[name].values, ref[name].values, rtol=1e-4, atol=1e-4 * float(np.abs(ref[name].values).max()))
