"""``--lora_only``: the optimizer moves only LoRA parameters (optax.multi_transform)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aurora_loop.config import TrainingConfig
from aurora_loop.errors import UsageError
from aurora_loop.model import AuroraConfig, stack_samples
from aurora_loop.optim import is_lora_param, make_optimizer
from aurora_loop.tasks.aurora import AuroraTask
from tests.synthetic import make_samples


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    return {
        "encoder": {"kernel": jax.random.normal(k[0], (4, 3)), "bias": jnp.ones(3)},
        "block": {
            "qkv": {"kernel": jax.random.normal(k[1], (3, 3))},
            "lora_qkv": {"lora_A": jax.random.normal(k[2], (2, 3, 2)), "lora_B": jax.random.normal(k[3], (2, 2, 3))},
        },
    }


def test_only_lora_leaves_change():
    params = _params()
    optimizer = make_optimizer(optax.constant_schedule(1e-2), weight_decay=0.1, grad_clip_norm=1.0, trainable=is_lora_param)
    opt_state = optimizer.init(params)

    def loss(p):
        return sum(jnp.sum(jnp.sin(x) ** 2) for x in jax.tree.leaves(p))

    @jax.jit
    def update(p, s):
        grads = jax.grad(loss)(p)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    new = params
    for _ in range(3):
        new, opt_state = update(new, opt_state)
    changed = jax.tree_util.tree_map_with_path(lambda path, a, b: (jax.tree_util.keystr(path), bool(np.any(np.asarray(a) != np.asarray(b)))), params, new)
    for name, moved in jax.tree.leaves(changed, is_leaf=lambda x: isinstance(x, tuple)):
        assert moved == ("lora" in name), name
    # Frozen leaves keep no Adam moments: the state holds exactly the two LoRA arrays twice (mu, nu).
    arrays = [x for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0]
    assert sorted(x.shape for x in arrays) == sorted([(2, 3, 2), (2, 2, 3)] * 2)


def test_nothing_trainable_is_refused():
    optimizer = make_optimizer(optax.constant_schedule(1e-2), trainable=is_lora_param)
    with pytest.raises(UsageError, match="lora_only"):
        optimizer.init({"kernel": jnp.ones(3)})


def test_config_field():
    assert TrainingConfig().lora_only is False
    assert TrainingConfig(lora_only=True).lora_only is True


def test_aurora_lora_parameters_are_the_trainable_ones():
    """On a small Aurora with LoRA (abstract shapes only: no compile of the gradient), the
    trainable set is exactly the lora_A / lora_B weights and only they get Adam state."""
    sample = stack_samples(make_samples(1, grid=(16, 32), rollout_steps=1))
    config = AuroraConfig(
        encoder_depths=(1, 1), encoder_num_heads=(2, 4), decoder_depths=(1, 1), decoder_num_heads=(4, 2),
        embed_dim=16, num_heads=2, window_size=(2, 2, 4), latent_levels=2, use_lora=True, lora_mode="all", lora_steps=2,
        surf_vars=("2t", "msl"), static_vars=("lsm", "z"), atmos_vars=("z", "t"),
    )
    params = jax.eval_shape(lambda: AuroraTask(config).init(jax.random.PRNGKey(0), sample))
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    lora = [n for n in names if "lora" in n.lower()]
    assert lora and len(lora) < len(names)
    assert all(n.endswith(("'lora_A']", "'lora_B']")) for n in lora)
    optimizer = make_optimizer(optax.constant_schedule(1e-3), trainable=is_lora_param)
    state = jax.eval_shape(optimizer.init, params)
    n_state = sum(1 for x in jax.tree.leaves(state) if len(x.shape) > 0)
    assert n_state == 2 * len(lora)


def test_lora_only_update_of_an_aurora_moves_only_the_adapters_in_use():
    """One real optimizer step of a small Aurora with ``--lora_only`` (LoRA mode ``all``, 3
    adapters, a 2-step roll-out): no base weight moves, and of the adapters only those of
    roll-out steps 0 and 1 do. ``lora_B`` starts at zero, so ``lora_A`` has no gradient yet
    and the B slices tell which adapters were used."""
    sample = jax.tree.map(jnp.asarray, stack_samples(make_samples(2, grid=(16, 32), rollout_steps=2)))
    config = AuroraConfig(
        encoder_depths=(1, 1), encoder_num_heads=(2, 4), decoder_depths=(1, 1), decoder_num_heads=(4, 2),
        embed_dim=16, num_heads=2, window_size=(2, 2, 4), latent_levels=2, use_lora=True, lora_mode="all", lora_steps=3,
        surf_vars=("2t", "msl"), static_vars=("lsm", "z"), atmos_vars=("z", "t"),
    )
    task = AuroraTask(config)
    optimizer = make_optimizer(optax.constant_schedule(1e-2), trainable=is_lora_param)

    @jax.jit
    def init_and_step(key):
        params = task.init(key, sample)
        # Fresh adaptive-norm modulations are zero, which gates the attention branches (and
        # their LoRA) off; perturb the base weights so every branch carries gradient.
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        keys = jax.random.split(key, len(leaves))
        params = treedef.unflatten([x if is_lora_param(path) else x + 0.05 * jax.random.normal(k, x.shape) for (path, x), k in zip(leaves, keys)])
        grads = jax.grad(lambda p: task.loss(p, sample, key)[0])(params)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return params, optax.apply_updates(params, updates)

    before, after = init_and_step(jax.random.PRNGKey(0))
    moved_b = []
    for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
        name = jax.tree_util.keystr(path)
        if name.endswith("'lora_B']"):
            moved_b.append([bool(np.any(np.asarray(o) != np.asarray(n))) for o, n in zip(old, new)])  # per adapter
        else:  # base weights are frozen; lora_A has no gradient while B = 0
            np.testing.assert_array_equal(np.asarray(old), np.asarray(new), err_msg=name)
    assert moved_b and all(m == [True, True, False] for m in moved_b), moved_b


def test_lora_only_without_pretrained_weights_is_warned_about():
    """A fresh Aurora's Swin blocks are switched off by their zero-initialised modulations, so
    LoRA-only training from scratch moves nothing: aurora-train says so."""
    from aurora_loop.cli.train import untrainable_lora_warning
    from aurora_loop.task import make_task

    fresh = TrainingConfig(model="tiny", lora_only=True, model_kwargs={"use_lora": True})
    task = make_task("tiny", fresh)
    assert "nothing trains" in untrainable_lora_warning(fresh, task)
    assert untrainable_lora_warning(fresh.replace(checkpoint_dir="pretrained/"), task) is None
    assert untrainable_lora_warning(fresh.replace(lora_only=False), task) is None
    without_lora = fresh.replace(model_kwargs=None)  # refused later by the optimizer instead
    assert untrainable_lora_warning(without_lora, make_task("tiny", without_lora)) is None
