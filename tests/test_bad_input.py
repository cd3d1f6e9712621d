"""Bad input: exit status 2, one line naming the problem and the fix, nothing changed.

Each case runs ``aurora-train``'s ``main`` in-process against real files (Zarr stores
written by xarray, real orbax checkpoints) and checks that every file that existed before
is byte-for-byte the same afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import xarray as xr

from aurora_loop.cli.train import main

BASE = ["--model", "conv", "--batch_size", "2", "--num_gpus", "1", "--levels", "500,850", "--max_steps", "2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from aurora_loop.datasets.sample_data import write_sample_store

    path = tmp_path_factory.mktemp("data") / "sample.zarr"
    write_sample_store(str(path), grid=(16, 32), times=40, levels=(500, 850))
    return str(path)


def snapshot(root) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def expect_refusal(args, message, capsys, watch=None) -> str:
    before = snapshot(watch) if watch else None
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert message in err, err
    if watch:
        assert snapshot(watch) == before
    return err


def test_dataset_path_missing(tmp_path, capsys):
    expect_refusal(["--dataset_path", str(tmp_path / "nope.zarr"), "--output_dir", str(tmp_path / "o"), *BASE],
                   "does not exist", capsys)


def test_dataset_path_not_zarr(tmp_path, capsys):
    not_zarr = tmp_path / "plain"
    not_zarr.mkdir()
    (not_zarr / "readme.txt").write_text("hello")
    expect_refusal(["--dataset_path", str(not_zarr), "--output_dir", str(tmp_path / "o"), *BASE], "Zarr", capsys, watch=tmp_path)


def test_variable_missing(store, tmp_path, capsys):
    expect_refusal(["--dataset_path", store, "--output_dir", str(tmp_path / "o"), *BASE, "--surf_vars", "2t,sst"],
                   "sst", capsys, watch=store)


def test_variable_with_wrong_shape(tmp_path, capsys):
    times = np.arange(np.datetime64("2020-01-01T00"), np.datetime64("2020-01-08T00"), np.timedelta64(6, "h")).astype("datetime64[ns]")
    lat, lon = np.linspace(-90, 90, 8), np.arange(16) * 22.5
    ds = xr.Dataset(
        {
            "2m_temperature": (("time", "latitude", "longitude"), np.full((len(times), 8, 16), 280.0, np.float32)),
            # A surface variable stored with a level dim: wrong shape for a surface field.
            "mean_sea_level_pressure": (("time", "level", "latitude", "longitude"), np.full((len(times), 2, 8, 16), 1e5, np.float32)),
        },
        coords={"time": times, "latitude": lat, "longitude": lon, "level": [500, 850]},
    )
    path = tmp_path / "bad.zarr"
    ds.to_zarr(path)
    expect_refusal(["--dataset_path", str(path), "--output_dir", str(tmp_path / "o"), "--model", "conv", "--num_gpus", "1",
                    "--surf_vars", "2t,msl", "--static_vars", "", "--atmos_vars", ""], "mean_sea_level_pressure", capsys, watch=path)


def test_too_few_time_steps(tmp_path, capsys):
    from aurora_loop.datasets.sample_data import write_sample_store

    path = tmp_path / "short.zarr"
    write_sample_store(str(path), grid=(8, 16), times=3, levels=(500, 850))
    expect_refusal(["--dataset_path", str(path), "--output_dir", str(tmp_path / "o"), *BASE], "time", capsys, watch=path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch_size", "3", "--num_gpus", "2"], "batch size 3 is not divisible by the 2 devices"),
        (["--num_gpus", "64"], "more devices than the 4 visible"),
        (["--learning_rate", "0"], "learning_rate must be positive"),
        (["--learning_rate=-1e-4"], "learning_rate must be positive"),
        (["--rollout_steps", "0"], "rollout_steps must be at least 1"),
        (["--epochs", "two"], "epochs must be an integer"),
        (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
        (["--model", "nope"], "--model nope is not a known model"),
        (["--rollout_mode", "replay", "--rollout_steps", "1"], "replay_refresh_every (2) must be between 1 and rollout_steps (1)"),
        (["--latitude_weighted_loss"], "--latitude_weighted_loss sets the Aurora loss"),
        (["--model", "tiny", "--loss_surf_weights", "2t=heavy"], "loss_surf_weights must map variable names to numbers"),
        (["--model", "tiny", "--model_kwargs", '{"use_lorra": true}'], "--model_kwargs: unknown Aurora keyword use_lorra"),
        (["--model", "tiny", "--model_kwargs", '{"surf_vars": ["2t"]}'], "sets 'surf_vars', which has its own flag: use --surf_vars"),
        (["--model", "tiny", "--model_kwargs", '{"lora_mode": "every"}'], "--model_kwargs: lora_mode must be one of"),
        (["--model", "tiny", "--model_kwargs", "use_lora=true"], "model_kwargs is not valid JSON"),
        (["--model_kwargs", '{"use_lora": true}'], "the conv model takes none"),
        (["--stats", "stats.json"], "--stats gives Aurora's normalisation statistics; the conv model normalises its inputs itself"),
        (["--model", "tiny", "--lora_only"], "no parameter is trainable"),
        (["--lr_schedule_steps", "0"], "lr_schedule_steps must be at least 1"),
        (["--model", "tiny", "--remat_policy", "dots"], "--remat_policy dots chooses what --remat keeps; add --remat"),
        (["--model", "tiny", "--remat", "--remat_policy", "everything"], "remat_policy must be inputs or dots"),
        (["--model", "tiny", "--model_kwargs", '{"remat_policy": "dots"}'], "has its own flag: use --remat_policy"),
    ],
)
def test_bad_values(store, tmp_path, capsys, args, message):
    expect_refusal(["--dataset_path", store, "--output_dir", str(tmp_path / "o"), *BASE, *args], message, capsys)
    assert not (tmp_path / "o" / "config.json").exists()


def test_output_dir_not_writable(store, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    expect_refusal(["--dataset_path", store, "--output_dir", str(blocker / "run"), *BASE], "--output_dir", capsys, watch=tmp_path)


def test_config_file_unknown_key(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("batch_size: 2\nlearnin_rate: 1e-4\n")
    expect_refusal(["--config", str(path), "--output_dir", str(tmp_path / "o")], "unknown setting 'learnin_rate'", capsys, watch=tmp_path)


def test_config_file_wrong_type(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"epochs": "many"}))
    expect_refusal(["--config", str(path), "--output_dir", str(tmp_path / "o")], "epochs must be an integer", capsys, watch=tmp_path)


def test_output_dir_of_a_different_run(store, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"batch_size": 4, "learning_rate": 1e-4}))
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "keep.txt").write_text("x")
    expect_refusal(["--dataset_path", store, "--output_dir", str(out), *BASE], "holds a different run", capsys, watch=out)


def test_corrupt_checkpoint(store, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--dataset_path", store, "--output_dir", str(out), *BASE, "--save_every_n_steps", "1"]
    assert main(args) == 0
    capsys.readouterr()
    # Damage every file of the newest checkpoint's state.
    state_dir = out / "checkpoints" / "2" / "state"
    for dirpath, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(dirpath, name), "wb") as fh:
                fh.write(b"garbage")
    expect_refusal(args + ["--max_steps", "3"], "checkpoint", capsys, watch=out)


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, store):
    """encoder/backbone/decoder checkpoints of the tiny Aurora on the sample store's variables."""
    import jax

    from aurora_loop.config import TrainingConfig
    from aurora_loop.model.checkpoint import param_shapes, save_params
    from aurora_loop.tasks.aurora import model_config

    config = model_config("tiny", TrainingConfig())
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), param_shapes(config))
    path = tmp_path_factory.mktemp("pretrained") / "tiny"
    save_params(str(path), config, params)
    return path


def test_checkpoint_dir_missing_a_part(store, pretrained_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "pretrained"
    shutil.copytree(pretrained_dir, broken)
    shutil.rmtree(broken / "backbone")
    args = ["--dataset_path", store, "--output_dir", str(tmp_path / "o"), "--model", "tiny", "--num_gpus", "1",
            "--levels", "500,850", "--checkpoint_dir", str(broken)]
    expect_refusal(args, "no backbone checkpoint", capsys, watch=broken)


def test_checkpoint_dir_with_mismatched_shapes(store, pretrained_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "pretrained"
    shutil.copytree(pretrained_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["embed_dim"] *= 2  # the config no longer fits the saved weights
    (broken / "config.json").write_text(json.dumps(config))
    args = ["--dataset_path", store, "--output_dir", str(tmp_path / "o"), "--model", "tiny", "--num_gpus", "1",
            "--levels", "500,850", "--checkpoint_dir", str(broken)]
    err = expect_refusal(args, "does not fit the model: parameter encoder/", capsys, watch=broken)
    assert "the config expects" in err


def test_resuming_with_another_schedule_is_a_different_run(store, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--dataset_path", store, "--output_dir", str(out), *BASE]) == 0
    capsys.readouterr()
    assert json.loads((out / "config.json").read_text())["lr_schedule_steps"] == 2
    expect_refusal(["--dataset_path", store, "--output_dir", str(out), *BASE, "--lr_schedule_steps", "10"],
                   "holds a different run (lr_schedule_steps differs)", capsys, watch=out)
