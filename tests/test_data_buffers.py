"""Recycled batch memory: reused only once nothing refers to it."""

from __future__ import annotations

import gc

import numpy as np

from aurora_loop.datasets.buffers import BufferPool
from aurora_loop.datasets.loader import ZarrLoader
from aurora_loop.datasets.sample_data import write_sample_store
from aurora_loop.datasets.samples import SampleSpec, read_sample, valid_starts
from aurora_loop.datasets.store import WeatherStore
from aurora_loop.datasets.variables import VariableSelection


def test_memory_comes_back_only_when_every_view_is_gone():
    pool = BufferPool()
    a = pool.empty((4, 3, 5))
    a[...] = 1.0
    view = a[1:, :2]  # a derived view keeps the memory in use
    del a
    gc.collect()
    assert pool.idle() == 0
    b = pool.empty((4, 3, 5))
    b[...] = 2.0
    assert pool.allocated == 2 and (view == 1.0).all()
    del view, b
    gc.collect()
    assert pool.idle() == 2
    c = pool.empty((60,))  # same number of bytes, another shape: reused
    assert pool.allocated == 2 and c.shape == (60,) and c.dtype == np.float32
    assert pool.empty((0, 3)).shape == (0, 3)


def test_held_batches_keep_their_values_while_the_loader_recycles(tmp_path):
    path = write_sample_store(tmp_path / "s.zarr", grid=(8, 16), times=30, levels=(500,))
    store = WeatherStore(path, VariableSelection(surf=("2t",), static=(), atmos=("t",)))
    spec = SampleSpec(2, 1)
    loader = ZarrLoader(store, valid_starts(store.times, spec), spec, batch_size=3, shuffle=False, num_workers=2)
    batches = iter(loader)
    held = next(batches)  # kept for the whole epoch
    expected = read_sample(store, 0, spec).inputs.atmos_vars["t"][0]
    for _ in batches:  # each later batch is dropped at once, so its memory can be reused
        gc.collect()
    np.testing.assert_array_equal(held.inputs.atmos_vars["t"][0], expected)
    fields, batches_in_flight = 2, loader.prefetch + 2  # read ahead, held by the test, in use
    assert loader._pool.allocated <= fields * (batches_in_flight + 1) < fields * len(loader)
