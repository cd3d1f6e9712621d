"""Does the data path keep up? Two comparisons on one generated store, in one process.

1. Loader throughput vs plain zarr reads of the same arrays with the same threads:
   samples/s of each (medians of interleaved repeats), ``loader_over_raw=<ratio>`` (goal >= 0.9).
2. The conv baseline's jitted train step fed by the loader (read, place, step) vs fed the
   same batches already on the device: ``overlap_ratio=<from disk / in memory>`` (goal <= 1.05,
   loading hides behind compute), printed last.

Usage: python benchmarks/loader_throughput.py [--grid 181x360] [--levels 13] [--times 48] [--workers 2] [--batch 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import tempfile
import time

import numpy as np
import zarr

from aurora_loop.datasets.loader import ZarrLoader
from aurora_loop.datasets.sample_data import write_sample_store
from aurora_loop.datasets.samples import SampleSpec, valid_starts
from aurora_loop.datasets.store import WeatherStore
from aurora_loop.datasets.variables import VariableSelection

WB2_LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grid", default="181x360")
    p.add_argument("--levels", type=int, default=13)
    p.add_argument("--times", type=int, default=48)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--store", default=None, help="reuse this store (written if missing)")
    a = p.parse_args()
    h, w = (int(v) for v in a.grid.split("x"))
    path = a.store or os.path.join(tempfile.mkdtemp(), "bench.zarr")
    if not os.path.exists(path):
        t0 = time.perf_counter()
        write_sample_store(path, grid=(h, w), times=a.times, levels=WB2_LEVELS[-a.levels:], seed=0)
        print(f"wrote {path} in {time.perf_counter() - t0:.1f}s")
    spec = SampleSpec(2, 1)
    store = WeatherStore(path, VariableSelection(), cache_mb=0)  # read from disk, as for a large store
    starts = valid_starts(store.times, spec)
    n = (starts.size // a.batch) * a.batch
    group = zarr.open_group(path, mode="r")
    names = [f.store_name for kind in store.fields.values() for f in kind.values()]
    arrays = [group[name] for name in names]

    def raw_batch(batch_starts):
        return [arr[s : s + spec.span] for s in batch_starts for arr in arrays]

    def run_raw() -> float:
        order = np.random.default_rng(0).permutation(starts)[:n].reshape(-1, a.batch)
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(a.workers) as pool:
            for _ in pool.map(raw_batch, order):
                pass
        return n / (time.perf_counter() - t0)

    loader = ZarrLoader(store, starts, spec, batch_size=a.batch, seed=0, num_workers=a.workers)

    def run_loader() -> float:
        """One epoch of the same loader, as in training (its batch memory is recycled)."""
        loader.set_epoch(loader.epoch + 1)
        t0 = time.perf_counter()
        count = sum(b.batch_size for b in loader)
        return count / (time.perf_counter() - t0)

    run_raw(), run_loader()  # warm the page cache and zarr
    raws, loaders = [], []
    for _ in range(a.repeats):  # interleaved, so other load on the machine hits both alike
        raws.append(run_raw())
        loaders.append(run_loader())
    raw, loader_rate = statistics.median(raws), statistics.median(loaders)
    mb = sum(arr.nbytes for arr in arrays) / store.times.size * spec.span / 2**20
    print(f"grid {h}x{w}, {len(store.levels)} levels, {mb:.0f} MiB per sample, {a.workers} workers, batch {a.batch}")
    print(f"raw zarr: {raw:.2f} samples/s  loader: {loader_rate:.2f} samples/s (medians of {a.repeats})")
    print(f"loader_over_raw={loader_rate / raw:.3f}")

    # 2. Overlap: the same train step fed from disk and from memory.
    import jax
    import optax

    from aurora_loop.parallel import batch_shardings, make_mesh, place_batch
    from aurora_loop.step import make_init_fn, make_train_step, state_shardings
    from aurora_loop.tasks.conv import ConvTask

    mesh = make_mesh(1)
    loader.set_epoch(0)
    first = next(iter(loader))
    shardings = batch_shardings(first, mesh)
    task, optimizer = ConvTask(), optax.adam(1e-4)
    init_fn = make_init_fn(task, optimizer, seed=0)
    example = place_batch(first, shardings)
    state_sharding = state_shardings(jax.eval_shape(init_fn, example), mesh)
    step_fn = make_train_step(task, optimizer, state_sharding, jax.tree.map(lambda x: x.sharding, example), mesh)
    init = jax.jit(init_fn, out_shardings=state_sharding)

    def train(batches) -> float:
        state = init(example)
        state, metrics = step_fn(state, example)  # compiled and warm before timing
        jax.block_until_ready(state)
        start = time.perf_counter()
        for batch in batches:
            state, metrics = step_fn(state, place_batch(batch, shardings))
        jax.block_until_ready((state, metrics))
        return time.perf_counter() - start

    def from_disk() -> float:
        loader.set_epoch(loader.epoch + 1)
        return train(loader)

    loader.set_epoch(1)
    in_memory = [place_batch(b, shardings) for b in loader]
    from_disk(), train(in_memory)
    disk_times, memory_times = [], []
    for _ in range(a.repeats):
        disk_times.append(from_disk())
        memory_times.append(train(in_memory))
    disk, memory = statistics.median(disk_times), statistics.median(memory_times)
    print(f"train steps ({len(in_memory)} per epoch, conv): fed from disk {disk:.2f} s, from memory {memory:.2f} s (medians)")
    print(f"overlap_ratio={disk / memory:.3f}")


if __name__ == "__main__":
    main()
