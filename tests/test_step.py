"""The sharded train step: device-count invariance, refusals, the optimizer schedule."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from aurora_loop.callbacks import Callback
from aurora_loop.data import ArrayLoader
from aurora_loop.errors import UsageError
from aurora_loop.model.batch import stack_samples
from aurora_loop.optim import learning_rate_schedule, make_optimizer
from aurora_loop.parallel import make_mesh
from aurora_loop.tasks.conv import ConvTask
from aurora_loop.trainer import Trainer
from tests.synthetic import make_samples


class LossLog(Callback):
    def __init__(self):
        self.losses = []

    def wants_metrics(self, trainer, step):
        return True

    def on_step(self, trainer, step, metrics):
        self.losses.append(metrics["loss"])


def train_on(num_devices: int, rollout_steps: int = 1):
    samples = make_samples(12, rollout_steps=rollout_steps)
    loader = ArrayLoader(samples, 4, stack_samples, seed=3)
    log = LossLog()
    trainer = Trainer([log], optimizer=make_optimizer(learning_rate_schedule(3e-3, 3, 1)), max_steps=3, mesh=make_mesh(num_devices), seed=1)
    state = trainer.fit(ConvTask(), loader)
    return log.losses, jax.device_get(state.params)


@pytest.mark.parametrize("rollout_steps", [1, 2])
def test_one_and_four_devices_agree(rollout_steps):
    losses_1, params_1 = train_on(1, rollout_steps)
    losses_4, params_4 = train_on(4, rollout_steps)
    assert len(losses_1) == 3
    np.testing.assert_allclose(losses_4, losses_1, rtol=1e-5)
    # Adam divides by the root of the squared gradients, so a float32 rounding difference from
    # the devices' reduction order can grow to ~1e-5 relative in a parameter after 3 steps.
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_4)):
        np.testing.assert_allclose(b, a, rtol=5e-5, atol=1e-7)
    # The parameters really moved: the comparison is not between two initialisations.
    assert losses_1[-1] != losses_1[0]


def test_params_are_replicated_and_batch_is_sharded():
    samples = make_samples(8)
    trainer = Trainer([], optimizer=optax.adam(1e-3), max_steps=1, mesh=make_mesh(4))
    state = trainer.fit(ConvTask(), ArrayLoader(samples, 4, stack_samples))
    leaf = jax.tree.leaves(state.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4
    placed = trainer.place(stack_samples(samples[:4]))
    field = placed.inputs.surf_vars["2t"]
    assert [s.data.shape[0] for s in field.addressable_shards] == [1, 1, 1, 1]
    assert placed.inputs.static_vars["lsm"].sharding.is_fully_replicated


def test_batch_not_divisible_by_devices_is_refused():
    samples = make_samples(6)
    trainer = Trainer([], optimizer=optax.adam(1e-3), max_steps=1, mesh=make_mesh(4))
    with pytest.raises(UsageError, match="batch size 3 is not divisible by the 4 devices"):
        trainer.fit(ConvTask(), ArrayLoader(samples, 3, stack_samples))


def test_more_devices_than_visible_is_refused():
    with pytest.raises(UsageError, match="more devices than the 4 visible"):
        make_mesh(8)


def test_schedule_warms_up_linearly_then_decays_to_a_tenth():
    schedule = learning_rate_schedule(1e-3, total_steps=100, warmup_steps=10)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(100)) == pytest.approx(1e-4)
    assert 1e-4 < float(schedule(55)) < 1e-3


def test_gradient_clipping_reaches_adam_moments():
    """With clipping, Adam's first moment after one step is (1 - b1) x the clipped gradient."""
    grads = {"w": np.full((4,), 100.0, np.float32)}  # global norm 200
    params = {"w": np.zeros((4,), np.float32)}

    def first_moment(optimizer):
        _, state = optimizer.update(grads, optimizer.init(params), params)
        adam_state = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")][0]
        return np.linalg.norm(adam_state.mu["w"])

    assert first_moment(make_optimizer(lambda _: 1e-3, grad_clip_norm=1.0)) == pytest.approx(0.1, rel=1e-5)
    assert first_moment(make_optimizer(lambda _: 1e-3)) == pytest.approx(20.0, rel=1e-5)


def test_conv_task_is_independent_of_variable_order():
    """Eager and jitted calls see dicts in different key orders; channels must not move."""
    sample = stack_samples(make_samples(2))
    task = ConvTask()
    params = task.init(jax.random.PRNGKey(0), sample)
    params = jax.tree.map(lambda x: x + 0.01, params)  # the zero-initialised head must matter

    def reorder(batch):
        return batch.replace(surf_vars=dict(reversed(list(batch.surf_vars.items()))),
                             atmos_vars=dict(reversed(list(batch.atmos_vars.items()))))

    shuffled = type(sample)(reorder(sample.inputs), reorder(sample.targets))
    eager = task.predict(params, shuffled)
    jitted = jax.jit(task.predict)(params, sample)
    for name in sample.targets.surf_vars:
        np.testing.assert_allclose(eager.surf_vars[name], jitted.surf_vars[name], rtol=1e-5, atol=1e-3)


def test_learning_rate_is_tabulated_before_the_loop():
    schedule = learning_rate_schedule(1e-3, total_steps=6, warmup_steps=2)
    trainer = Trainer([], optimizer=make_optimizer(schedule), log_learning_rate=schedule, max_steps=6, max_epochs=5, mesh=make_mesh(1))
    trainer.fit(ConvTask(), ArrayLoader(make_samples(4), 2, stack_samples))
    assert trainer._lr_table is not None and len(trainer._lr_table) == 6
    for step in range(1, 7):
        assert trainer.learning_rate(step) == pytest.approx(float(schedule(step - 1)), rel=1e-6)


def test_grad_norm_covers_only_the_trainable_parameters():
    """With a trainable selection (--lora_only, say) grad_norm is the norm of the gradients the
    optimizer uses, not of every gradient (the frozen ones are then dead code for XLA)."""
    from aurora_loop.step import TrainState, make_init_fn, make_train_step, state_shardings

    task = ConvTask()
    samples = make_samples(4)
    mesh = make_mesh(1)
    trainer = Trainer([], mesh=mesh)
    batch = trainer.place(stack_samples(samples[:2]))
    first = jax.tree_util.tree_leaves_with_path(task.init(jax.random.PRNGKey(0), batch))[0][0]
    trainable = lambda path: path[: len(first)] == first  # noqa: E731 - one leaf trains
    optimizer = make_optimizer(optax.constant_schedule(1e-3), trainable=trainable)
    init = make_init_fn(task, optimizer, seed=0)
    state: TrainState = jax.jit(init)(batch)
    shardings = state_shardings(jax.eval_shape(init, batch), mesh)
    batch_sharding = jax.tree.map(lambda x: x.sharding, batch)
    grads = jax.grad(lambda p: task.loss(p, batch, jax.random.fold_in(state.rng, state.step))[0])(state.params)
    leaves = dict(jax.tree_util.tree_leaves_with_path(grads))
    expected_trainable = float(np.linalg.norm(np.asarray(leaves[first]).ravel()))
    expected_all = float(np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in leaves.values())))
    assert len(leaves) > 1 and expected_trainable < expected_all

    for selection, expected in ((trainable, expected_trainable), (None, expected_all)):
        step = make_train_step(task, optimizer, shardings, batch_sharding, mesh, trainable=selection)
        fresh = jax.jit(init)(batch)  # the step donates its input state
        _, metrics = step(fresh, batch)
        assert float(metrics["grad_norm"]) == pytest.approx(expected, rel=1e-5)
