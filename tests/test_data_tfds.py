"""Record sources (TFDS data sources and plain lists) read like WB2 Zarr stores."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr

from aurora_loop.datasets import build_loaders
from aurora_loop.datasets.sample_data import sample_dataset
from aurora_loop.datasets.store import WeatherStore
from aurora_loop.datasets.tfds_source import RecordStore
from aurora_loop.datasets.variables import VariableSelection
from aurora_loop.datasets.writer import write_store
from aurora_loop.errors import UsageError

LEVELS = (250, 500, 850)


@pytest.fixture(scope="module")
def ds() -> xr.Dataset:
    return sample_dataset(grid=(6, 12), times=24, seed=4, levels=LEVELS)


def records(ds: xr.Dataset, with_coords: bool = True) -> list[dict[str, np.ndarray]]:
    """One dict per time step, WB2 keys, time as int64 seconds since 1970."""
    out = []
    for i in range(ds.sizes["time"]):
        step = ds.isel(time=i)
        record = {name: step[name].values for name in ds.data_vars}
        record["time"] = np.int64(step["time"].values.astype("datetime64[s]").astype(np.int64))
        if with_coords:
            record.update(latitude=ds["latitude"].values, longitude=ds["longitude"].values, level=ds["level"].values)
        out.append(record)
    return out


def test_shuffled_records_read_like_the_zarr_store(tmp_path, ds):
    zarr_store = WeatherStore(write_store(ds, tmp_path / "s.zarr"), VariableSelection(levels=(850, 250)))
    shuffled = records(ds)
    np.random.default_rng(0).shuffle(shuffled)
    store = RecordStore(shuffled, VariableSelection(levels=(850, 250)))
    np.testing.assert_array_equal(store.times, zarr_store.times)
    np.testing.assert_array_equal(store.lat, zarr_store.lat)
    assert store.levels == (850, 250) and store.time_step == np.timedelta64(6, "h")
    for name, value in zarr_store.static.items():
        np.testing.assert_array_equal(store.static[name], value)
    got, want = store.read(3, 7), zarr_store.read(3, 7)
    for a, b in zip(got, want):
        for name in b:
            np.testing.assert_array_equal(a[name], b[name])


class CountingSource(list):
    """A list that counts the records read."""

    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


def test_records_in_time_order_are_not_scanned(ds):
    ordered = CountingSource(records(ds))
    store = RecordStore(ordered, VariableSelection(surf=("2t",), static=(), atmos=()))
    assert ordered.reads <= 18 < len(ordered)  # the first record and 16 probes + record 1, not all 24
    np.testing.assert_array_equal(store.times, ds["time"].values)
    shuffled = CountingSource(records(ds)[::-1])
    RecordStore(shuffled, VariableSelection(surf=("2t",), static=(), atmos=()))
    assert shuffled.reads > len(shuffled)  # out of order: every record's time is read once


def test_bad_records_are_clear_errors(ds):
    plain = records(ds, with_coords=False)
    with pytest.raises(UsageError, match="no 'latitude'/'longitude'"):
        RecordStore(plain, VariableSelection())
    store = RecordStore(plain, VariableSelection(), lat=ds["latitude"].values, lon=ds["longitude"].values, levels=LEVELS)
    assert store.shape == (6, 12)
    gappy = [r for i, r in enumerate(records(ds)) if i != 5]
    with pytest.raises(UsageError, match="uneven time spacing"):
        RecordStore(gappy, VariableSelection())
    no_q = [{k: v for k, v in r.items() if k != "specific_humidity"} for r in records(ds)]
    with pytest.raises(UsageError, match=r"atmos variable 'q' is not in the records .*temperature"):
        RecordStore(no_q, VariableSelection())


@pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is None or importlib.util.find_spec("array_record") is None,
                    reason="needs tensorflow-datasets and array_record (the tfds extra)")
def test_a_tfds_array_record_dataset_feeds_the_loader_without_tensorflow(tmp_path, ds):
    """Prepare a real TFDS dataset (array_record files, shuffled by TFDS) in a subprocess,
    then load it through build_loaders with dataset_path='tfds:NAME': the batches equal the
    Zarr loader's on the same data."""
    write_store(ds, tmp_path / "s.zarr")
    data_dir = tmp_path / "tfds"
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import tensorflow_datasets as tfds
        import xarray as xr

        ds = xr.open_zarr({str(tmp_path / "s.zarr")!r}, chunks=None)

        class TinyWeather(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                features = {{name: tfds.features.Tensor(shape=ds[name].shape[1:] if "time" in ds[name].dims else ds[name].shape, dtype=np.float32)
                            for name in ds.data_vars}}
                features.update(
                    time=tfds.features.Scalar(np.int64),
                    latitude=tfds.features.Tensor(shape=(ds.sizes["latitude"],), dtype=np.float64),
                    longitude=tfds.features.Tensor(shape=(ds.sizes["longitude"],), dtype=np.float64),
                    level=tfds.features.Tensor(shape=(ds.sizes["level"],), dtype=np.int64),
                )
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

            def _split_generators(self, dl_manager):
                return {{"train": self._generate_examples()}}

            def _generate_examples(self):
                for i in range(ds.sizes["time"]):
                    step = ds.isel(time=i)
                    record = {{name: step[name].values for name in ds.data_vars}}
                    record.update(time=np.int64(step["time"].values.astype("datetime64[s]").astype(np.int64)),
                                  latitude=ds["latitude"].values, longitude=ds["longitude"].values, level=ds["level"].values)
                    yield i, record

        TinyWeather(data_dir={str(data_dir)!r}, file_format="array_record").download_and_prepare()
        print("tensorflow imported:", "tensorflow" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    if importlib.util.find_spec("tensorflow") is None:
        assert "tensorflow imported: False" in done.stdout

    common = dict(batch_size=2, num_workers=2, rollout_steps=2, seed=3, surf_vars=("2t", "msl"), static_vars=("lsm",),
                  atmos_vars=("z", "q"), levels=(500, 850), variable_map=None, static_path=None)
    tfds_train, tfds_val = build_loaders(SimpleNamespace(dataset_path="tfds:tiny_weather", tfds_data_dir=str(data_dir), **common))
    zarr_train, zarr_val = build_loaders(SimpleNamespace(dataset_path=str(tmp_path / "s.zarr"), **common))
    assert len(tfds_train) == len(zarr_train) and len(tfds_val) == len(zarr_val)
    tfds_train.set_epoch(1)
    zarr_train.set_epoch(1)
    for a, b in zip([*tfds_train, *tfds_val], [*zarr_train, *zarr_val]):
        np.testing.assert_array_equal(a.inputs.metadata.time, b.inputs.metadata.time)
        np.testing.assert_array_equal(a.targets.atmos_vars["q"], b.targets.atmos_vars["q"])
        np.testing.assert_array_equal(a.inputs.surf_vars["msl"], b.inputs.surf_vars["msl"])
        np.testing.assert_array_equal(a.inputs.static_vars["lsm"], b.inputs.static_vars["lsm"])
    with pytest.raises(UsageError, match="cannot be opened as an array_record data source"):
        build_loaders(SimpleNamespace(dataset_path="tfds:no_such_weather", tfds_data_dir=str(data_dir), **common))
