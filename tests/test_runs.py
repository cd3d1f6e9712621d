"""aurora_loop.inference.runs: a run's checkpoint (latest, best, step N) and its weights alone.

The optimizer state is never read: a checkpoint whose Adam moments are corrupted on disk
still gives its parameters (and export-checkpoint still works), and reading the parameters
reads about their size from disk, not the whole state's.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from aurora_loop.errors import UsageError
from aurora_loop.inference.runs import (
    checkpoint_steps,
    read_params,
    read_weights,
    resolve_checkpoint,
    resolve_run,
    restore_state_weights,
)
from aurora_loop.step import TrainState

SIZE = 384  # (384, 384) float32 weights: 576 KiB each, so the bytes read stand out


def _state(seed: int) -> TrainState:
    """A TrainState with random weights, moving average and Adam moments (all different)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    params = {
        "encoder": {"w": jax.random.normal(keys[0], (SIZE, SIZE))},
        "decoder": {"w": jax.random.normal(keys[1], (SIZE, SIZE)), "b": jnp.arange(3.0)},
    }
    opt_state = optax.adam(1e-3).init(params)
    opt_state = jax.tree.map(lambda x: x + jax.random.normal(keys[2], x.shape) if x.dtype == jnp.float32 else x, opt_state)
    ema = jax.tree.map(lambda x: 0.5 * x + 1.0, params)
    return TrainState(step=jnp.int32(seed), params=params, opt_state=opt_state, rng=keys[3], ema_params=ema)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run dir as aurora-train leaves it: config.json, and checkpoints/2 and /4 written as
    ModelCheckpoint writes them (items ``state`` and ``meta``; the meta holds its monitored
    scores, step 2 the best)."""
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "config.json").write_text(json.dumps({"model": "conv", "levels": [500, 850], "history": 2}))
    manager = ocp.CheckpointManager(
        str(run_dir / "checkpoints"),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
        item_names=("state", "meta"),
    )
    states = {}
    for step, score in ((2, 0.5), (4, 0.7)):
        states[step] = _state(step)
        meta = {
            "step": step,
            "epoch": 0,
            "callbacks": {"ModelCheckpoint": {"monitor": "val/loss", "mode": "min", "scores": {"2": 0.5, str(step): score}}},
        }
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(states[step]), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    manager.close()
    return run_dir, {k: jax.device_get(v) for k, v in states.items()}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _bytes_read() -> int:
    """Bytes this process has read through read()/pread() so far (every thread's)."""
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


# --- resolving ---------------------------------------------------------------------------------


def test_a_run_dir_its_checkpoints_dir_and_a_step_dir_resolve_to_a_step(run):
    run_dir, _ = run
    checkpoints = run_dir / "checkpoints"
    assert checkpoint_steps(str(checkpoints)) == [2, 4]
    latest = resolve_run(str(run_dir))
    assert (latest.path, latest.layout, latest.step, latest.run_dir) == (str(checkpoints / "4"), "state", 4, str(run_dir))
    assert latest.config_values["model"] == "conv" and latest.meta["step"] == 4
    assert latest.training_config().levels == (500, 850)
    assert resolve_run(str(run_dir), "best").step == 2  # the monitored minimum among the kept steps
    assert resolve_run(str(run_dir), 2).step == resolve_run(str(run_dir), "2").step == 2
    assert resolve_run(str(checkpoints), "best").path == str(checkpoints / "2")
    step_dir = resolve_run(str(checkpoints / "2"))
    assert (step_dir.step, step_dir.run_dir, step_dir.config_values["model"]) == (2, str(run_dir), "conv")
    config, layout, where, step = resolve_checkpoint(str(run_dir))  # aurora-loop forecast's form
    assert (config.model, layout, where, step) == ("conv", "state", str(checkpoints / "4"), 4)


def test_bad_paths_and_steps_are_one_line_usage_errors(run, tmp_path):
    run_dir, _ = run
    cases = [
        (lambda: resolve_run(str(tmp_path / "nope")), "RUN_DIR"),
        (lambda: resolve_run(str(tmp_path / "nope"), exports=True), "--checkpoint"),
        (lambda: resolve_run(str(tmp_path)), "no checkpoints in"),
        (lambda: resolve_run(str(tmp_path), exports=True), "is neither a run dir"),
        (lambda: resolve_run(str(run_dir), "99"), "no checkpoint for step 99 in"),
        (lambda: resolve_run(str(run_dir), "soon"), "not a step number"),
        (lambda: resolve_run(str(run_dir / "checkpoints" / "2"), "best"), "holds one checkpoint (step 2)"),
        (lambda: restore_state_weights(str(run_dir / "checkpoints" / "2" / "state"), "newest"), "--weights must be one of"),
    ]
    for call, message in cases:
        with pytest.raises(UsageError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value)


# --- reading the weights alone -------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts bytes read through Linux's /proc/self/io")
def test_only_the_chosen_weights_are_read_from_disk(run):
    """Reading ``params`` or ``ema_params`` reads about their size; reading the whole state
    (what a resume does) reads four times as much (+ the two Adam moments, the average)."""
    run_dir, states = run
    state_dir = str(run_dir / "checkpoints" / "4" / "state")
    nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(states[4].params))
    read_params(str(run_dir / "checkpoints" / "2" / "state"))  # imports and first-use set-up, not counted

    for weights, key in (("raw", "params"), ("ema", "ema_params"), ("auto", "ema_params")):
        before = _bytes_read()
        params, got = restore_state_weights(state_dir, weights)
        read = _bytes_read() - before
        assert got == key
        assert_trees_equal(params, getattr(states[4], key))
        assert 0.75 * nbytes <= read < 1.25 * nbytes + 256 * 1024, (weights, read, nbytes)  # (zstd shaves a little off)

    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    before = _bytes_read()
    whole = checkpointer.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)),
    )
    assert _bytes_read() - before > 3 * nbytes  # the measurement sees the moments when they are read
    np.testing.assert_array_equal(whole["opt_state"][0]["mu"]["encoder"]["w"], states[4].opt_state[0].mu["encoder"]["w"])


def _corrupt_optimizer_state(state_dir: str) -> int:
    """Overwrite every chunk of the saved ``opt_state`` arrays with bytes that are no array
    (their shape records stay); returns how many chunks."""
    import tensorstore as ts

    kvstore = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state_dir}/"}).result()
    chunks = [k for k in kvstore.list().result() if k.startswith(b"opt_state.") and not k.split(b"/")[-1].startswith(b".z")]
    for key in chunks:
        kvstore.write(key, b"not an array chunk").result()
    return len(chunks)


# orbax's failed full restore leaves a callback for its closed event loop (harmless)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_checkpoint_with_corrupted_adam_moments_still_gives_its_weights(tmp_path, capsys):
    """A real run (Trainer + ModelCheckpoint, Adam, a moving average): with every chunk of its
    optimizer state destroyed, a full restore fails, yet both weights read back exactly and
    export-checkpoint exports them."""
    from aurora_loop.callbacks import ModelCheckpoint
    from aurora_loop.cli.tools import main as tool_main
    from aurora_loop.data import ArrayLoader
    from aurora_loop.model.batch import stack_samples
    from aurora_loop.parallel import make_mesh
    from aurora_loop.tasks.conv import ConvTask
    from aurora_loop.trainer import Trainer
    from tests.synthetic import make_samples

    checkpoint = ModelCheckpoint(str(tmp_path / "checkpoints"), every_n_steps=2, verbose=False)
    trainer = Trainer([checkpoint], optimizer=optax.adam(1e-2), max_steps=2, mesh=make_mesh(1), ema_decay=0.9)
    state = jax.device_get(trainer.fit(ConvTask(features=8, depth=2), ArrayLoader(make_samples(8), 4, stack_samples)))
    checkpoint.close()
    state_dir = str(tmp_path / "checkpoints" / "2" / "state")
    assert _corrupt_optimizer_state(state_dir) >= 2 * len(jax.tree.leaves(state.params))  # both moments of every weight

    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    with pytest.raises(Exception, match="opt_state"):  # the corruption is real: reading the moments fails
        checkpointer.restore(
            state_dir,
            args=ocp.args.PyTreeRestore(restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)),
        )

    found = resolve_run(str(tmp_path))
    raw, key = found.read_weights("raw")
    assert key == "params"
    assert_trees_equal(raw, state.params)
    ema, key = read_weights(found.path)
    assert key == "ema_params"
    assert_trees_equal(ema, state.ema_params)

    assert tool_main(["export-checkpoint", str(tmp_path), "--weights", "raw", "--out", str(tmp_path / "export")]) == 0
    assert "Exported step 2" in capsys.readouterr().out
    exported, key = read_weights(str(tmp_path / "export"), "model")
    assert key == "params"
    assert_trees_equal(exported, state.params)


def test_weights_restore_straight_into_shardings(run):
    """``shardings``: one Sharding for every leaf, or a tree of them shaped like the weights."""
    run_dir, states = run
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec("data"))
    state_dir = str(run_dir / "checkpoints" / "2" / "state")

    params = read_params(state_dir, "raw", shardings=replicated)
    for leaf in jax.tree.leaves(params):
        assert isinstance(leaf, jax.Array) and leaf.sharding == replicated
    assert_trees_equal(jax.device_get(params), states[2].params)

    tree = {"encoder": {"w": split}, "decoder": {"w": split, "b": replicated}}
    ema, key = resolve_run(str(run_dir), "best").read_weights(shardings=tree)
    assert key == "ema_params" and ema["encoder"]["w"].sharding == split and ema["decoder"]["b"].sharding == replicated
    assert len(ema["decoder"]["w"].addressable_shards) == len(jax.devices())
    assert_trees_equal(jax.device_get(ema), states[2].ema_params)

    with pytest.raises(ValueError, match="no entry for parameter"):
        read_params(state_dir, shardings={"encoder": {"w": split}})
