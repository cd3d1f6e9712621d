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
    return stack_samples(make_samples(2, grid=(16, 32), rollout_steps=1))


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


def test_loss_settings_from_the_config() -> None:
    """Weights from the config replace the paper's for the variables named; gamma scales;
    latitude weighting makes an error near the equator cost more than one near a pole."""
    batch = stack_samples(make_samples(1, grid=(16, 32))).targets
    scale_2t = 21.22036
    n_vars = len(batch.surf_vars) + len(batch.atmos_vars)
    off = batch.replace(surf_vars={**batch.surf_vars, "2t": batch.surf_vars["2t"] + scale_2t})
    task = make_task("tiny", _config(loss_surf_weights={"2t": 1.0}, loss_gamma=2.0))
    np.testing.assert_allclose(np.asarray(task.loss_fn(off, batch)), 2.0 * 0.25 * 1.0 / n_vars, rtol=1e-4)
    assert task.loss_fn.atmos_weight("z") == 2.8 and task.loss_fn.surface_weight("msl") == 1.5

    rows = np.zeros((16, 1), np.float32)
    equator, pole = rows.copy(), rows.copy()
    equator[7:9] = scale_2t  # the two rows nearest the equator
    pole[[0, 15]] = scale_2t  # the two polar rows
    weighted = make_task("tiny", _config(latitude_weighted_loss=True)).loss_fn
    plain = make_task("tiny", _config()).loss_fn
    errors = {}
    for where, shift in (("equator", equator), ("pole", pole)):
        shifted = batch.replace(surf_vars={**batch.surf_vars, "2t": batch.surf_vars["2t"] + shift})
        errors[where] = (float(plain(shifted, batch)[0]), float(weighted(shifted, batch)[0]))
    np.testing.assert_allclose(errors["equator"][0], errors["pole"][0], rtol=1e-5)  # unweighted: the same
    assert errors["equator"][1] > 5 * errors["pole"][1]  # area weights: cos(lat) ~ 1 vs ~ 0.1
    # Mean-1 weights: a uniform error costs the same either way.
    np.testing.assert_allclose(float(weighted(off, batch)[0]), float(plain(off, batch)[0]), rtol=1e-5)


def test_loss_gradients_and_evaluation(sample, tmp_path) -> None:
    task = AuroraTask(_micro(use_lora=True, lora_mode="from_second"), name="micro")
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
    restored = jax.jit(task2.init)(jax.random.key(1), sample)  # the trainer traces init
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, trained)


def _micro(**changes) -> AuroraConfig:
    """A two-stage model: short compilations; block 1 of the first stage is shifted."""
    return AuroraConfig(
        encoder_depths=(2, 1), encoder_num_heads=(2, 4), decoder_depths=(1, 2), decoder_num_heads=(4, 2),
        embed_dim=16, num_heads=2, window_size=(2, 2, 4), latent_levels=2,
        surf_vars=("2t", "msl"), static_vars=("lsm", "z"), atmos_vars=("z", "t"), **changes,
    )


def test_bf16_backbone_is_close() -> None:
    sample = stack_samples(make_samples(2, grid=(16, 32), rollout_steps=1))
    key = jax.random.key(0)
    task = AuroraTask(_micro(use_lora=False))
    params = task.init(key, sample)
    params = jax.tree_util.tree_map(lambda p: p + 0.02 * jax.random.normal(key, p.shape), params)
    loss = float(jax.jit(task.loss)(params, sample, key)[0])
    loss_bf16 = float(jax.jit(AuroraTask(_micro(use_lora=False, autocast=True)).loss)(params, sample, key)[0])
    assert abs(loss_bf16 - loss) < 2e-2 * abs(loss)


def test_setup_makes_the_steps_free_of_host_callbacks(sample) -> None:
    """After ``setup`` on a host batch (the Trainer calls it), the loss, evaluation and
    forecast compile without a host callback, so JAX's persistent cache can keep them; the
    loss is bitwise what the host-callback path gives."""
    task = AuroraTask(_micro(), name="micro")
    key = jax.random.key(0)
    params = jax.jit(task.init)(key, sample)
    loss_fn = jax.jit(lambda p, b: task.loss(p, b, key)[0])
    before = float(loss_fn(params, sample))
    assert "callback" in loss_fn.lower(params, sample).as_text()
    task.setup(sample)
    loss_fn = jax.jit(lambda p, b: task.loss(p, b, key)[0])
    for fn in (loss_fn, jax.jit(task.evaluate), jax.jit(task.predict)):
        assert "callback" not in fn.lower(params, sample).as_text()
    assert float(loss_fn(params, sample)) == before
