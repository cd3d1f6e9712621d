"""aurora-train end to end: a real run, resume by rerunning, and refusals of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from aurora_loop.cli import main

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
    return subprocess.run([sys.executable, "-m", "aurora_loop.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


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


def test_default_run_writes_the_sample_store(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("--output_dir", str(out), "--max_steps", "2", "--model", "conv", "--num_gpus", "1")
    assert result.returncode == 0, result.stderr
    assert (out / "sample_data.zarr").is_dir()
    assert "No --dataset_path given" in result.stdout
    assert (out / "checkpoints" / "2").is_dir()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--learning_rate", "0"], "learning_rate must be positive"),
        (["--learning_rate", "fast"], "learning_rate must be a number"),
        (["--rollout_steps", "0"], "rollout_steps must be at least 1"),
        (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
        (["--batch_size", "3", "--num_gpus", "2"], "batch size 3 is not divisible by the 2 devices"),
        (["--num_gpus", "64"], "more devices than the 4 visible"),
        (["--model", "nope", "--num_gpus", "1"], "--model nope is not a known model"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, message, tmp_path, capsys, store):
    out = tmp_path / "run"
    code = main(["--dataset_path", store, "--output_dir", str(out), *args])
    assert code == 2
    assert message in one_line_error(capsys)
    assert not (out / "config.json").exists()


def test_config_file_with_unknown_key_or_wrong_type(tmp_path, capsys):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("batch_size: 2\nlearnin_rate: 1e-4\n")
    assert main(["--config", str(bad_key), "--output_dir", str(tmp_path / "o")]) == 2
    assert "unknown setting 'learnin_rate'" in one_line_error(capsys)
    bad_type = tmp_path / "b.json"
    bad_type.write_text(json.dumps({"epochs": "many"}))
    assert main(["--config", str(bad_type), "--output_dir", str(tmp_path / "o")]) == 2
    assert "epochs must be an integer" in one_line_error(capsys)


def test_flags_override_config_file(tmp_path):
    from aurora_loop.cli import resolve_config

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"batch_size": 8, "epochs": 3, "surf_vars": ["2t"]}))
    config, _ = resolve_config(["--config", str(path), "--epochs", "5", "--levels", "500,850", "--atmos_vars", ""])
    assert (config.batch_size, config.epochs, config.surf_vars, config.levels, config.atmos_vars) == (8, 5, ("2t",), (500, 850), ())


def test_output_dir_of_a_different_run_is_refused_and_untouched(tmp_path, capsys, store):
    out = tmp_path / "run"
    out.mkdir()
    previous = {"batch_size": 4, "learning_rate": 1e-4}
    (out / "config.json").write_text(json.dumps(previous))
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "keep.txt").write_text("x")
    code = main(["--dataset_path", store, "--output_dir", str(out), "--batch_size", "2"])
    assert code == 2
    assert "holds a different run" in one_line_error(capsys)
    assert json.loads((out / "config.json").read_text()) == previous
    assert (out / "checkpoints" / "keep.txt").read_text() == "x"
