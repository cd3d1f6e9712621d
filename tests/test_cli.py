"""aurora-train end to end: a real run, resume by rerunning, config files (refusals: test_bad_input.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SMALL = ["--model", "conv", "--batch_size", "2", "--num_gpus", "1", "--levels", "500,850",
         "--log_every_n_steps", "1", "--warmup_steps", "2", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from aurora_loop.datasets.sample_data import write_sample_store

    path = tmp_path_factory.mktemp("data") / "sample.zarr"
    write_sample_store(str(path), grid=(16, 32), times=40, levels=(500, 850))
    return str(path)


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    return subprocess.run([sys.executable, "-m", "aurora_loop.cli.train", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def tensorboard_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_checkpoint_log_and_resume(store, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset_path", store, "--output_dir", str(out), "--save_every_n_steps", "3", "--epochs", "3", *SMALL]
    first = run_cli(*args, "--max_steps", "6")
    assert first.returncode == 0, first.stderr
    assert sorted(os.listdir(out / "checkpoints")) == ["3", "6"]
    assert f"tensorboard --logdir {out / 'tensorboard'}" in first.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["dataset_path"] == store and config["batch_size"] == 2
    scalars = tensorboard_scalars(str(out / "tensorboard"))
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert {"train/grad_norm", "train/learning_rate"} <= set(scalars)

    # The same command with a later max_steps continues from step 6.
    second = run_cli(*args, "--max_steps", "9")
    assert second.returncode == 0, second.stderr
    assert "Resuming from checkpoint" in second.stdout and "(step 6" in second.stdout
    assert "Training finished at step 9" in second.stdout
    scalars = tensorboard_scalars(str(out / "tensorboard"))
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 10))
    # The resumed run kept the schedule it started with (6 steps, recorded in config.json):
    # past its end the final rate, 1e-3 / 10, holds; --max_steps 9 did not stretch it.
    assert json.loads((out / "config.json").read_text())["lr_schedule_steps"] == 6
    rates = dict(scalars["train/learning_rate"])
    assert [rates[s] for s in (7, 8, 9)] == pytest.approx([1e-4] * 3, rel=1e-5)
    assert rates[6] > rates[7]


def test_default_run_writes_the_sample_store(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("--output_dir", str(out), "--max_steps", "2", "--model", "conv", "--num_gpus", "1")
    assert result.returncode == 0, result.stderr
    assert (out / "sample_data.zarr").is_dir()
    assert "No --dataset_path given" in result.stdout
    assert (out / "checkpoints" / "2").is_dir()


def test_flags_override_config_file(tmp_path):
    from aurora_loop.cli.train import resolve_config

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"batch_size": 8, "epochs": 3, "surf_vars": ["2t"]}))
    config, _ = resolve_config(["--config", str(path), "--epochs", "5", "--levels", "500,850", "--atmos_vars", ""])
    assert (config.batch_size, config.epochs, config.surf_vars, config.levels, config.atmos_vars) == (8, 5, ("2t",), (500, 850), ())


def test_monitor_keeps_the_best_checkpoint_when_saves_fall_on_epoch_ends(store, tmp_path):
    """The issue's reproduction: --save_every_n_steps equal to the epoch length with
    validation at epoch ends. Each save now comes after its step's validation, so every
    checkpoint carries its score and export-checkpoint --step best works."""
    from aurora_loop.config import TrainingConfig
    from aurora_loop.datasets import build_loaders

    config = TrainingConfig(dataset_path=store, batch_size=2, levels=(500, 850), num_workers=0)
    per_epoch = len(build_loaders(config)[0])
    out = tmp_path / "run"
    result = run_cli("--dataset_path", store, "--output_dir", str(out), *SMALL, "--epochs", "2",
                     "--save_every_n_steps", str(per_epoch), "--monitor", "val/loss")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for step in (per_epoch, 2 * per_epoch):
        validated = next(i for i, line in enumerate(lines) if line.startswith(f"Validation at step {step}:"))
        saved = next(i for i, line in enumerate(lines) if line.startswith("Saving checkpoint") and line.split()[2].endswith(f"/{step}"))
        assert validated < saved and "(val/loss " in lines[saved]
    from aurora_loop.cli.tools import main as aurora_loop_tool

    assert aurora_loop_tool(["export-checkpoint", str(out), "--step", "best", "--out", str(tmp_path / "best")]) == 0
    assert json.loads((tmp_path / "best" / "export.json").read_text())["step"] in (per_epoch, 2 * per_epoch)
