"""The persistent compilation cache: on by default for aurora-train, off with `none`."""

from __future__ import annotations

import os
import re
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
    return done.stdout


def _train_step_entries(cache) -> list[str]:
    return sorted(name for name in os.listdir(cache) if name.startswith("jit_train_step"))


def test_aurora_train_fills_the_cache_and_the_rerun_uses_it(tmp_path):
    from aurora_loop.datasets.sample_data import write_sample_store

    write_sample_store(str(tmp_path / "store.zarr"), grid=(16, 32), times=24, levels=(500, 850))
    home = tmp_path / "cache"
    first = _train(tmp_path, "first", home)
    assert re.search(r"^Step 1: train step compiled in \d+\.\d s$", first, re.MULTILINE), first
    cache = home / "aurora_loop" / "xla"
    steps = _train_step_entries(cache)
    assert steps, f"the train step was not cached: {sorted(os.listdir(cache))}"
    second = _train(tmp_path, "second", home)
    # The console says where the step came from.
    assert re.search(r"^Step 1: train step loaded from the compilation cache in \d+\.\d s$", second, re.MULTILINE), second
    # Same shapes: the train step is served from the cache, so no new entry of it is written.
    # (Only the step: small programs near the cache's 0.5 s compile-time threshold may be
    # cached by one run and not the other, depending on the machine's load.)
    assert _train_step_entries(cache) == steps
    off = tmp_path / "off"
    third = _train(tmp_path, "third", off, "--compile_cache", "none")
    assert "Step 1: train step compiled in" in third
    assert not (off / "aurora_loop").exists()
