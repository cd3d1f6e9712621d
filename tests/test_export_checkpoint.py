"""``aurora-loop export-checkpoint``: a run's checkpoint -> encoder/backbone/decoder (or model) weights."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from aurora_loop.callbacks import ModelCheckpoint
from aurora_loop.cli.export_checkpoint import export
from aurora_loop.cli.tools import main as aurora_loop_main
from aurora_loop.config import TrainingConfig
from aurora_loop.data import ArrayLoader
from aurora_loop.model.batch import stack_samples
from aurora_loop.parallel import make_mesh
from aurora_loop.tasks.conv import ConvTask
from aurora_loop.trainer import Trainer
from tests.synthetic import make_samples


class PartsTask:
    """A tiny regression model whose parameters have Aurora's top-level parts."""

    name = "parts"

    def init(self, rng, batch):
        k1, k2, k3 = jax.random.split(rng, 3)
        return {
            "encoder": {"w": jax.random.normal(k1, (3, 4))},
            "backbone": {"layers_0": {"w": jax.random.normal(k2, (4, 4))}},
            "decoder": {"w": jax.random.normal(k3, (4, 1)), "b": jnp.zeros(1)},
        }

    def loss(self, params, batch, rng):
        h = jnp.tanh(batch["x"] @ params["encoder"]["w"])
        h = jnp.tanh(h @ params["backbone"]["layers_0"]["w"])
        y = h @ params["decoder"]["w"] + params["decoder"]["b"]
        return jnp.mean((y[:, 0] - batch["y"]) ** 2), {}

    def evaluate(self, params, batch):
        raise NotImplementedError


def restore_tree(path: str):
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def parts_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("parts_run")
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(4, 3)).astype(np.float32), "y": rng.normal(size=4).astype(np.float32)} for _ in range(3)]
    trainer = Trainer([ModelCheckpoint(str(run_dir / "checkpoints"), every_n_steps=1, max_to_keep=5, verbose=False)],
                      optimizer=optax.adam(1e-2), max_epochs=1, mesh=make_mesh(2))
    state = trainer.fit(PartsTask(), batches)
    return run_dir, jax.device_get(state.params)


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("conv_run")
    with open(run_dir / "config.json", "w") as fh:
        json.dump(TrainingConfig(model="conv", output_dir=str(run_dir)).to_json_dict(), fh)
    samples = make_samples(12, grid=(8, 16))
    train = ArrayLoader(samples[:8], 2, stack_samples, seed=0)
    val = ArrayLoader(samples[8:], 2, stack_samples, shuffle=False)
    # mode "max" on a falling loss: the best checkpoint is the first validated one (step 2).
    checkpoint = ModelCheckpoint(str(run_dir / "checkpoints"), every_n_steps=100, max_to_keep=1, monitor="val/loss", mode="max", verbose=False)
    trainer = Trainer([checkpoint], optimizer=optax.adam(3e-3), max_epochs=1, val_every_n_steps=2, mesh=make_mesh(1))
    state = trainer.fit(ConvTask(features=8, depth=2), train, val)
    return run_dir, jax.device_get(state.params)


def test_aurora_layout_is_split_into_parts(parts_run, tmp_path, capsys):
    run_dir, params = parts_run
    out = tmp_path / "weights"
    assert aurora_loop_main(["export-checkpoint", str(run_dir), "--out", str(out)]) == 0
    assert "Exported step 3" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["backbone", "config.json", "decoder", "encoder", "export.json"]
    for part in ("encoder", "backbone", "decoder"):
        assert_trees_equal(restore_tree(str(out / part)), params[part])
    record = json.loads((out / "export.json").read_text())
    assert record["step"] == 3 and record["layout"] == "encoder/backbone/decoder" and record["parts"] == ["backbone", "decoder", "encoder"]

    earlier = tmp_path / "step1"
    export(str(run_dir), str(earlier), step="1")
    first = restore_tree(str(earlier / "encoder"))
    assert not np.array_equal(first["w"], params["encoder"]["w"])  # a different step was read


def test_model_without_parts_is_written_whole(conv_run, tmp_path, capsys):
    run_dir, params = conv_run
    out = tmp_path / "conv"
    assert aurora_loop_main(["export-checkpoint", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "written whole" in printed and "training config" in printed
    assert_trees_equal(restore_tree(str(out / "model")), params)
    assert json.loads((out / "config.json").read_text())["model"] == "conv"
    assert json.loads((out / "export.json").read_text())["layout"] == "model"


def test_best_step_is_the_monitored_best(conv_run, tmp_path):
    run_dir, _ = conv_run
    assert ModelCheckpoint(str(run_dir / "checkpoints")).all_steps() == [2, 4]  # best (2) and newest (4)
    record = export(str(run_dir), str(tmp_path / "best"), step="best")
    assert record["step"] == 2
    saved = restore_tree(str(run_dir / "checkpoints" / "2" / "state"))["params"]
    assert_trees_equal(restore_tree(str(tmp_path / "best" / "model")), saved)


def test_bad_requests_fail_with_one_line_and_change_nothing(parts_run, tmp_path, capsys):
    run_dir, _ = parts_run
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cases = [
        (["--out", str(out)], "exists and is not empty"),
        (["--out", str(tmp_path / "a"), "--step", "99"], "no checkpoint for step 99"),
        (["--out", str(tmp_path / "b"), "--step", "best"], "no monitored scores"),
        (["--out", str(tmp_path / "c"), "--step", "soon"], "not a step number"),
    ]
    for extra, message in cases:
        assert aurora_loop_main(["export-checkpoint", str(run_dir), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and err.startswith("aurora-loop export-checkpoint: error:")
    assert aurora_loop_main(["export-checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # no partial exports left behind
    assert aurora_loop_main(["export-checkpoint", str(run_dir), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "encoder").is_dir()
