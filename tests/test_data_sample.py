"""The synthetic sample-data generator and its `aurora-loop sample-data` tool."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from aurora_loop.cli.tools import main as aurora_loop
from aurora_loop.datasets.sample_data import sample_dataset, write_sample_store


@pytest.fixture(scope="module")
def ds() -> xr.Dataset:
    return sample_dataset(grid=(16, 32), times=80, seed=0, levels=(100, 500, 850))


def test_same_seed_same_store_other_seed_other_weather(tmp_path, ds):
    path = write_sample_store(tmp_path / "a.zarr", grid=(16, 32), times=80, seed=0, levels=(100, 500, 850))
    written = xr.open_zarr(path, chunks=None)
    for name in ds.data_vars:
        np.testing.assert_array_equal(written[name].values, ds[name].values)
    other = sample_dataset(grid=(16, 32), times=80, seed=1, levels=(100, 500, 850))
    assert not np.allclose(other["temperature"].values, ds["temperature"].values)
    assert written["latitude"].values[0] == -90 and written["latitude"].values[-1] == 90  # WB2: ascending
    assert written.sizes == {"time": 80, "level": 3, "latitude": 16, "longitude": 32}


@pytest.mark.parametrize(
    ("name", "level", "mean_range", "std_range"),
    [
        ("geopotential", 500, (5.0e4, 5.8e4), (1.0e3, 5.0e3)),  # ~5.5 km heights
        ("geopotential", 850, (1.2e4, 1.6e4), (3.0e2, 2.0e3)),
        ("temperature", 850, (260.0, 285.0), (6.0, 25.0)),
        ("temperature", 100, (200.0, 235.0), (1.0, 10.0)),
        ("u_component_of_wind", 500, (0.0, 20.0), (5.0, 20.0)),
        ("specific_humidity", 850, (1e-3, 1e-2), (1e-3, 1e-2)),
        ("specific_humidity", 100, (1e-7, 1e-4), (0.0, 1e-4)),
        ("2m_temperature", None, (270.0, 295.0), (8.0, 25.0)),
        ("mean_sea_level_pressure", None, (1.005e5, 1.02e5), (4e2, 2.5e3)),
        ("10m_u_component_of_wind", None, (-3.0, 5.0), (2.0, 8.0)),
    ],
)
def test_realistic_means_and_spreads(ds, name, level, mean_range, std_range):
    x = ds[name] if level is None else ds[name].sel(level=level)
    x = x.values
    assert mean_range[0] < x.mean() < mean_range[1]
    assert std_range[0] < x.std() < std_range[1]
    if name == "specific_humidity":
        assert x.min() > 0


def test_static_fields_are_plausible(ds):
    lsm = ds["land_sea_mask"].values
    assert set(np.unique(lsm)) == {0.0, 1.0} and 0.2 < lsm.mean() < 0.6
    orography = ds["geopotential_at_surface"].values
    assert (orography[lsm == 0] == 0).all() and (orography[lsm == 1] > 0).all()
    soil = ds["soil_type"].values
    assert (soil[lsm == 0] == 0).all() and set(np.unique(soil[lsm == 1])) <= set(range(1, 8))


def test_the_next_step_is_learnable(ds):
    """A linear map of the last two steps (a few longitude shifts per row, fitted by least
    squares) predicts the next step far better than persistence: the fields move and decay
    by rules, and only a small forcing is random."""
    anomaly = ds["geopotential"].sel(level=500).values.astype(np.float64)
    anomaly -= anomaly.mean(axis=0)
    clim = anomaly.std()
    persistence = np.sqrt(((anomaly[2:] - anomaly[1:-1]) ** 2).mean()) / clim
    shifts = range(-2, 3)
    features = np.stack([np.roll(anomaly[1:-1], s, axis=-1) for s in shifts] + [np.roll(anomaly[:-2], s, axis=-1) for s in shifts], axis=-1)
    target = anomaly[2:]
    errors = []
    for row in range(anomaly.shape[1]):
        x, y = features[:, row].reshape(-1, 10), target[:, row].reshape(-1)
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        errors.append(((x @ coef - y) ** 2).mean())
    learned = np.sqrt(np.mean(errors)) / clim
    assert 0.05 < persistence < 0.5  # the weather changes, but not into noise
    assert learned < 0.75 * persistence


def test_tool_writes_a_store_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert aurora_loop(["sample-data", str(out), "--grid", "8x16", "--times", "6", "--seed", "2", "--zarr_format", "3"]) == 0
    ds = xr.open_zarr(out, chunks=None, consolidated=False)
    assert ds.sizes["time"] == 6 and ds.sizes["latitude"] == 8 and ds.sizes["longitude"] == 16
    assert "wrote" in capsys.readouterr().out
    assert aurora_loop(["sample-data", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
