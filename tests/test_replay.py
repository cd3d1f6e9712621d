"""Replay-buffer roll-out fine-tuning (``--rollout_mode replay``, aurora_loop.weather.replay)."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aurora_loop.callbacks import Callback, ModelCheckpoint
from aurora_loop.data import ArrayLoader
from aurora_loop.model.batch import stack_samples
from aurora_loop.parallel import make_mesh
from aurora_loop.tasks.conv import ConvTask
from aurora_loop.trainer import Trainer
from aurora_loop.weather.replay import ReplayConfig, empty_buffer, insert, replay_loss
from aurora_loop.weather.rollout import rollout_scan
from tests.synthetic import make_samples

STEPS = 3  # rollout_steps: targets per sample, the longest lead in the buffer


@functools.cache
def _setup():
    sample = jax.tree.map(jnp.asarray, stack_samples(make_samples(2, rollout_steps=STEPS)))
    task = ConvTask(features=8, depth=2)
    params = jax.jit(task.init)(jax.random.PRNGKey(0), sample)
    # The last layer starts at zero; perturb every leaf so predictions differ from persistence.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return task, params, sample


def test_one_slot_replays_the_rollout_step_by_step():
    """With one slot and fixed parameters, K replay steps after one insertion score exactly
    the K steps of an ordinary roll-out: the buffer advances the history, the valid times
    and the lead (the step index the model sees) as the roll-out does."""
    task, params, sample = _setup()

    def predict(inputs, step):
        # Depends on the step index, as LoRA does: the losses agree only if the indices do.
        prediction = task._predict_fn(params)(inputs, step)
        return prediction.replace(surf_vars={**prediction.surf_vars, "2t": prediction.surf_vars["2t"] + 0.5 * step})

    replay_step = jax.jit(lambda buffer, key, fresh: replay_loss(predict, task._step_loss, buffer, key, fresh))
    expected = jax.jit(lambda s: rollout_scan(predict, s, task._step_loss, use_scan=False))(sample)
    buffer = empty_buffer(sample, ReplayConfig(buffer_size=1, refresh_every=STEPS))
    assert int(buffer.lead[0]) == STEPS  # empty
    losses, leads = [], []
    for k in range(STEPS):
        loss, (metrics, buffer) = replay_step(buffer, jax.random.PRNGKey(k), sample if k == 0 else None)
        losses.append(float(loss))
        leads.append(float(metrics["replay_lead"]))
    np.testing.assert_allclose(losses, np.asarray(expected), rtol=1e-5)
    assert leads == [1.0, 2.0, 3.0]  # the model saw roll-out steps 0, 1, 2
    assert int(buffer.lead[0]) == STEPS  # used up: empty again
    # The history now ends with the last prediction, valid STEPS steps after the input time.
    dt = np.asarray(sample.targets.metadata.time) - np.asarray(sample.inputs.metadata.time)
    np.testing.assert_allclose(np.asarray(buffer.slots.inputs.metadata.time[0]), np.asarray(sample.inputs.metadata.time) + STEPS * dt)


def test_insertion_fills_empty_slots_then_evicts_the_furthest_rolled_out():
    _, _, sample = _setup()
    buffer = empty_buffer(sample, ReplayConfig(buffer_size=3, refresh_every=1))
    buffer = insert(buffer, sample)
    assert buffer.lead.tolist() == [0, STEPS, STEPS]
    buffer = buffer.replace(lead=jnp.asarray([2, 1, 0], jnp.int32))
    buffer = insert(buffer, sample)
    assert buffer.lead.tolist() == [0, 1, 0]  # slot 0 (lead 2, the furthest) was evicted


def test_draws_only_non_empty_slots_and_gradients_ignore_the_buffer():
    task, params, sample = _setup()
    buffer = insert(empty_buffer(sample, ReplayConfig(buffer_size=4, refresh_every=1)), sample)
    buffer = buffer.replace(lead=jnp.asarray([STEPS, 1, STEPS, STEPS], jnp.int32))
    draw = jax.jit(lambda key: replay_loss(task._predict_fn(params), task._step_loss, buffer, key))
    for seed in range(8):
        _, (metrics, after) = draw(jax.random.PRNGKey(seed))
        assert after.lead.tolist() == [STEPS, 2, STEPS, STEPS]
        assert float(metrics["replay_lead"]) == 2.0

    def loss(p):
        return replay_loss(task._predict_fn(p), task._step_loss, buffer, jax.random.PRNGKey(0))[0]

    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 0


class Record(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.leads: dict[int, float] = {}

    def on_step(self, trainer, step, metrics):
        self.losses[step] = metrics["loss"]
        self.leads[step] = metrics["replay_lead"]


class CountingLoader(ArrayLoader):
    """Counts the batches handed out."""

    served = 0

    def __iter__(self):
        for batch in super().__iter__():
            CountingLoader.served += 1
            yield batch


def _fit(callbacks, max_steps=None, devices=1, epochs=1, batch_size=2):
    samples = make_samples(8, rollout_steps=STEPS)
    train = CountingLoader(samples, batch_size, stack_samples, seed=0)
    task = ConvTask(features=8, depth=2, rollout_mode="replay", replay=ReplayConfig(buffer_size=3, refresh_every=2))
    trainer = Trainer(callbacks, optimizer=optax.adam(1e-3), max_epochs=epochs, max_steps=max_steps, mesh=make_mesh(devices))
    state = trainer.fit(task, train)
    return trainer, state


def test_replay_trains_two_steps_per_batch_and_resumes_exactly(tmp_path):
    """refresh_every=2: the loader serves one batch per two optimizer steps. A run stopped
    between two batches (step 5) and resumed from its checkpoint continues with the same
    buffer, draws and losses as the run that was never stopped, to the last bit."""
    CountingLoader.served = 0
    full = Record()
    trainer, state_full = _fit([full], epochs=2)
    assert trainer.global_step == 2 * 4 * 2  # 2 epochs x 4 batches x 2 steps per batch
    assert CountingLoader.served == 1 + 8  # the shape probe, then each batch once per epoch
    # One compiled step serves the steps that insert a batch and those that do not.
    assert trainer.train_step._cache_size() == 1
    assert sorted(set(full.leads.values())) == [1.0, 2.0, 3.0]  # the buffer reaches the longest lead

    ckpt_dir = str(tmp_path / "ckpt")
    first = Record()
    _fit([first, ModelCheckpoint(ckpt_dir, every_n_steps=100, verbose=False)], max_steps=5)
    assert ModelCheckpoint(ckpt_dir).all_steps() == [5]
    resumed = Record()
    trainer, state_resumed = _fit([resumed, ModelCheckpoint(ckpt_dir, every_n_steps=100, verbose=False)], epochs=2)
    assert trainer.resumed_from == 5
    assert sorted(resumed.losses) == list(range(6, 17))
    assert [resumed.losses[s] for s in range(6, 17)] == [full.losses[s] for s in range(6, 17)]
    for a, b in zip(jax.tree.leaves(state_full), jax.tree.leaves(state_resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert os.path.isdir(os.path.join(ckpt_dir, "5", "state"))


def test_replay_on_four_devices_matches_one():
    """The buffer is split over the mesh like a batch; 4 devices give 1 device's losses."""
    one, four = Record(), Record()
    _fit([one], max_steps=4, batch_size=4)
    trainer, state = _fit([four], max_steps=4, devices=4, batch_size=4)
    np.testing.assert_allclose([four.losses[s] for s in range(1, 5)], [one.losses[s] for s in range(1, 5)], rtol=1e-5)
    assert [four.leads[s] for s in range(1, 5)] == [one.leads[s] for s in range(1, 5)]
    surf = next(iter(state.task_state.slots.inputs.surf_vars.values()))
    assert surf.shape[:2] == (3, 4) and len(surf.sharding.device_set) == 4
    assert surf.sharding.spec[:2] == (None, "data")


def test_replay_refuses_a_refresh_slower_than_the_rollout():
    with pytest.raises(ValueError, match="replay_refresh_every"):
        ReplayConfig(buffer_size=2, refresh_every=STEPS + 1).check(STEPS)
