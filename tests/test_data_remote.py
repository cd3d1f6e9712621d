"""Stores in object storage, against real servers on 127.0.0.1.

- moto's S3 server holds a WeatherBench2-layout store written by xarray (behind a recording
  proxy, so the tests see every request and who made it): aurora-train trains and resumes
  from ``s3://`` like from the local copy, ``aurora-loop stats`` and ``forecast`` read it, two
  processes each read only their share, and a missing bucket, a missing store, a denied
  bucket and a wrong layout are one line and exit status 2.
- An HTTP server that answers every request 50 ms late: one batch costs about one round
  trip (all its chunks in flight at once, the next batches' too), the chunk cache serves the
  second epoch from local disk, and an outage that outlasts the retries stops a training run
  with a checkpoint (exit 75) that a rerun resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr

from aurora_loop.callbacks.base import Callback
from aurora_loop.cli.tools import main as aurora_loop
from aurora_loop.cli.train import main as aurora_train
from aurora_loop.datasets.loader import ZarrLoader
from aurora_loop.datasets.samples import SampleSpec, valid_starts
from aurora_loop.datasets.store import WeatherStore
from aurora_loop.datasets.variables import VariableSelection
from tests.servers import LatencyServer, S3Server, free_port
from tests.xla_flags import FAST_COMPILE

GRID, LEVELS = (16, 32), (500, 850)
TRAIN = ["--model", "conv", "--num_gpus", "1", "--batch_size", "2", "--levels", "500,850", "--num_workers", "1", "--cache_mb", "0",
         "--log_every_n_steps", "1", "--save_every_n_steps", "2", "--warmup_steps", "1", "--learning_rate", "1e-3", "--epochs", "1",
         "--val_every_n_steps", "100", "--lr_schedule_steps", "8"]
SELECTION = VariableSelection(surf=("2t", "msl"), static=("lsm",), atmos=("z", "t"), levels=LEVELS)
RETRY_FAST = json.dumps({"retry": {"max_retries": 2, "retry_timeout_s": 1, "init_backoff_s": 0.05, "max_backoff_s": 0.2}})


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> str:
    from aurora_loop.datasets.sample_data import write_sample_store

    return write_sample_store(str(tmp_path_factory.mktemp("remote") / "sample.zarr"), grid=GRID, times=24, levels=LEVELS)


@pytest.fixture(scope="module")
def s3(local_store, tmp_path_factory):
    """moto's S3 server behind a recording proxy: s3://wb2/era5/sample.zarr (public),
    s3://private/sample.zarr (no public access) and s3://wb2/flat.zarr (not the WB2 layout)."""
    server = S3Server()
    proxy = LatencyServer(upstream=server.endpoint, latency_s=0.0)
    server.public_bucket("wb2")
    url = server.upload(local_store, "wb2", "era5/sample.zarr")
    server.client().create_bucket(Bucket="private")
    server.upload(local_store, "private", "sample.zarr")
    flat = str(tmp_path_factory.mktemp("flat") / "flat.zarr")
    xr.Dataset({"x": (("a", "b"), np.zeros((2, 3), np.float32))}).to_zarr(flat, zarr_format=2)
    server.upload(flat, "wb2", "flat.zarr")
    patch = pytest.MonkeyPatch()
    patch.setenv("AWS_ENDPOINT_URL", proxy.url)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        patch.delenv(name, raising=False)  # anonymous, as for a public bucket
    yield {"url": url, "server": server, "proxy": proxy}
    patch.undo()
    proxy.stop()
    server.stop()


@pytest.fixture(scope="module")
def s3_runs(s3, local_store, tmp_path_factory):
    """conv trained 2 steps from S3, then resumed to 4; and 4 steps from the local copy."""
    root = tmp_path_factory.mktemp("s3-runs")
    remote, local = root / "remote", root / "local"
    codes = [aurora_train(["--dataset_path", s3["url"], "--output_dir", str(remote), "--max_steps", "2", *TRAIN]),
             aurora_train(["--dataset_path", s3["url"], "--output_dir", str(remote), "--max_steps", "4", *TRAIN]),
             aurora_train(["--dataset_path", local_store, "--output_dir", str(local), "--max_steps", "4", *TRAIN])]
    return {"codes": codes, "remote": remote, "local": local}


def _params(run, step: int):
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        path = (run / "checkpoints" / str(step) / "state").resolve()
        tree = checkpointer.metadata(path).item_metadata.tree
        import jax

        return checkpointer.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


def test_training_from_s3_resumes_and_matches_the_local_store(s3_runs, s3):
    import jax

    assert s3_runs["codes"] == [0, 0, 0]
    remote, local = _params(s3_runs["remote"], 4), _params(s3_runs["local"], 4)
    for a, b in zip(jax.tree.leaves(remote), jax.tree.leaves(local)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert (s3_runs["remote"] / "checkpoints" / "2").is_dir()  # the first leg saved, the second resumed from it
    assert s3["proxy"].chunk_requests(), "the runs read chunks through the S3 server"


def test_stats_and_forecast_read_s3_like_the_local_store(s3_runs, s3, local_store, tmp_path):
    args = ["--surf_vars", "2t,msl", "--atmos_vars", "z,t", "--static_vars", "lsm", "--no_progress"]
    assert aurora_loop(["stats", s3["url"], "--out", str(tmp_path / "remote.json"), *args]) == 0
    assert aurora_loop(["stats", local_store, "--out", str(tmp_path / "local.json"), *args]) == 0
    remote, local = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("remote", "local"))
    assert remote["locations"] == local["locations"] and remote["scales"] == local["scales"]

    common = ["forecast", "--checkpoint", str(s3_runs["remote"]), "--init", "2020-01-04T00", "--steps", "2", "--no-progress", "--num_devices", "1"]
    assert aurora_loop([*common, "--dataset_path", s3["url"], "--out", str(tmp_path / "remote.zarr")]) == 0
    assert aurora_loop([*common, "--dataset_path", local_store, "--out", str(tmp_path / "local.zarr")]) == 0
    remote, local = (xr.open_zarr(tmp_path / f"{n}.zarr", chunks=None) for n in ("remote", "local"))
    assert remote.attrs["dataset_path"] == s3["url"]
    for name in local.data_vars:
        np.testing.assert_array_equal(remote[name].values, local[name].values)


@pytest.mark.parametrize("where, words", [
    ("s3://no-such-bucket/era5.zarr", "bucket or container of 's3://no-such-bucket/era5.zarr' does not exist"),
    ("s3://wb2/era5/missing.zarr", "no Zarr store at 's3://wb2/era5/missing.zarr'"),
    ("s3://private/sample.zarr", "was denied"),
    ("s3://wb2/flat.zarr", "has no latitude/longitude coordinates"),
])
def test_bad_remote_stores_are_one_line_and_exit_2(s3, where, words, tmp_path, capsys):
    out = tmp_path / "run"
    assert aurora_train(["--dataset_path", where, "--output_dir", str(out), "--max_steps", "1", *TRAIN]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err
    assert not (out / "config.json").exists()


def test_bad_storage_options_are_one_line(s3, tmp_path, capsys):
    assert aurora_loop(["stats", s3["url"], "--out", str(tmp_path / "s.json"), "--storage_options", "{oops"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--storage_options is not JSON" in err and len(err.splitlines()) == 1


# --- two processes ------------------------------------------------------------------------------
def _two_processes(command: list[str], tmp_path) -> list[subprocess.CompletedProcess]:
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR"))}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", XLA_FLAGS=FAST_COMPILE, PYTHONUNBUFFERED="1")
    procs = []
    for i in range(2):
        agent = json.dumps({"client_options": {"user_agent": f"aurora-process-{i}"}})
        flags = ["--coordinator_address", address, "--num_processes", "2", "--process_id", str(i), "--storage_options", agent]
        procs.append(subprocess.Popen(command + flags, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the two-process run hung")
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def _chunk_times(requests) -> set[tuple[str, int]]:
    """{(variable, time index)} of chunk requests like /wb2/era5/sample.zarr/temperature/7.0.0.0."""
    out = set()
    for path, _, _ in requests:
        parts = path.split("?")[0].strip("/").split("/")
        if len(parts) >= 2 and parts[-1].split(".")[0].isdigit():
            out.add((parts[-2], int(parts[-1].split(".")[0])))
    return out


def test_two_processes_train_from_s3_each_reading_its_share(s3, local_store, tmp_path):
    """2 processes x 1 device, batch 2, sharing one chunk cache: 2 steps, then a rerun resumes
    to 4 and validates; each process's chunk requests lie within its own share."""
    proxy = s3["proxy"]
    proxy.reset()
    out = tmp_path / "run"
    for steps in ("2", "4"):
        command = [sys.executable, "-m", "aurora_loop.cli.train", "--dataset_path", s3["url"], "--output_dir", str(out), "--max_steps", steps,
                   "--cache_dir", str(tmp_path / "cache"), *[a for a in TRAIN if a != "--num_gpus"]]
        command.remove("1")  # --num_gpus's value: all devices of both processes
        done = _two_processes(command, tmp_path)
        for i, d in enumerate(done):
            assert d.returncode == 0, f"process {i}: {d.stderr[-2000:]}"
        assert (out / "checkpoints" / steps).is_dir()
    assert "val loss" in done[0].stdout  # the resumed leg ended with a validation

    # Each process's share of every batch of epoch 0, training and validation (prefetch stays in the epoch).
    from aurora_loop.config import TrainingConfig
    from aurora_loop.datasets import build_loaders

    config = TrainingConfig(dataset_path=local_store, batch_size=2, levels=LEVELS, surf_vars=("2t", "10u", "10v", "msl"), cache_mb=0)
    train, val = build_loaders(config)
    shares = []
    for i in range(2):
        times = set()
        for loader in (train, val):
            loader._process = (i, 2)
            order = loader._rows(0)
            for position in range(len(loader)):
                for row in order[position * 2 + i: position * 2 + i + 1]:
                    times.update((int(row[1]) + loader.spec.offsets()).tolist())
        shares.append(times)
    for i in range(2):
        fields = {f.store_name for kind in train.store.fields.values() for f in kind.values()}  # not coordinates or statics
        read = {t for name, t in _chunk_times(proxy.chunk_requests(agent=f"aurora-process-{i}")) if name in fields}
        assert read, f"process {i} read nothing from the server"
        assert read <= shares[i], f"process {i} read times outside its share: {sorted(read - shares[i])}"
    assert shares[0] != shares[1]


# --- latency, prefetch, cache, outages ------------------------------------------------------------
@pytest.fixture(scope="module")
def slow(local_store):
    """The local store served over HTTP, every request answered 50 ms late."""
    server = LatencyServer(os.path.dirname(local_store), latency_s=0.05)
    yield server, f"{server.url}/{os.path.basename(local_store)}"
    server.stop()


def _loader(path: str, prefetch: int, **store_kw) -> ZarrLoader:
    store = WeatherStore(path, SELECTION, cache_mb=0, **store_kw)
    spec = SampleSpec(2, 1)
    return ZarrLoader(store, valid_starts(store.times, spec), spec, batch_size=2, num_workers=1, prefetch=prefetch, process_index=0, process_count=1)


def test_a_batch_costs_one_round_trip_and_the_next_batches_are_in_flight(slow, local_store):
    server, url = slow
    loader = _loader(url, prefetch=1)
    server.reset()
    start = time.perf_counter()
    batch = loader.example_batch()
    elapsed = time.perf_counter() - start
    chunks = server.chunk_requests()
    # 2 examples x 3 times x 4 variables, each chunk once, requested together: on an idle machine all
    # of them are open at the same moment; a loaded one (CI's two cores, 17 of 24 once) may answer the
    # first before it sends the last. One request at a time would be 1 in flight, a pool of 4 at most 4.
    assert len(chunks) == len(_chunk_times(chunks)) * 1 and len(chunks) <= 24
    assert server.max_in_flight(chunks) >= 0.5 * len(chunks), "the batch's chunks were not in flight together"
    print(f"one batch of {len(chunks)} chunks over 50 ms round trips: {elapsed * 1e3:.0f} ms")
    reference = _loader(local_store, prefetch=1).example_batch()
    for name in ("2t", "msl"):
        np.testing.assert_array_equal(batch.inputs.surf_vars[name], reference.inputs.surf_vars[name])
    np.testing.assert_array_equal(batch.targets.atmos_vars["z"], reference.targets.atmos_vars["z"])

    loader = _loader(url, prefetch=3)
    server.reset()
    batches = sum(1 for _ in loader)
    chunks = server.chunk_requests()
    per_batch = len(chunks) / batches
    assert server.max_in_flight(chunks) > per_batch, "the next batches' chunks were not in flight with the first's"


def test_the_chunk_cache_serves_the_second_epoch_and_stays_bounded(slow, local_store, tmp_path):
    server, url = slow
    cache = tmp_path / "cache"
    loader = _loader(url, prefetch=2, cache_dir=str(cache))
    server.reset()
    first = [b.targets.atmos_vars["t"].copy() for b in loader]
    read_first = len(server.chunk_requests())
    loader.set_epoch(0)
    server.reset()
    second = [b.targets.atmos_vars["t"].copy() for b in loader]
    assert read_first > 0 and server.chunk_requests() == []  # the second epoch read local disk only
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    chunk_cache = loader.store._source.group.store
    assert chunk_cache.hits > 0 and chunk_cache.cached_bytes() > 0

    # A bound smaller than the store: the cache evicts down to it and the reads stay right.
    tiny = _loader(url, prefetch=2, cache_dir=str(tmp_path / "tiny"), cache_gb=20e3 / 1e9)
    tiny_batches = [b.targets.atmos_vars["t"].copy() for b in tiny]
    for a, b in zip(first, tiny_batches):
        np.testing.assert_array_equal(a, b)
    assert tiny.store._source.group.store.cached_bytes() <= 20e3


OUTAGE: dict[str, LatencyServer] = {}


class OutageAt(Callback):
    """Takes the test's HTTP server down (503 on every request) after ``step``."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_step(self, trainer, step, metrics):
        if step == self.step:
            OUTAGE["server"].fail = True


def test_an_outage_stops_training_with_a_checkpoint_and_a_rerun_resumes(slow, tmp_path, capsys):
    server, url = slow
    OUTAGE["server"] = server
    out = tmp_path / "run"
    common = ["--dataset_path", url, "--output_dir", str(out), "--max_steps", "6", "--storage_options", RETRY_FAST, *TRAIN]
    try:
        code = aurora_train([*common, "--callback", "tests.test_data_remote:OutageAt"])
    finally:
        server.fail = False
    err = capsys.readouterr().err
    assert code == 75, err
    assert "rerun the same command to resume" in err and "kept failing after retries" in err
    saved = sorted(int(p) for p in os.listdir(out / "checkpoints") if p.isdigit())
    assert saved and 2 <= saved[-1] < 6  # the last completed step was saved
    assert aurora_train(common) == 0  # the store answers again: the rerun resumes and finishes
    assert (out / "checkpoints" / "6").is_dir()
