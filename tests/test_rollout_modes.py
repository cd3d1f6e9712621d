"""Roll-out fine-tuning modes: ``full`` back-propagates through every step, ``pushforward``
only through the last one (earlier predictions fed back under stop_gradient)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_loop.config import TrainingConfig, validate
from aurora_loop.errors import UsageError
from aurora_loop.model.batch import Sample, stack_samples
from aurora_loop.tasks.conv import ConvTask, make_conv_task
from aurora_loop.weather.rollout import advance_history, rollout_loss
from tests.synthetic import make_samples


@functools.cache
def _setup(rollout_steps: int):
    sample = jax.tree.map(jnp.asarray, stack_samples(make_samples(2, rollout_steps=rollout_steps)))
    task = ConvTask(features=8, depth=2)

    @jax.jit
    def init(rng):
        params = task.init(rng, sample)
        # Perturb every leaf (the last layer starts at zero) so all paths carry gradient.
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        return treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

    return task, init(jax.random.PRNGKey(0)), sample


def _value_and_grad(task, params, sample, mode, average=True):
    task = ConvTask(features=task.features, depth=task.depth, rollout_average=average, rollout_mode=mode)
    fn = jax.jit(jax.value_and_grad(lambda p: task.loss(p, sample, jax.random.PRNGKey(0)), has_aux=True))
    (loss, aux), grads = fn(params)
    return loss, aux, grads


def _assert_tree_close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw), a, b)


def _max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_pushforward_gradient_is_the_last_step_gradient_on_detached_inputs():
    task, params, sample = _setup(rollout_steps=3)
    loss_pf, aux_pf, grads_pf = _value_and_grad(task, params, sample, "pushforward")

    # The same gradient by hand: roll out two steps, freeze the predictions as inputs, and
    # differentiate the one-step loss against the third target.
    predictions = jax.jit(task.predict)(params, sample)  # targets-shaped, 3 steps
    t0 = jnp.asarray(sample.targets.metadata.time)
    dt = t0 - jnp.asarray(sample.inputs.metadata.time)
    inputs = sample.inputs
    for k in range(2):
        inputs = advance_history(inputs, jax.lax.stop_gradient(predictions.time_slice(k, k + 1)), t0 + k * dt)
    last = sample.targets.time_slice(2, 3)
    last = last.replace(metadata=last.metadata.replace(time=t0 + 2 * dt))
    loss_ref, _, grads_ref = _value_and_grad(task, params, Sample(inputs, last), "full")

    np.testing.assert_allclose(float(loss_pf), float(loss_ref), rtol=1e-5)
    np.testing.assert_allclose(float(aux_pf["rollout_loss_last"]), float(loss_ref), rtol=1e-5)
    _assert_tree_close(grads_pf, grads_ref, rtol=1e-4, atol=1e-6)

    # full (last-step loss, gradient through all three steps) has the same value but a
    # different gradient: the earlier steps contribute through the fed-back predictions.
    loss_full, _, grads_full = _value_and_grad(task, params, sample, "full", average=False)
    np.testing.assert_allclose(float(loss_full), float(loss_pf), rtol=1e-5)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_full))
    assert _max_abs_diff(grads_full, grads_pf) > 1e-3 * scale


def test_pushforward_earlier_steps_get_no_gradient():
    """d(loss)/d(earlier prediction) is zero: perturbing the earlier steps' parameters only
    (a separate copy used for steps 0..K-2) leaves the pushforward loss gradient at zero."""
    task, params, sample = _setup(rollout_steps=3)
    predict_with = lambda p: task._predict_fn(p)  # noqa: E731

    def step_loss(prediction, target):
        return jnp.mean(jnp.abs(prediction.surf_vars["2t"] - target.surf_vars["2t"]))

    def loss_of_early(early_params, mode):
        late = task._predict_fn(params)

        def predict(inputs, step):
            # Earlier steps use early_params; the last step uses the fixed params.
            early = predict_with(early_params)(inputs, step)
            final = late(inputs, step)
            is_last = step == sample.targets.num_steps - 1
            return jax.tree.map(lambda a, b: jnp.where(is_last, b, a), early, final)

        return rollout_loss(predict, step_loss, sample, average=False, mode=mode)[0]

    g_pf = jax.jit(jax.grad(lambda p: loss_of_early(p, "pushforward")))(params)
    g_full = jax.jit(jax.grad(lambda p: loss_of_early(p, "full")))(params)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_pf))
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_full)) > 0.0


def test_one_step_full_last_equals_pushforward():
    task, params, sample = _setup(rollout_steps=1)
    loss_pf, _, grads_pf = _value_and_grad(task, params, sample, "pushforward")
    loss_full, _, grads_full = _value_and_grad(task, params, sample, "full", average=False)
    np.testing.assert_allclose(float(loss_full), float(loss_pf), rtol=1e-6)
    _assert_tree_close(grads_full, grads_pf, rtol=1e-5, atol=1e-7)


def test_config_rollout_mode():
    validate(TrainingConfig(rollout_mode="pushforward"))
    assert make_conv_task(TrainingConfig(rollout_mode="pushforward")).rollout_mode == "pushforward"
    validate(TrainingConfig(rollout_mode="replay", rollout_steps=2, replay_refresh_every=2))
    with pytest.raises(UsageError, match="replay_refresh_every"):
        validate(TrainingConfig(rollout_mode="replay", rollout_steps=1, replay_refresh_every=2))
    with pytest.raises(UsageError, match="replay_buffer_size"):
        validate(TrainingConfig(rollout_mode="replay", rollout_steps=2, replay_buffer_size=0))
    with pytest.raises(UsageError, match="full, pushforward or replay"):
        validate(TrainingConfig(rollout_mode="sideways"))
    with pytest.raises(ValueError):
        rollout_loss(lambda i, s: i, lambda p, t: 0.0, make_samples(1)[0], mode="sideways")


def test_pushforward_memory_is_one_step():
    """The detached steps keep no activations for the backward pass: the compiled gradient's
    temporaries with 3 pushforward steps are about those of 1 step, well under full's."""

    def temp_bytes(rollout_steps: int, mode: str) -> int:
        task, _, sample = _setup(rollout_steps)
        task = ConvTask(features=task.features, depth=task.depth, rollout_mode=mode)
        params = jax.eval_shape(lambda: task.init(jax.random.PRNGKey(0), sample))
        grad = jax.jit(jax.grad(lambda p: task.loss(p, sample, jax.random.PRNGKey(0))[0]))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    one = temp_bytes(1, "full")
    pushforward = temp_bytes(3, "pushforward")
    full = temp_bytes(3, "full")
    assert pushforward < 1.25 * one, (one, pushforward, full)
    assert full > 1.5 * pushforward, (one, pushforward, full)


def test_a_rematerialised_full_rollout_has_the_plain_rollouts_loss_and_gradients():
    """``full`` with remat over 3 steps: each step is kept as its input only and recomputed
    when its gradient arrives (``rollout._checkpointed_step``: what the step closes over,
    here the conv model's parameters, becomes an explicit argument so it gets its
    gradient), with the plain roll-out's loss and gradients."""
    task, params, sample = _setup(3)

    def value_and_grad(remat: bool):
        def loss(p):
            return rollout_loss(task._predict_fn(p), task._step_loss, sample, remat=remat)[0]

        return jax.jit(jax.value_and_grad(loss))(params)

    (loss, grads), (loss_r, grads_r) = value_and_grad(False), value_and_grad(True)
    np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
    _assert_tree_close(grads_r, grads, rtol=1e-4, atol=1e-6)
