"""The Aurora task: registration, loss and gradients, evaluation, pretrained start, bf16/remat."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_loop.model import AuroraConfig, save_params, stack_samples
from aurora_loop.task import available_tasks, make_task
from aurora_loop.tasks.aurora import AuroraTask, weighted_mae
from tests.synthetic import make_samples


def _config(**changes) -> types.SimpleNamespace:
    base = dict(
        model="tiny", surf_vars=("2t", "msl"), static_vars=("lsm", "z"), atmos_vars=("z", "t"), levels=(500, 850),
        bf16=False, remat=False, average_rollout_loss=True, checkpoint_dir=None, pretrained_paths={},
    )
    return types.SimpleNamespace(**{**base, **changes})


@pytest.fixture(scope="module")
def sample():
    return stack_samples(make_samples(2, grid=(16, 32), rollout_steps=2))


def test_registered() -> None:
    assert {"tiny", "small", "aurora"} <= set(available_tasks())
    task = make_task("small", _config())
    assert isinstance(task, AuroraTask) and task.config.embed_dim == 256
    assert task.config.surf_vars == ("2t", "msl")


def test_weighted_mae_weights() -> None:
    """A unit normalised error in one variable costs its paper weight over the variable count."""
    batch = stack_samples(make_samples(1, grid=(16, 32))).targets
    scale_2t = 21.22036  # 2t's normalisation scale (K)
    off = batch.replace(surf_vars={**batch.surf_vars, "2t": batch.surf_vars["2t"] + scale_2t})
    value = weighted_mae(off, batch)
    n_vars = len(batch.surf_vars) + len(batch.atmos_vars)
    np.testing.assert_allclose(np.asarray(value), 0.25 * 3.0 / n_vars, rtol=1e-4)


def test_loss_gradients_and_evaluation(sample, tmp_path) -> None:
    task = make_task("tiny", _config())
    key = jax.random.key(0)
    params = task.init(key, sample)
    (loss, aux), grads = jax.jit(jax.value_and_grad(task.loss, has_aux=True))(params, sample, key)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert np.isfinite(float(aux["rollout_loss_last"]))
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) > 0 for g in leaves) > len(leaves) // 2

    metrics = jax.jit(task.evaluate)(params, sample).compute()
    assert {"loss", "mae/2t", "rmse/z500", "mae/t850"} <= set(metrics)
    assert np.isclose(metrics["loss"], float(loss), rtol=1e-4)

    # Starting from a pretrained directory gives exactly those parameters.
    trained = jax.tree_util.tree_map(lambda g, p: p - 0.1 * g, grads, params)
    save_params(str(tmp_path), task.config, trained)
    task2 = make_task("tiny", _config(checkpoint_dir=str(tmp_path), pretrained_paths={p: str(tmp_path / p) for p in ("encoder", "backbone", "decoder")}))
    restored = task2.init(jax.random.key(1), sample)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, trained)


def test_remat_matches_and_bf16_is_close() -> None:
    sample = stack_samples(make_samples(2, grid=(16, 32), rollout_steps=1))
    # A two-stage model keeps the two gradient compilations short; block 1 is shifted.
    base = AuroraConfig(
        encoder_depths=(2, 1), encoder_num_heads=(2, 4), decoder_depths=(1, 2), decoder_num_heads=(4, 2),
        embed_dim=16, num_heads=2, window_size=(2, 2, 4), latent_levels=2, use_lora=True, lora_mode="all", lora_steps=2,
        surf_vars=("2t", "msl"), static_vars=("lsm", "z"), atmos_vars=("z", "t"),
    )
    key = jax.random.key(0)
    plain = AuroraTask(base)
    params = plain.init(key, sample)

    def value_and_grad(task):
        return jax.jit(jax.value_and_grad(lambda p: task.loss(p, sample, key)[0]))(params)

    loss, grads = value_and_grad(plain)
    loss_r, grads_r = value_and_grad(AuroraTask(base.replace(remat=True, autocast=True)))
    # bf16 backbone: same loss to bf16 accuracy; remat changes nothing but memory.
    assert abs(float(loss_r) - float(loss)) < 2e-2 * abs(float(loss))
    flat, flat_r = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_r)
    norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in flat))
    diff = np.sqrt(sum(float(jnp.sum((g - h) ** 2)) for g, h in zip(flat, flat_r)))
    assert diff < 0.1 * norm
