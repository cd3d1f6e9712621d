"""One example over several devices (``--space_parallel``): every token grid split in bands
of rows (:mod:`aurora_loop.model.bands`) gives the numbers of the whole grid on one device.

The tests run on the 4 simulated CPU devices: the row exchanges against numpy, one Swin
block (shifted, padded, with LoRA), and the whole model's output and gradients, with and
without remat, on meshes of 4 bands and of 2 examples x 2 bands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aurora_loop.model import AuroraConfig, apply, init_params, stack_samples
from aurora_loop.model.bands import (
    BandContext,
    Bands,
    SpacePlan,
    merge_source,
    permute_rows,
    roll_source,
    space_problem,
    split_source,
)
from aurora_loop.model.swin import SwinBlock
from aurora_loop.model.windows import adjust_windows
from tests.synthetic import make_samples

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _mesh(data: int, space: int) -> Mesh:
    return Mesh(np.asarray(jax.devices()[: data * space]).reshape(data, space), ("data", "space"))


def _apply_numpy(x: np.ndarray, src: np.ndarray) -> np.ndarray:
    flat = src.reshape(-1)
    out = np.zeros(x.shape[:2] + (flat.size,) + x.shape[3:], x.dtype)
    for g, s in enumerate(flat):
        if s >= 0:
            out[:, :, g] = x[:, :, s]
    return out


def test_bands_are_whole_windows_with_the_references_padding() -> None:
    bands = Bands(rows=45, window_rows=6, devices=4)  # the 1.3 B model's third stage at 0.25 degrees
    assert bands.top == 1 and bands.window_count == 8 and bands.per_device == 12 and bands.total == 48
    assert bands.real_rows()[0] == -1 and bands.real_rows()[1] == 0 and bands.real_rows()[45] == 44
    assert list(bands.real_rows()[46:]) == [-1, -1]
    wider = Bands(rows=90, window_rows=6, devices=4)  # 15 window rows: one dummy window row at the bottom
    assert wider.per_device == 24 and wider.real_mask().sum() == 90 and not wider.real_mask()[90:].any()


@pytest.mark.parametrize("kind", ["roll+", "roll-", "merge", "split"])
def test_row_exchanges_equal_numpy_and_their_gradients_are_the_inverse(kind) -> None:
    fine, coarse = Bands(45, 6, 4), Bands(23, 6, 4)
    source, rows = {"roll+": (roll_source(fine, 3), fine), "roll-": (roll_source(fine, -3), fine),
                    "merge": (merge_source(fine, coarse), fine), "split": (split_source(coarse, fine), None)}[kind]
    rows_in = 2 * coarse.per_device if kind == "split" else fine.per_device
    total_in = 4 * rows_in
    x = np.random.default_rng(0).standard_normal((1, 2, total_in, 3, 2)).astype(np.float32)
    mesh = _mesh(1, 4)
    spec = P(None, None, "space", None, None)
    fn = jax.jit(jax.shard_map(lambda xl: permute_rows(xl, source, rows_in, 2, "space"), mesh=mesh, in_specs=spec, out_specs=spec))
    placed = jax.device_put(x, NamedSharding(mesh, spec))
    want = _apply_numpy(x, source)
    np.testing.assert_array_equal(np.asarray(fn(placed)), want)
    w = np.random.default_rng(1).standard_normal(want.shape).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(x) * w)))(placed)
    expected = np.zeros_like(x)
    for g, s in enumerate(source.reshape(-1)):
        if s >= 0:
            expected[:, :, s] += w[:, :, g]
    np.testing.assert_array_equal(np.asarray(grad), expected)
    text = fn.lower(placed).compile().as_text()
    assert "all-gather" not in text and "all-to-all" not in text  # neighbour exchanges only


@pytest.mark.parametrize("res, shift", [((4, 48, 24), (0, 0, 0)), ((4, 45, 36), (1, 3, 6)), ((2, 42, 24), (1, 3, 6))])
def test_a_banded_swin_block_is_the_block(res, shift) -> None:
    """Unshifted and shifted, with the reference's padding (45 rows) and a dummy window row
    (42 rows: 7 window rows in 4 bands), with LoRA: the same output and gradients."""
    window = (2, 6, 12)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, int(np.prod(res)), 16)).astype(np.float32)
    c = rng.standard_normal((1, 16)).astype(np.float32)
    block = SwinBlock(num_heads=2, window_size=window, shift_size=shift, use_lora=True, lora_steps=3)
    params = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype), block.init(jax.random.key(0), x, c, res, 1))
    bands = Bands(res[1], adjust_windows(window, shift, res)[0][1], 4)
    banded = np.zeros((1, res[0], bands.total, res[2], 16), np.float32)
    banded[:, :, bands.top:bands.top + res[1]] = x.reshape(1, *res, 16)
    spec = P(None, None, "space", None, None)
    on_bands = jax.shard_map(lambda p, xl: block.apply(p, xl, c, res, 1, band=BandContext(bands, "space")),
                             mesh=_mesh(1, 4), in_specs=(P(), spec), out_specs=spec)

    def loss_whole(p, x):
        return jnp.sum(block.apply(p, x, c, res, 1) ** 2)

    def loss_bands(p, xb):
        return jnp.sum(on_bands(p, xb)[:, :, bands.top:bands.top + res[1]] ** 2)

    whole = block.apply(params, x, c, res, 1)
    split = jax.jit(on_bands, compiler_options=FAST_COMPILE)(params, banded)[:, :, bands.top:bands.top + res[1]]
    np.testing.assert_allclose(np.asarray(split).reshape(whole.shape), np.asarray(whole), rtol=1e-5, atol=1e-5)
    g_whole = jax.jit(jax.grad(loss_whole), compiler_options=FAST_COMPILE)(params, x)
    g_bands = jax.jit(jax.grad(loss_bands), compiler_options=FAST_COMPILE)(params, banded)
    for a, b in zip(jax.tree.leaves(g_bands), jax.tree.leaves(g_whole)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("preset, data, space, grid, remat", [
    ("tiny", 1, 4, (256, 512), True), ("tiny", 2, 2, (72, 144), False),  # 2 x 2 with remat: trained below
])
def test_the_banded_model_is_the_model(preset, data, space, grid, remat) -> None:
    """The tiny Aurora with LoRA and a traced roll-out step: output and gradients with every
    example's grid in 4 bands (or 2 examples x 2 bands; 72 x 144 pads every stage) equal the
    one-device model's. (``small`` is checked by training it below.)"""
    cfg = AuroraConfig.preset(preset, remat=remat, use_lora=True, lora_steps=3)
    batch = stack_samples(make_samples(data, grid=grid, rollout_steps=1)).inputs
    params = init_params(cfg, jax.random.key(0), batch)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype), params)
    from aurora_loop.model.posenc import KnownGrid

    known = KnownGrid(np.asarray(batch.metadata.lat), np.asarray(batch.metadata.lon))
    plan = SpacePlan(_mesh(data, space))

    def loss(p, b, plan):
        pred = apply(cfg, p, b, rollout_step=jnp.int32(1), space=plan, known_grid=known).normalise()
        return sum(jnp.mean(v**2) for v in (*pred.surf_vars.values(), *pred.atmos_vars.values()))

    (value, grads) = jax.jit(jax.value_and_grad(lambda p, b: loss(p, b, None)), compiler_options=FAST_COMPILE)(params, batch)
    (value_s, grads_s) = jax.jit(jax.value_and_grad(lambda p, b: loss(p, b, plan)), compiler_options=FAST_COMPILE)(params, batch)
    np.testing.assert_allclose(float(value_s), float(value), rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_s), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * float(np.abs(b).max()) + 1e-12,
                                   err_msg=jax.tree_util.keystr(path))


def test_sizes_that_do_not_split_the_grid_are_named() -> None:
    cfg = AuroraConfig.preset("aurora")
    assert space_problem(cfg, (720, 1440), 4) is None
    problem = space_problem(cfg, (720, 1440), 5)
    assert "--space_parallel 5" in problem and "sizes that split this grid: 2, 3, 4, 8" in problem, problem
    tiny = AuroraConfig.preset("tiny")
    assert "none above 1" in space_problem(tiny, (32, 64), 2)


# The smallest grid each preset splits in 4 bands (small: windows of 12 over 8 columns).
TRAIN_GRIDS = {"tiny": (208, 64), "small": (304, 32)}


def _train(preset: str, num_devices: int, space: int, fsdp: bool = False, **changes) -> tuple[list[float], object]:
    """Three AdamW steps (remat unless ``changes`` say otherwise; batch 2, learning rate 1e-3)
    of ``preset`` on its grid."""
    from aurora_loop.data import ArrayLoader
    from aurora_loop.optim import learning_rate_schedule, make_optimizer
    from aurora_loop.parallel import make_mesh
    from aurora_loop.tasks.aurora import AuroraTask
    from aurora_loop.trainer import Trainer
    from tests.test_step import LossLog

    cfg = AuroraConfig.preset(preset, **{"remat": True, **changes})
    loader = ArrayLoader(make_samples(6, grid=TRAIN_GRIDS[preset], rollout_steps=1), 2, stack_samples, seed=3)
    log = LossLog()
    trainer = Trainer([log], optimizer=make_optimizer(learning_rate_schedule(1e-3, 3, 1)), max_steps=3,
                      mesh=make_mesh(num_devices, space), seed=1, fsdp=fsdp)
    state = trainer.fit(AuroraTask(cfg, name=preset), loader)
    return [float(x) for x in log.losses], state


@pytest.mark.parametrize("preset, changes", [
    ("tiny", {"use_lora": True, "lora_steps": 3}),
    # every parameter of small trained (its deeper stages, wider windows), without remat: the
    # banded remat path is tiny's (35 s of the suite saved)
    ("small", {"remat": False}),
])
def test_training_on_bands_is_training_on_one_device(preset, changes) -> None:
    """1 device = 4 devices in 4 bands (FSDP over all of them) = 2 examples x 2 bands: the
    losses of three steps to 1e-5 relative, the parameters after them to 1e-5 absolute.
    (Measured: losses equal to 2e-7, parameters to 1.2e-7 for tiny and 9.1e-7 for small.)"""
    losses, state = _train(preset, 1, 1, **changes)
    for devices, space, fsdp in ((4, 4, True), (4, 2, False)):
        losses_s, state_s = _train(preset, devices, space, fsdp, **changes)
        where = f"{preset}, {devices} devices, space {space}"
        np.testing.assert_allclose(losses_s, losses, rtol=1e-5, err_msg=where)
        worst = 0.0
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state_s.params), jax.tree.leaves(state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5,
                                       err_msg=f"{where}: {jax.tree_util.keystr(path)}")
            worst = max(worst, float(np.abs(np.asarray(a) - np.asarray(b)).max()))
        print(f"{where}{', fsdp' if fsdp else ''}: losses {losses_s} against {losses}; "
              f"largest parameter difference after 3 steps {worst:.2e}")
        if fsdp:  # over both axes: every large leaf in quarters
            kernel = state_s.params["backbone"]["encoder_layers_0"]["blocks_0"]["mlp"]["fc1"]["kernel"]
            assert kernel.addressable_shards[0].data.size == kernel.size // 4, kernel.sharding


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    from aurora_loop.datasets.sample_data import write_sample_store

    path = tmp_path_factory.mktemp("space") / "small.zarr"
    write_sample_store(str(path), grid=(16, 32), times=24, levels=(500, 850))
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["--num_gpus", "4", "--space_parallel", "3"], "--space_parallel 3 does not divide the 4 devices of the mesh; choose one of 1, 2, 4"),
    (["--num_gpus", "4", "--space_parallel", "4"], "sizes that split this grid: none above 1"),
    (["--model", "conv", "--num_gpus", "4", "--space_parallel", "2"], "the conv baseline cannot be split"),
    (["--num_gpus", "4", "--space_parallel", "2", "--batch_size", "3"], "not divisible by the 2 data-parallel groups"),
])
def test_bad_space_settings_are_one_line(tmp_path, capsys, small_store, args, message) -> None:
    from aurora_loop.cli.train import main

    out = tmp_path / "run"
    code = main(["--dataset_path", small_store, "--output_dir", str(out), "--levels", "500,850", "--max_steps", "1", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir())


def test_the_estimate_offers_splitting_examples_as_a_change() -> None:
    """``--estimate_memory`` against a card that is too small tries, among the cheapest
    changes, one example over 2 or 4 devices with as much accumulation (the update is the
    same)."""
    from aurora_loop.cli.memory import candidate_changes
    from aurora_loop.config import TrainingConfig

    names = [name for name, _ in candidate_changes(TrainingConfig(model="tiny", num_gpus=4, batch_size=4))]
    assert "--space_parallel 2 --batch_size 2 --accumulate_grad_batches 2" in names
    assert "--space_parallel 4 --batch_size 1 --accumulate_grad_batches 4" in names
    assert names.index("--fsdp") < names.index("--space_parallel 4 --batch_size 1 --accumulate_grad_batches 4") < names.index("--remat")
    assert not any("space" in n for n, _ in candidate_changes(TrainingConfig(model="conv", num_gpus=4, batch_size=4)))


def test_the_bands_split_parameters_as_the_train_state_does() -> None:
    """Under ``--fsdp`` each banded part gathers its weights from the train state's split
    (``SpacePlan.param_specs`` restates ``step.state_shardings``'s rule): the same spec for
    every parameter of an Aurora, so XLA moves nothing at the parts' boundaries."""
    from aurora_loop.step import TrainState, state_shardings

    cfg = AuroraConfig.preset("tiny", use_lora=True)
    batch = stack_samples(make_samples(1, grid=(32, 64))).inputs
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), batch))
    sds = jax.ShapeDtypeStruct
    mesh = _mesh(2, 2)
    state = TrainState(step=sds((), np.int32), params=shapes, opt_state=None, rng=sds((2,), np.uint32))
    want = jax.tree.map(lambda s: s.spec, state_shardings(state, mesh, fsdp=True).params)
    got = SpacePlan(mesh, fsdp=True).param_specs(shapes)
    assert jax.tree.leaves(got) == jax.tree.leaves(want)
    assert any(("data", "space") in tuple(s) for s in jax.tree.leaves(got))


def test_a_forecast_roll_out_on_bands_is_the_one_device_roll_out() -> None:
    """``rollout(space=...)``, what ``aurora-loop forecast --space_parallel`` runs: two steps
    of the tiny Aurora on 4 bands give the one-device predictions."""
    from aurora_loop.model import rollout
    from aurora_loop.model.posenc import KnownGrid

    cfg = AuroraConfig.preset("tiny")
    batch = stack_samples(make_samples(1, grid=(208, 64), rollout_steps=1)).inputs
    params = init_params(cfg, jax.random.key(0), batch)
    params = jax.tree.map(lambda a: a + 0.05 * np.random.default_rng(2).standard_normal(a.shape).astype(a.dtype), params)
    known = KnownGrid(np.asarray(batch.metadata.lat), np.asarray(batch.metadata.lon))
    whole = list(rollout(cfg, params, batch, 2, known_grid=known))
    banded = list(rollout(cfg, params, batch, 2, known_grid=known, space=SpacePlan(_mesh(1, 4))))
    for a, b in zip(banded, whole):
        for name in a.surf_vars:
            np.testing.assert_allclose(np.asarray(a.surf_vars[name]), np.asarray(b.surf_vars[name]), rtol=1e-4,
                                       atol=1e-5 * float(np.abs(b.surf_vars[name]).max()))
        for name in a.atmos_vars:
            np.testing.assert_allclose(np.asarray(a.atmos_vars[name]), np.asarray(b.atmos_vars[name]), rtol=1e-4,
                                       atol=1e-5 * float(np.abs(b.atmos_vars[name]).max()))


MICRO = {"encoder_depths": [1, 1], "encoder_num_heads": [2, 4], "decoder_depths": [1, 1],
         "decoder_num_heads": [4, 2], "embed_dim": 16, "num_heads": 2}  # tests.scenario_cell's


@pytest.fixture(scope="module")
def tall_store(tmp_path_factory):
    from aurora_loop.datasets.sample_data import write_sample_store

    path = tmp_path_factory.mktemp("space") / "tall.zarr"
    write_sample_store(str(path), grid=(128, 32), times=24, levels=(500, 850))
    return str(path)


def _aurora_train(capsys, store: str, out, steps: int, *flags: str) -> tuple[dict, str]:
    """``aurora-train`` in this process: the micro Aurora on ``store``, batch 2, two roll-out
    steps (full), a checkpoint every step, validation at the end; returns summary.json and
    what it printed."""
    import json

    from aurora_loop.cli.train import main

    code = main(["--dataset_path", store, "--output_dir", str(out), "--model", "tiny",
                 "--model_kwargs", json.dumps(MICRO), "--levels", "500,850", "--batch_size", "2",
                 "--max_steps", str(steps), "--lr_schedule_steps", "4", "--warmup_steps", "1",
                 "--learning_rate", "1e-3", "--save_every_n_steps", "1", "--val_every_n_steps", "100",
                 "--num_workers", "1", "--max_to_keep", "10", "--rollout_steps", "2", *flags])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    return json.load(open(out / "summary.json")), printed.out


def test_a_checkpoint_resumes_on_another_mesh(tmp_path, capsys, tall_store) -> None:
    """aurora-train with a full 2-step roll-out on 4 bands with FSDP stops at step 2; its
    checkpoint resumes on 2 examples x 2 bands for step 3, then on one device for step 4: each
    resume starts from the step
    before, and the parameters of step 4 are those of four steps on one device, to 1e-4 of
    each leaf's scale plus 1e-2 of the learning rate. (Adam turns a gradient near its eps into
    a step that rounding moves: the bands' step 2 moves one bias of the surface heads by 3.3e-6
    of the 1e-3 rate, and the resumes on other meshes add nothing to it.)"""
    from aurora_loop.inference.runs import read_params

    moved = tmp_path / "moved"
    assert _aurora_train(capsys, tall_store, moved, 2, "--num_gpus", "4", "--space_parallel", "4", "--fsdp")[0]["step"] == 2
    for steps, mesh in ((3, ["--num_gpus", "4", "--space_parallel", "2"]), (4, ["--num_gpus", "1"])):
        summary, out = _aurora_train(capsys, tall_store, moved, steps, *mesh)
        assert summary["step"] == steps, summary
        assert f"checkpoints/{steps - 1} (step {steps - 1}, epoch 0)" in out and "Resuming from" in out, out
    _aurora_train(capsys, tall_store, tmp_path / "one", 4, "--num_gpus", "1")
    got = read_params(str(moved / "checkpoints" / "4" / "state"))
    want = read_params(str(tmp_path / "one" / "checkpoints" / "4" / "state"))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4 * float(np.abs(b).max()) + 1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    # Each resume ran only its own step: the moved run's step 3 differs from its step 2.
    two = read_params(str(moved / "checkpoints" / "2" / "state"))
    three = read_params(str(moved / "checkpoints" / "3" / "state"))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(three)))
