"""Does the data path keep up? Reads of one WeatherBench2-layout store, side by side, in one process.

The store is zarr v2 as WeatherBench2's 0.25 degree ERA5 (one time per chunk, blosc lz4 +
shuffle, consolidated metadata), written by zarr-beluga's ``write_wb2_fixture(preset="era5")``
(by our sample writer when zarr-beluga is not installed). A sample is 2 input times and 1
target of 4 surface and 5 x ``--levels`` atmospheric fields, in a shuffled order.

1. Throughput at 1, 2, ... workers (``--worker_counts``), decoded GB/s and samples/s, medians
   of ``--repeats`` interleaved rounds: plain reads (each sample's chunk files read and
   decoded by the codec into a buffer on the same threads: the codec's limit), our
   ``ZarrLoader`` and zarr-beluga's reader from local disk; then both readers from an HTTP
   server in another process that answers every request ``--latency_ms`` late.
2. The conv baseline's jitted train step fed by the loader (read, place, step) vs fed the
   same batches already on the device: ``overlap_ratio=<from disk / in memory>`` (goal <= 1.05,
   loading hides behind compute).

Last lines: ``overlap_ratio``, ``loader_over_beluga_remote``, ``loader_over_beluga_local`` and,
last, ``loader_over_raw`` (samples/s ratios at the most workers; goals >= 1, >= 2 and >= 0.9).

Usage: python benchmarks/loader_throughput.py [--grid 181x360] [--levels 13] [--times 48] [--workers 2] [--batch 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import importlib.util
import os
import statistics
import subprocess
import sys
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
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_store(directory: str, h: int, w: int, times: int, levels: int) -> str:
    try:
        import beluga
    except ImportError:
        return write_sample_store(os.path.join(directory, "bench.zarr"), grid=(h, w), times=times, levels=WB2_LEVELS[-levels:], seed=0)
    beluga.write_wb2_fixture(directory, "bench.zarr", preset="era5", height=h, width=w, n_time=times)
    return os.path.join(directory, "bench.zarr")


def _decode_threads(n: int) -> None:
    """zarr's event loop decodes on its default executor: give it ``n`` threads."""
    from zarr.core.sync import _get_executor, _get_loop

    _get_executor()  # zarr installs its own first; replace it
    loop = _get_loop()
    done = cf.Future()
    loop.call_soon_threadsafe(lambda: (loop.set_default_executor(cf.ThreadPoolExecutor(n, thread_name_prefix="decode")), done.set_result(None)))
    done.result()


def _median_round(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved, so other load on the machine hits all alike
        for name, fn in fns.items():
            rates[name].append(fn())
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grid", default="181x360")
    p.add_argument("--levels", type=int, default=13)
    p.add_argument("--times", type=int, default=48)
    p.add_argument("--workers", type=int, default=2, help="reader threads of the train-overlap part")
    p.add_argument("--worker_counts", default=None, help="comma list of thread counts compared (default: 1 up to the machine's cores)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=None, help="samples per round (default: every valid start)")
    p.add_argument("--prefetch", type=int, default=2, help="batches read ahead by the loader (zarr-beluga: as many samples)")
    p.add_argument("--latency_ms", type=float, default=50.0, help="the HTTP server's delay per request")
    p.add_argument("--train_batches", type=int, default=None, help="batches per train-overlap epoch (default: all; 0 skips part 2 and prints overlap_ratio=nan)")
    p.add_argument("--store", default=None, help="reuse this store (written if missing)")
    p.add_argument("--ab_fsspec", action="store_true", help="also read the HTTP server with zarr over fsspec (aiohttp) instead of obstore")
    a = p.parse_args()
    missing = [m for m in ("aiohttp", "requests") if a.ab_fsspec and importlib.util.find_spec(m) is None]
    if missing:  # fsspec's HTTP filesystem needs both; say so before minutes of writing the store
        print(f"--ab_fsspec reads through fsspec's HTTP filesystem, which needs {' and '.join(missing)}: "
              f"pip install -e '.[bench]' (or drop --ab_fsspec)", file=sys.stderr)
        sys.exit(2)
    h, w = (int(v) for v in a.grid.split("x"))
    counts = [int(v) for v in a.worker_counts.split(",")] if a.worker_counts else list(range(1, (os.cpu_count() or 1) + 1))
    path = a.store or os.path.join(tempfile.mkdtemp(), "bench.zarr")
    if not os.path.exists(path):
        t0 = time.perf_counter()
        path = _write_store(os.path.dirname(path), h, w, a.times, a.levels)
        print(f"wrote {path} in {time.perf_counter() - t0:.1f}s")
    spec = SampleSpec(2, 1)
    selection = VariableSelection(static=("lsm",), levels=WB2_LEVELS[-a.levels:])
    store = WeatherStore(path, selection, cache_mb=0)  # read from disk, as for a large store
    starts = valid_starts(store.times, spec)
    n = (min(starts.size, a.samples or starts.size) // a.batch) * a.batch
    order = np.random.default_rng(0).permutation(starts)[:n]
    group = zarr.open_group(path, mode="r")
    fields = [f for kind in store.fields.values() for f in kind.values()]
    arrays = [group[f.store_name] for f in fields]
    level_index = [list(group["level"][:]).index(v) for v in store.levels]
    per_time = sum(int(np.prod(arr.shape[1:])) // (arr.shape[1] if arr.ndim == 4 else 1) * (len(level_index) if arr.ndim == 4 else 1) for arr in arrays)
    sample_bytes = per_time * 4 * spec.steps
    print(f"grid {h}x{w}, {len(store.levels)} levels, {sample_bytes / 2**20:.0f} MiB per sample (float32), {n} samples per round, batch {a.batch}")

    # --- the readers ------------------------------------------------------------------------------
    def raw_sample(start: int) -> None:
        """Plain reads: each chunk file of the sample read and decoded into one buffer."""
        for arr in arrays:
            codec = arr.metadata.compressor if hasattr(arr.metadata, "compressor") else None
            out = np.empty(arr.shape[1:], arr.dtype)
            for t in range(start, start + spec.steps):
                key = f"{t}" + ".0" * (arr.ndim - 1)
                with open(os.path.join(path, arr.path, key), "rb") as fh:
                    data = fh.read()
                if codec is None:
                    out[...] = np.frombuffer(data, arr.dtype).reshape(out.shape)
                else:
                    codec.decode(data, out=out)

    def run_raw(threads: int) -> float:
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(threads) as pool:
            list(pool.map(raw_sample, order))
        return n / (time.perf_counter() - t0)

    def loader_for(where: str, threads: int, client: str = "obstore") -> ZarrLoader:
        if client == "fsspec":  # the A/B that chose obstore: the same zarr reads through fsspec's HTTP filesystem
            from zarr.storage import FsspecStore

            import aurora_loop.datasets.store as store_module

            opened = store_module.open_store
            store_module.open_store = lambda url, *_: FsspecStore.from_url(url, read_only=True)
            try:
                source = WeatherStore(where, selection, cache_mb=0)
            finally:
                store_module.open_store = opened
        else:
            source = store if where == path else WeatherStore(where, selection, cache_mb=0)
        return ZarrLoader(source, order, spec, batch_size=a.batch, shuffle=False, num_workers=threads, prefetch=a.prefetch,
                          process_index=0, process_count=1)

    def run_loader(loader: ZarrLoader, threads: int) -> float:
        _decode_threads(threads)
        loader.set_epoch(0)
        t0 = time.perf_counter()
        count = sum(b.batch_size for b in loader)
        return count / (time.perf_counter() - t0)

    try:
        import beluga
    except ImportError:
        beluga = None
    names = [f.store_name for f in store.fields["atmos"].values()] + [f.store_name for f in store.fields["surf"].values()]

    def beluga_reader(where: str, threads: int):
        options = {"allow_http": "true"} if where.startswith("http") else None
        reader = beluga.open_zarr_group(os.path.dirname(where) if not where.startswith("http") else where.rsplit("/", 1)[0],
                                        os.path.basename(where), variables=names, sched={"decode_threads": threads, "prefetch_depth": a.prefetch * a.batch}, store_options=options)
        wanted = [f"{v}_{lv}" for v in names[: len(store.fields["atmos"])] for lv in store.levels] + names[len(store.fields["atmos"]):]
        channels = [reader.meta["channels"].index(c) for c in wanted]
        return reader, channels

    def run_beluga(reader_channels, threads: int) -> float:
        reader, channels = reader_channels
        t0 = time.perf_counter()
        count = 0
        for sample in reader.stream([int(s) for s in order], frames=spec.steps, channels=channels):
            np.from_dlpack(sample)
            count += 1
        return count / (time.perf_counter() - t0)

    # --- local disk, then the latency server --------------------------------------------------------
    server = subprocess.Popen([sys.executable, "-m", "tests.servers", os.path.dirname(path), str(a.latency_ms / 1e3)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    url = f"{server.stdout.readline().strip()}/{os.path.basename(path)}"
    results: dict[tuple[str, int], float] = {}
    try:
        for threads in counts:
            # Local disk, then the server: one phase's readers at a time (a 0.25 degree sample is
            # 0.8 GB, and every reader keeps several in flight).
            for phase in ("local", "remote"):
                where = path if phase == "local" else url
                ours = loader_for(where, threads)
                sides = {"ZarrLoader": lambda lo=ours, t=threads: run_loader(lo, t)}
                if phase == "local":
                    sides["plain reads"] = lambda t=threads: run_raw(t)
                elif a.ab_fsspec:
                    via_fsspec = loader_for(url, threads, "fsspec")
                    via_fsspec._pool = ours._pool  # one set of recycled batch buffers
                    sides["ZarrLoader (zarr + fsspec)"] = lambda lo=via_fsspec, t=threads: run_loader(lo, t)
                if beluga is not None:
                    sides["zarr-beluga"] = lambda r=beluga_reader(where, threads), t=threads: run_beluga(r, t)
                for fn in sides.values():
                    fn()  # warm the page cache, the readers and the server
                label = "local" if phase == "local" else f"{a.latency_ms:g} ms HTTP"
                for name, rate in _median_round(sides, a.repeats).items():
                    results[(f"{label}: {name}", threads)] = rate
                del ours, sides
                via_fsspec = None
                gc.collect()
    finally:
        server.terminate()
        server.wait()
    rows = sorted({k for k, _ in results}, key=lambda k: (k.startswith("local") is False, k))
    print(f"| reader | {' | '.join(f'{t} worker(s): samples/s (GB/s)' for t in counts)} |")
    print(f"| --- | {' | '.join('---' for _ in counts)} |")
    for row in rows:
        cells = [f"{results[(row, t)]:.2f} ({results[(row, t)] * sample_bytes / 1e9:.2f})" if (row, t) in results else "-" for t in counts]
        print(f"| {row} | {' | '.join(cells)} |")
    top = counts[-1]
    ratios = {
        "loader_over_beluga_remote": results.get((f"{a.latency_ms:g} ms HTTP: ZarrLoader", top), np.nan) / results.get((f"{a.latency_ms:g} ms HTTP: zarr-beluga", top), np.nan),
        "loader_over_beluga_local": results.get(("local: ZarrLoader", top), np.nan) / results.get(("local: zarr-beluga", top), np.nan),
        "loader_over_raw": results[("local: ZarrLoader", top)] / results[("local: plain reads", top)],
    }
    loader = ZarrLoader(store, order, spec, batch_size=a.batch, seed=0, num_workers=a.workers)

    # 2. Overlap: the same train step fed from disk and from memory.
    if a.train_batches == 0:
        print("overlap_ratio=nan")
        for name, value in ratios.items():
            print(f"{name}={value:.3f}")
        return
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
        return train(b for _, b in zip(range(len(in_memory)), loader))

    loader.set_epoch(1)
    in_memory = [place_batch(b, shardings) for _, b in zip(range(a.train_batches or len(loader)), loader)]  # noqa: B020
    from_disk(), train(in_memory)
    disk_times, memory_times = [], []
    for _ in range(a.repeats):
        disk_times.append(from_disk())
        memory_times.append(train(in_memory))
    disk, memory = statistics.median(disk_times), statistics.median(memory_times)
    print(f"train steps ({len(in_memory)} per epoch, conv): fed from disk {disk:.2f} s, from memory {memory:.2f} s (medians)")
    print(f"overlap_ratio={disk / memory:.3f}")
    for name, value in ratios.items():
        print(f"{name}={value:.3f}")


if __name__ == "__main__":
    main()
