"""Samples, splits and the prefetching, resumable, process-sharded ZarrLoader."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from aurora_loop.data import Loader
from aurora_loop.datasets import build_loaders
from aurora_loop.datasets.loader import ZarrLoader, process_share
from aurora_loop.datasets.sample_data import sample_dataset, write_sample_store
from aurora_loop.datasets.samples import SampleSpec, read_sample, split_starts, valid_starts
from aurora_loop.datasets.store import WeatherStore
from aurora_loop.datasets.variables import VariableSelection
from aurora_loop.datasets.writer import write_store
from aurora_loop.errors import UsageError

TIMES = 40


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    return write_sample_store(tmp_path_factory.mktemp("data") / "s.zarr", grid=(8, 16), times=TIMES, seed=1, levels=(500, 850), zarr_format=3)


@pytest.fixture(scope="module")
def store(store_path) -> WeatherStore:
    return WeatherStore(store_path, VariableSelection(surf=("2t", "msl"), atmos=("z", "t")), cache_mb=0)  # zarr reads on threads


def config(path, **kw):
    base = dict(dataset_path=None if path is None else str(path), static_path=None, batch_size=4, num_workers=2, rollout_steps=2, seed=0,
                surf_vars=("2t", "msl"), static_vars=("lsm", "z"), atmos_vars=("z", "t"), levels=(), history=2,
                train_start=None, train_end=None, val_start=None, val_end=None, variable_map=None)
    base.update(kw)
    return SimpleNamespace(**base)


def fingerprint(batch) -> np.ndarray:
    """The start times of a batch's examples (hours since 1970), enough to identify it."""
    return np.asarray(batch.inputs.metadata.time)


def test_a_sample_holds_history_then_targets(store):
    spec = SampleSpec(history=2, rollout_steps=3)
    sample = read_sample(store, 5, spec)
    assert sample.inputs.surf_vars["2t"].shape == (1, 2, 8, 16)
    assert sample.targets.atmos_vars["z"].shape == (1, 3, 2, 8, 16)
    assert sample.inputs.static_vars["lsm"].shape == (8, 16)
    surf, atmos = store.read(5, 10)
    np.testing.assert_array_equal(sample.inputs.surf_vars["msl"][0], surf["msl"][:2])
    np.testing.assert_array_equal(sample.targets.atmos_vars["t"][0], atmos["t"][2:])
    # inputs carry the newest input's time, targets the first target's
    assert sample.inputs.metadata.datetimes[0].isoformat() == "2020-01-02T12:00:00"  # index 6
    assert sample.targets.metadata.datetimes[0].isoformat() == "2020-01-02T18:00:00"  # index 7
    assert sample.inputs.metadata.time.dtype == np.float64
    assert sample.inputs.metadata.atmos_levels == (500, 850)


def test_valid_starts_respect_ranges(store):
    spec = SampleSpec(2, 2)
    assert valid_starts(store.times, spec).tolist() == list(range(TIMES - 3))
    starts = valid_starts(store.times, spec, "2020-01-02", "2020-01-03T18")
    assert starts.tolist() == [4, 5, 6, 7, 8]  # 2020-01-02 00 is index 4; index 11 = 01-03 18 is the last target
    with pytest.raises(UsageError, match="train_start='yesterday' is not an ISO date"):
        valid_starts(store.times, spec, "yesterday", None, name="train")


def test_default_split_keeps_validation_after_training(store):
    spec = SampleSpec(2, 2)
    train, val = split_starts(store.times, spec, batch_size=4)
    last_train_target = train.max() + spec.span - 1
    assert last_train_target < val.min()  # no training target reaches a validation input
    assert val.size >= 4 and val.max() + spec.span - 1 == TIMES - 1
    assert TIMES - val.min() == 8  # 20% of 40 times
    _, val = split_starts(store.times, spec, batch_size=9)  # at least one validation batch
    assert val.size == 9
    with pytest.raises(UsageError, match="holds 40 times, too few"):
        split_starts(store.times, SampleSpec(2, 2), batch_size=20)


def test_loader_is_the_protocol_and_deterministic(store):
    starts = valid_starts(store.times, SampleSpec(2, 1))
    a = ZarrLoader(store, starts, SampleSpec(2, 1), batch_size=4, seed=7, num_workers=3)
    b = ZarrLoader(store, starts, SampleSpec(2, 1), batch_size=4, seed=7, num_workers=0)
    assert isinstance(a, Loader) and len(a) == starts.size // 4
    run_a = [fingerprint(x) for x in a]
    run_b = [fingerprint(x) for x in b]
    assert len(run_a) == len(a) and all(np.array_equal(x, y) for x, y in zip(run_a, run_b))
    seen = np.concatenate(run_a)
    assert np.unique(seen).size == seen.size  # no start twice in an epoch
    a.set_epoch(1)
    assert not np.array_equal(np.concatenate([fingerprint(x) for x in a]), seen)
    a.set_epoch(0)
    assert np.array_equal(np.concatenate([fingerprint(x) for x in a]), seen)


@pytest.mark.parametrize("workers", [0, 3])
def test_resume_continues_with_exactly_the_next_batch(store, workers):
    spec = SampleSpec(2, 2)
    starts = valid_starts(store.times, spec)
    full = ZarrLoader(store, starts, spec, batch_size=3, seed=5, num_workers=workers)
    full.set_epoch(2)
    expected = list(full)
    first = ZarrLoader(store, starts, spec, batch_size=3, seed=5, num_workers=workers)
    first.set_epoch(2)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()  # read-ahead batches do not count
    it.close()
    assert state["epoch"] == 2 and state["position"] == 4
    resumed = ZarrLoader(store, starts, spec, batch_size=3, seed=5, num_workers=workers)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(expected) - 4
    for got, want in zip(rest, expected[4:]):
        np.testing.assert_array_equal(fingerprint(got), fingerprint(want))
        np.testing.assert_array_equal(got.targets.atmos_vars["z"], want.targets.atmos_vars["z"])
    other = ZarrLoader(store, starts, spec, batch_size=2, seed=5)
    with pytest.raises(UsageError, match="batches per epoch"):
        other.load_state_dict(state)


def test_each_process_reads_its_share(store):
    spec = SampleSpec(2, 1)
    starts = valid_starts(store.times, spec)
    whole = ZarrLoader(store, starts, spec, batch_size=4, seed=2, process_index=0, process_count=1)
    parts = [ZarrLoader(store, starts, spec, batch_size=4, seed=2, process_index=r, process_count=2) for r in range(2)]
    for g, p0, p1 in zip(whole, *parts):
        assert p0.inputs.surf_vars["2t"].shape[0] == 2
        np.testing.assert_array_equal(np.concatenate([fingerprint(p0), fingerprint(p1)]), fingerprint(g))
        np.testing.assert_array_equal(np.concatenate([p0.inputs.surf_vars["2t"], p1.inputs.surf_vars["2t"]]), g.inputs.surf_vars["2t"])
    assert process_share(8, 3, 4) == slice(6, 8)
    with pytest.raises(UsageError, match="does not split evenly over 3 processes"):
        process_share(8, 0, 3)
    assert jax.process_count() == 1  # the default reads jax's process layout


def test_early_stop_leaves_no_reader_threads(store):
    spec = SampleSpec(2, 1)
    loader = ZarrLoader(store, valid_starts(store.times, spec), spec, batch_size=2, num_workers=4, prefetch=6)
    it = iter(loader)
    next(it)
    it.close()
    for t in threading.enumerate():
        if t.name.startswith("aurora-data"):
            t.join(timeout=10)
    assert not [t for t in threading.enumerate() if t.name.startswith("aurora-data") and t.is_alive()]
    assert loader.position == 1


def test_nan_samples_error_or_are_skipped_and_counted(tmp_path):
    ds = sample_dataset(grid=(4, 8), times=12, levels=(500,))
    ds["2m_temperature"][5, 1, 2] = np.nan
    path = write_store(ds, tmp_path / "nan.zarr")
    spec = SampleSpec(2, 1)
    store = WeatherStore(path, VariableSelection(surf=("2t",), static=(), atmos=()))
    starts = valid_starts(store.times, spec)  # 0..9; starts 3, 4, 5 touch index 5
    strict = ZarrLoader(store, starts, spec, batch_size=2, shuffle=False)
    with pytest.raises(UsageError, match="NaN in the sample starting 2020-01-01T18"):
        list(strict)
    lenient = ZarrLoader(store, starts, spec, batch_size=2, shuffle=False, nan_policy="skip", num_workers=2)
    batches = [fingerprint(b) for b in lenient]
    got = np.concatenate(batches)
    assert lenient.skipped == 3 and not np.isnan(got).any()
    newest_input = (got - store.hours[0]).round().astype(int) // 6  # index of the newest input
    assert list(newest_input) == [1, 2, 3, 7, 7, 7, 7, 8, 9, 10]  # 3, 4, 5 replaced by the next clean start, 6


def test_build_loaders_from_a_config(store_path):
    train, val = build_loaders(config(store_path))
    assert len(train) == (TIMES - 8 - 3) // 4 and len(val) == (8 - 3) // 4
    assert train.time_step == np.timedelta64(6, "h")  # the model's lead time per step
    batch = next(iter(train))
    assert set(batch.inputs.surf_vars) == {"2t", "msl"} and set(batch.inputs.static_vars) == {"lsm", "z"}
    assert batch.inputs.atmos_vars["z"].shape == (4, 2, 2, 8, 16) and batch.targets.atmos_vars["t"].shape == (4, 2, 2, 8, 16)
    assert list(iter(val))[0].inputs.metadata.time.min() > max(fingerprint(b).max() for b in train)
    train2, _ = build_loaders(config(store_path, train_start="2020-01-01", train_end="2020-01-05T18", val_start="2020-01-06", val_end="2020-01-10T18"))
    assert len(train2) == (20 - 3) // 4  # 20 times from 01-01 00 to 01-05 18
    with pytest.raises(UsageError, match="no dataset_path"):
        build_loaders(config(None))
    with pytest.raises(UsageError, match="fewer than one batch of 4"):
        build_loaders(config(store_path, val_start="2020-01-09T18", val_end="2020-01-10T18"))


def test_the_trainer_reads_one_batch_to_learn_the_shapes(store):
    """Building the train state needs one batch: the loader's example_batch reads just that
    one, on the caller's thread, without moving the position (before: the prefetching
    iterator read num_workers + 1 batches and more)."""
    import optax

    from aurora_loop.callbacks import Callback
    from aurora_loop.parallel import make_mesh
    from aurora_loop.tasks.conv import ConvTask
    from aurora_loop.trainer import Trainer

    class CountingLoader(ZarrLoader):
        loads = 0

        def _load(self, order, position, share):
            CountingLoader.loads += 1
            return super()._load(order, position, share)

    class LoadsAtStart(Callback):
        def on_fit_start(self, trainer):
            self.loads = CountingLoader.loads

    spec = SampleSpec(history=2, rollout_steps=1)
    starts = valid_starts(store.times, spec)
    loader = CountingLoader(store, starts, spec, batch_size=2, num_workers=3, prefetch=6)
    first = loader.example_batch()
    assert CountingLoader.loads == 1 and loader.state_dict()["position"] == 0
    plain = ZarrLoader(store, starts, spec, batch_size=2, num_workers=0)
    np.testing.assert_array_equal(fingerprint(first), fingerprint(next(iter(plain))))
    CountingLoader.loads = 0
    probe = LoadsAtStart()
    Trainer([probe], optimizer=optax.adam(1e-3), max_steps=1, mesh=make_mesh(1)).fit(ConvTask(), loader)
    assert probe.loads == 1
