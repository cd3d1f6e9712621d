"""Gradient accumulation, parameter groups, the weights' moving average and precision policies."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aurora_loop.callbacks import ModelCheckpoint
from aurora_loop.cli.export_checkpoint import export
from aurora_loop.data import ArrayLoader
from aurora_loop.errors import UsageError
from aurora_loop.inference.runs import restore_state_weights
from aurora_loop.model.batch import stack_samples
from aurora_loop.optim import ParamGroups, learning_rate_schedule, make_optimizer, matches
from aurora_loop.parallel import make_mesh
from aurora_loop.step import StepOptions, TrainState, _train_step_fn, cast_floating
from aurora_loop.tasks.conv import ConvTask
from aurora_loop.trainer import Trainer
from tests.synthetic import make_samples


def _fit(batch_size, accumulate=1, num_devices=1, max_steps=3, callbacks=(), examples=64, **kwargs):
    loader = ArrayLoader(make_samples(examples), batch_size, stack_samples, seed=3)
    trainer = Trainer(list(callbacks), optimizer=make_optimizer(learning_rate_schedule(3e-3, 3, 1)), max_steps=max_steps,
                      mesh=make_mesh(num_devices), seed=1, accumulate_grad_batches=accumulate, **kwargs)
    state = trainer.fit(ConvTask(), loader)
    return trainer, jax.device_get(state)


# --- gradient accumulation ---------------------------------------------------------------------

@pytest.mark.parametrize("num_devices, micro_batch", [(1, 1), (4, 4)])
def test_four_accumulated_micro_batches_equal_one_batch_four_times_larger(num_devices, micro_batch):
    _, big = _fit(4 * micro_batch, num_devices=num_devices)
    trainer, accumulated = _fit(micro_batch, accumulate=4, num_devices=num_devices)
    assert trainer.global_step == 3 and int(accumulated.step) == 3  # optimizer steps, not micro-batches
    assert trainer.train_data.state_dict()["position"] == 12  # the data position counts micro-batches
    # atol: Adam divides by sqrt(v), so a gradient entry near zero turns the summation-order
    # difference of accumulating (~1 ulp) into up to ~5e-7 in that parameter (measured).
    for a, b in zip(jax.tree.leaves(big.params), jax.tree.leaves(accumulated.params)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    initial = jax.device_get(Trainer([], max_steps=0, mesh=make_mesh(1), seed=1).fit(
        ConvTask(), ArrayLoader(make_samples(8), 4, stack_samples)).params)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(big.params)))


def test_throughput_counts_every_micro_batch_as_examples():
    from aurora_loop.callbacks import Throughput

    throughput = Throughput(every_n_steps=1)
    _fit(4, accumulate=2, num_devices=4, max_steps=2, callbacks=[throughput])
    assert throughput.batch_size == 8


def test_compiled_step_memory_does_not_grow_with_the_number_of_micro_batches():
    temp = {}
    for n in (2, 8):
        trainer, _ = _fit(4, accumulate=n, num_devices=1, max_steps=1)
        micro = stack_samples(make_samples(4))
        batch = trainer._place_train_batch([micro] * n)
        analysis = trainer.train_step.lower(trainer.state, batch).compile().memory_analysis()
        temp[n] = analysis.temp_size_in_bytes
    print(f"compiled step temporaries: {temp[2]:,} bytes with 2 micro-batches, {temp[8]:,} bytes with 8")
    assert temp[8] <= temp[2] * 1.05 + 4096


def test_a_run_with_accumulation_resumes_exactly_between_updates(tmp_path):
    def run(directory, max_steps):
        checkpoint = ModelCheckpoint(str(directory), every_n_steps=1)
        trainer, state = _fit(2, accumulate=3, max_steps=max_steps, callbacks=[checkpoint], examples=24, ema_decay=0.9, max_epochs=3)
        checkpoint.close()
        return trainer, state

    _, straight = run(tmp_path / "straight", 5)
    run(tmp_path / "resumed", 2)
    trainer, resumed = run(tmp_path / "resumed", 5)
    assert trainer.resumed_from == 2 and trainer.global_step == 5
    for tree in ("params", "ema_params", "opt_state"):
        for a, b in zip(jax.tree.leaves(getattr(straight, tree)), jax.tree.leaves(getattr(resumed, tree))):
            np.testing.assert_array_equal(b, a)
    # An epoch of 24 // 2 = 12 micro-batches is 4 updates; step 5 is the first update of epoch 1.
    assert trainer.epoch == 1 and trainer.train_data.state_dict()["position"] == 3


def test_accumulation_is_refused_with_replay(tmp_path):
    from aurora_loop.cli.train import main

    assert main(["--rollout_mode", "replay", "--rollout_steps", "2", "--accumulate_grad_batches", "2",
                 "--output_dir", str(tmp_path / "a")]) == 2
    assert not os.path.exists(tmp_path / "a" / "config.json")


# --- parameter groups --------------------------------------------------------------------------

def test_patterns_match_whole_paths_or_subtrees_in_either_spelling():
    path = "backbone.encoder_layers_0.blocks_1.attn.qkv.kernel"
    assert matches(r"backbone\.encoder_layers\.0\..*", path)  # PyTorch-style layer index
    assert matches("backbone.encoder_layers_0", path)  # a subtree
    assert matches("backbone/encoder_layers_0/blocks_1", path)  # slashes
    assert not matches("backbone.encoder_layers_1", path)
    assert not matches("backbone.encoder", path)  # not a name prefix: encoder_layers_0 is another name
    assert not matches("attn", path)  # anchored at the root


def test_frozen_parameters_are_bitwise_unchanged_and_keep_no_optimizer_state():
    groups = ParamGroups(freeze=(r"params\.Conv_[01]",), lr_multipliers={"params.Dense_0": 5.0})
    loader = ArrayLoader(make_samples(12), 4, stack_samples, seed=3)
    optimizer = make_optimizer(learning_rate_schedule(3e-3, 3, 1), weight_decay=0.1, grad_clip_norm=1.0, groups=groups)
    initial = jax.device_get(Trainer([], max_steps=0, mesh=make_mesh(1), seed=1).fit(ConvTask(), loader).params)
    trainer = Trainer([], optimizer=optimizer, max_steps=3, mesh=make_mesh(4), seed=1, trainable=groups.is_trainable)
    state = jax.device_get(trainer.fit(ConvTask(), loader))
    moved = {}
    for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(initial), jax.tree.leaves(state.params)):
        name = jax.tree_util.keystr(path)
        moved[name] = not np.array_equal(before, after)
        if "Conv_0" in name or "Conv_1" in name:
            np.testing.assert_array_equal(after, before)
    assert moved["['params']['Conv_2']['kernel']"] and moved["['params']['Dense_0']['kernel']"]
    # Adam moments exist for Conv_2 and Dense_0 only: mu and nu of four arrays.
    shapes = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert shapes == sorted([(3, 3, 32, 32), (32,), (32, 6), (6,)] * 2)


def test_the_multiplied_group_takes_factor_times_the_first_adam_update():
    params = {"encoder": {"surf_token_embeds": {"weight": jnp.array([0.5, -1.0, 2.0])}}, "backbone": {"w": jnp.array([0.5, -1.0, 2.0])}}
    grads = {"encoder": {"surf_token_embeds": {"weight": jnp.array([0.3, -0.2, 1e-3])}}, "backbone": {"w": jnp.array([0.3, -0.2, 1e-3])}}
    groups = ParamGroups(lr_multipliers={"encoder/surf_token_embeds": 20.0})
    optimizer = make_optimizer(optax.constant_schedule(1e-4), weight_decay=0.01, groups=groups)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    embed, body = np.asarray(updates["encoder"]["surf_token_embeds"]["weight"]), np.asarray(updates["backbone"]["w"])
    assert np.all(body != 0)
    np.testing.assert_allclose(embed, 20.0 * body, rtol=1e-6)


def test_a_pattern_that_matches_nothing_is_refused():
    optimizer = make_optimizer(0.1, groups=ParamGroups(freeze=("encoder.nothing_here",)))
    with pytest.raises(UsageError, match="--freeze pattern 'encoder.nothing_here' matches no parameter"):
        optimizer.init({"encoder": {"w": jnp.ones(2)}, "decoder": {"w": jnp.ones(2)}})
    with pytest.raises(UsageError, match="no parameter is trainable"):
        make_optimizer(0.1, groups=ParamGroups(freeze=(".*",))).init({"w": jnp.ones(2)})


def test_print_param_groups_lists_every_parameter_and_exits(tmp_path, capsys):
    from aurora_loop.cli.train import main

    out = tmp_path / "run"
    code = main(["--model", "tiny", "--batch_size", "4", "--output_dir", str(out), "--print_param_groups", "--freeze", r"encoder\..*",
                 "--lr_multipliers", "decoder=2,backbone.encoder_layers.0=0.5", "--lora_only", "--model_kwargs", '{"use_lora": true}'])
    printed = capsys.readouterr().out
    assert code == 0
    rows = {line.split()[0]: line.split()[1] for line in printed.splitlines() if line.startswith(("encoder.", "backbone.", "decoder."))}
    assert rows["encoder.surf_token_embeds.weight"] == "frozen"
    assert rows["decoder.atmos_heads.kernel"] == "frozen"  # --lora_only: not LoRA, so frozen
    lora = [name for name, group in rows.items() if "lora" in name]
    assert lora and all(rows[n] == ("lr_x0.5" if n.startswith("backbone.encoder_layers_0") else "base") for n in lora)
    assert "group frozen:" in printed and "group lr_x0.5:" in printed
    assert not (out / "config.json").exists() and not (out / "checkpoints").exists()


# --- moving average of the weights -------------------------------------------------------------

def test_ema_follows_its_definition_with_the_decay_warm_up():
    task, samples = ConvTask(), make_samples(12)
    batch = jax.device_put(stack_samples(samples[:4]))
    optimizer = optax.adam(1e-2)
    params = task.init(jax.random.PRNGKey(0), batch)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1),
                       ema_params=jax.tree.map(jnp.copy, params))
    step = jax.jit(_train_step_fn(task, optimizer, options=StepOptions(ema_decay=0.5)))
    expected = jax.device_get(params)
    for n in range(1, 4):
        state, _ = step(state, batch)
        decay = min(0.5, (1 + n) / (10 + n))  # 2/11, 3/12, 4/13: the warm-up dominates early
        expected = jax.tree.map(lambda e, p, d=decay: d * e + (1 - d) * p, expected, jax.device_get(state.params))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(state.ema_params))):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_ema_lives_with_the_fsdp_shards_and_validation_and_export_use_it(tmp_path):
    checkpoint = ModelCheckpoint(str(tmp_path / "checkpoints"), every_n_steps=3)
    loader = ArrayLoader(make_samples(24), 4, stack_samples, seed=3)
    val = ArrayLoader(make_samples(8, seed=5), 4, stack_samples, shuffle=False)
    trainer = Trainer([checkpoint], optimizer=optax.adam(1e-2), max_steps=3, mesh=make_mesh(4), seed=1, fsdp=True, ema_decay=0.9)
    state = trainer.fit(ConvTask(), loader, val)
    checkpoint.close()
    for p, e in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
        assert e.sharding == p.sharding
    assert any(not p.sharding.is_fully_replicated for p in jax.tree.leaves(state.ema_params))  # FSDP-split, not gathered
    with_ema = trainer.validate(3)
    trainer.eval_weights = "raw"
    raw = trainer.validate(3)
    assert with_ema["loss"] != raw["loss"]
    expected = ConvTask().evaluate(jax.device_get(state.ema_params), stack_samples(make_samples(8, seed=5)[:4]))
    expected = expected.merge(ConvTask().evaluate(jax.device_get(state.ema_params), stack_samples(make_samples(8, seed=5)[4:]))).compute()
    np.testing.assert_allclose(with_ema["loss"], expected["loss"], rtol=1e-5)

    ema_host, raw_host = jax.device_get(state.ema_params), jax.device_get(state.params)
    record = export(str(tmp_path), str(tmp_path / "export"))
    assert record["weights"] == "ema"
    restored, key = restore_state_weights(str(tmp_path / "checkpoints" / "3" / "state"))
    assert key == "ema_params"
    for a, b in zip(jax.tree.leaves(ema_host), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(b, a)
    restored_raw, _ = restore_state_weights(str(tmp_path / "checkpoints" / "3" / "state"), "raw")
    for a, b in zip(jax.tree.leaves(raw_host), jax.tree.leaves(restored_raw)):
        np.testing.assert_array_equal(b, a)
    assert export(str(tmp_path), str(tmp_path / "export_raw"), weights="raw")["weights"] == "raw"


def test_asking_for_ema_weights_of_a_run_without_them_is_refused(tmp_path):
    checkpoint = ModelCheckpoint(str(tmp_path / "checkpoints"), every_n_steps=1)
    Trainer([checkpoint], optimizer=optax.adam(1e-2), max_steps=1, mesh=make_mesh(1)).fit(
        ConvTask(), ArrayLoader(make_samples(4), 4, stack_samples))
    checkpoint.close()
    with pytest.raises(UsageError, match="no moving average"):
        restore_state_weights(str(tmp_path / "checkpoints" / "1" / "state"), "ema")
    assert restore_state_weights(str(tmp_path / "checkpoints" / "1" / "state"))[1] == "params"


# --- precision ---------------------------------------------------------------------------------

def test_bf16_params_take_the_gradient_at_bfloat16_weights_and_update_float32_masters():
    task = ConvTask()
    batch = jax.device_put(stack_samples(make_samples(4)))
    optimizer = optax.sgd(1.0)
    params = task.init(jax.random.PRNGKey(0), batch)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1))
    rng = jax.random.fold_in(state.rng, 0)
    results = {}
    for name, dtype in (("fp32", None), ("bf16", jnp.bfloat16)):
        step = jax.jit(_train_step_fn(task, optimizer, options=StepOptions(compute_dtype=dtype)))
        results[name] = jax.device_get(step(state, batch)[0].params)
    grads = jax.grad(lambda p: task.loss(cast_floating(p, jnp.bfloat16), batch, rng)[0])(params)
    manual = jax.device_get(jax.tree.map(lambda p, g: p - g.astype(jnp.float32), params, grads))
    for leaf in jax.tree.leaves(results["bf16"]):
        assert leaf.dtype == np.float32  # the masters stay float32
    for a, b in zip(jax.tree.leaves(manual), jax.tree.leaves(results["bf16"])):
        np.testing.assert_allclose(b, a, rtol=2e-2, atol=2e-3)
    differs = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(results["fp32"]), jax.tree.leaves(results["bf16"]))]
    assert any(differs)  # the policy changed the arithmetic


def test_precision_and_bf16_flags_are_checked(tmp_path):
    from aurora_loop.cli.train import main

    assert main(["--precision", "fp16", "--output_dir", str(tmp_path / "a")]) == 2
    assert main(["--bf16", "--precision", "bf16-params", "--output_dir", str(tmp_path / "b")]) == 2
    assert main(["--ema_decay", "1.5", "--output_dir", str(tmp_path / "c")]) == 2


def test_a_run_recorded_before_these_settings_existed_still_resumes(tmp_path):
    import json

    from aurora_loop.cli.train import check_output_dir
    from aurora_loop.config import TrainingConfig

    config = TrainingConfig(output_dir=str(tmp_path))
    recorded = {k: v for k, v in config.to_json_dict().items()
                if k not in ("accumulate_grad_batches", "freeze", "lr_multipliers", "ema_decay", "precision")}
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    assert check_output_dir(config, overwrite=False) is False  # same run: resume
    with pytest.raises(UsageError, match="accumulate_grad_batches differs"):
        check_output_dir(config.replace(accumulate_grad_batches=2), overwrite=False)
