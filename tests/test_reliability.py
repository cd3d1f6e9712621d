"""Long runs die: a rerun of the same command must continue exactly.

Each test drives the real ``aurora-train`` in a subprocess, kills it from outside at a chosen
step (SIGKILL: no handler runs, async checkpoint writes are torn mid-way; SIGTERM: the
graceful path), reruns the same command and compares the final parameters bit for bit with
an uninterrupted run's (CPU, deterministic).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

pytestmark = pytest.mark.slow

MAX_STEPS = 12


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from aurora_loop.datasets.sample_data import write_sample_store

    path = tmp_path_factory.mktemp("data") / "sample.zarr"
    write_sample_store(str(path), grid=(16, 32), times=40, levels=(500, 850))
    return str(path)


def command(store: str, out) -> list[str]:
    return [sys.executable, "-m", "aurora_loop.cli.train", "--dataset_path", store, "--output_dir", str(out),
            "--model", "conv", "--batch_size", "2", "--num_gpus", "1", "--levels", "500,850",
            "--max_steps", str(MAX_STEPS), "--epochs", "50", "--save_every_n_steps", "2",
            "--log_every_n_steps", "1", "--val_every_n_steps", "5", "--learning_rate", "1e-3", "--warmup_steps", "2"]


def env() -> dict[str, str]:
    return dict(os.environ, JAX_NUM_CPU_DEVICES="1", PYTHONUNBUFFERED="1")


def run_to_end(store: str, out) -> subprocess.CompletedProcess:
    result = subprocess.run(command(store, out), capture_output=True, text=True, env=env(), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def run_and_signal_at(store: str, out, step: int, signum: int, pattern: str = r"step (\d+)/") -> tuple[int, str]:
    """Start the run, send ``signum`` once a line matching ``pattern`` names ``step`` or later."""
    proc = subprocess.Popen(command(store, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            match = re.search(pattern, line)
            if match and int(match.group(1)) >= step:
                proc.send_signal(signum)
                break
        lines += proc.stdout.readlines()
        return proc.wait(timeout=300), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()


def final_params(out) -> list[np.ndarray]:
    path = out / "checkpoints" / str(MAX_STEPS) / "state"
    restored = ocp.StandardCheckpointer().restore(path.absolute())
    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(store, out)
    return final_params(out)


# Three kill points drawn once from a seeded generator: reproducible, but not hand-picked.
KILL_STEPS = sorted(np.random.default_rng(2026).choice(np.arange(2, MAX_STEPS - 1), size=3, replace=False).tolist())


@pytest.mark.parametrize("kill_step", KILL_STEPS)
def test_sigkill_then_rerun_is_bitwise_equal(store, reference, tmp_path, kill_step):
    code, output = run_and_signal_at(store, tmp_path, kill_step, signal.SIGKILL)
    assert code == -signal.SIGKILL, output[-2000:]
    # Only complete checkpoints are visible; whatever was being written was torn.
    ckpt_dir = tmp_path / "checkpoints"
    survivors = sorted(int(p) for p in os.listdir(ckpt_dir) if p.isdigit()) if ckpt_dir.exists() else []
    assert all(s <= kill_step + 1 for s in survivors)
    rerun = run_to_end(store, tmp_path)
    if survivors:
        assert f"(step {survivors[-1]}" in rerun.stdout
    for got, want in zip(final_params(tmp_path), reference, strict=True):
        assert np.array_equal(got, want)


def test_sigterm_saves_at_the_step_boundary_and_rerun_continues(store, reference, tmp_path):
    code, output = run_and_signal_at(store, tmp_path, 7, signal.SIGTERM)
    from aurora_loop.callbacks.preemption import PREEMPTED_EXIT_CODE

    assert code == PREEMPTED_EXIT_CODE, output[-2000:]
    stopped_at = int(re.search(r"Stopped by a signal at step (\d+)", output).group(1))
    assert 7 <= stopped_at < MAX_STEPS
    assert (tmp_path / "checkpoints" / str(stopped_at)).is_dir()
    rerun = run_to_end(store, tmp_path)
    assert f"(step {stopped_at}" in rerun.stdout
    for got, want in zip(final_params(tmp_path), reference, strict=True):
        assert np.array_equal(got, want)


def test_sigkill_during_an_async_checkpoint_write(store, reference, tmp_path):
    """Killed the moment a save of step 6 begins (its files are being written in the
    background): the rerun starts from a complete checkpoint, never the torn one."""
    code, output = run_and_signal_at(store, tmp_path, 6, signal.SIGKILL, pattern=r"Saving checkpoint .*/(\d+)$")
    assert code == -signal.SIGKILL, output[-2000:]
    complete = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
    assert complete and complete[-1] >= 4
    rerun = run_to_end(store, tmp_path)
    assert f"(step {complete[-1]}" in rerun.stdout
    for got, want in zip(final_params(tmp_path), reference, strict=True):
        assert np.array_equal(got, want)
