"""The persistent compilation cache: on by default for aurora-train, off with `none`."""

from __future__ import annotations

import os
import subprocess
import sys


def _train(tmp_path, name, cache_home, *extra):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(cache_home), JAX_NUM_CPU_DEVICES="1")
    command = [sys.executable, "-m", "aurora_loop.cli.train", "--model", "conv", "--output_dir", str(tmp_path / name),
               "--dataset_path", str(tmp_path / "store.zarr"), "--levels", "500,850", "--batch_size", "2",
               "--num_gpus", "1", "--max_steps", "1", "--num_workers", "1", *extra]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_aurora_train_fills_the_cache_and_the_rerun_uses_it(tmp_path):
    from aurora_loop.datasets.sample_data import write_sample_store

    write_sample_store(str(tmp_path / "store.zarr"), grid=(16, 32), times=24, levels=(500, 850))
    home = tmp_path / "cache"
    _train(tmp_path, "first", home)
    cache = home / "aurora_loop" / "xla"
    entries = sorted(os.listdir(cache))
    assert entries, "nothing was cached"
    _train(tmp_path, "second", home)  # same shapes: served from the cache, nothing new to write
    assert sorted(os.listdir(cache)) == entries
    off = tmp_path / "off"
    _train(tmp_path, "third", off, "--compile_cache", "none")
    assert not (off / "aurora_loop").exists()
