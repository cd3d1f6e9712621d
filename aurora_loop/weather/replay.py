"""Roll-out fine-tuning with a replay buffer (the Aurora paper's ``replay`` mode).

Long roll-outs cannot be back-propagated through, and even the pushforward trick costs
``rollout_steps`` forward passes per optimizer step. The paper instead keeps a buffer of
model states: every optimizer step takes one state from the buffer, predicts *one* step
from it, scores that prediction against the ground truth at its lead time, and puts the
prediction back as the state's new newest history step. Fresh samples from the dataset
enter only every ``refresh_every`` steps, so the model trains on its own, ever longer
forecasts at the cost of one forward and backward pass per step.

Our buffer (:class:`ReplayBuffer`) lives on the device inside the train state, so it is
saved in every checkpoint and a resumed run continues with the same buffer and the same
random choices. It has ``D`` slots; a slot holds one *batch* of ``B`` examples (the global
batch, split over the mesh like any batch): their current history, the sample's
``rollout_steps = K`` targets, and the lead (how many steps the slot has rolled out).

- Insertion (every ``refresh_every`` steps, the step that brings a dataset batch): the
  fresh batch, at lead 0, goes into an empty slot, or else evicts the slot rolled out
  furthest (lowest index on ties).
- Each step: one non-empty slot is drawn uniformly with the step's RNG; the model
  predicts step ``lead + 1`` from its history (LoRA sees ``rollout_step = lead``); the
  loss is the task's one-step loss against target ``lead``; the prediction is fed back
  under ``stop_gradient`` and the lead grows by one. A slot that has used all ``K``
  targets is empty again.

``refresh_every <= K`` guarantees a non-empty slot at every step: a fresh batch needs K
draws to be used up, and only ``refresh_every`` draws happen before the next one arrives.

Memory: the buffer holds ``D x (history + K)`` states of the global batch (split over the
devices), e.g. D = 4, K = 8, history 2: 40 batches' worth of fields per device share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from aurora_loop.config import replay_settings_problem
from aurora_loop.data import REPEAT_BATCH, example_batch
from aurora_loop.model.batch import Batch, Sample
from aurora_loop.weather.rollout import Predictor, StepLoss, advance_history


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """The replay mode's two knobs.

    ``buffer_size``: slots ``D``, each one global batch. ``refresh_every``: a dataset batch
    enters the buffer every this many optimizer steps (the data loader yields one batch per
    ``refresh_every`` steps); at most ``rollout_steps``.
    """

    buffer_size: int = 4
    refresh_every: int = 1

    def check(self, rollout_steps: int) -> None:
        """Raise ValueError unless the buffer can always offer a state to train on."""
        problem = replay_settings_problem(self.buffer_size, self.refresh_every, rollout_steps)
        if problem:
            raise ValueError(problem)


@flax.struct.dataclass
class ReplayBuffer:
    """``D`` slots of roll-out states (device arrays, part of the train state).

    ``slots``: a Sample whose every leaf has a leading slot axis: ``slots.inputs`` the
    current history of each slot, surface fields (D, B, history, h, w), atmospheric ones
    (D, B, history, c, h, w), ``metadata.time`` (D, B) hours since 1970 of the newest
    history step; ``slots.targets`` the sample's K targets, (D, B, K, ...), with
    ``metadata.time`` of the first target. ``step_hours``: (D, B) hours between roll-out
    steps. ``lead``: (D,) int32, steps already taken from each slot; K marks an empty slot.
    """

    slots: Sample
    step_hours: jax.Array
    lead: jax.Array

    def partition_specs(self, axis: str | tuple[str, ...] = "data") -> ReplayBuffer:
        """Examples split over ``axis`` like a batch's; the slot axis stays whole on every device."""
        per_slot = self.slots.partition_specs(axis)
        slots = jax.tree.map(lambda spec: PartitionSpec(None, *spec), per_slot, is_leaf=lambda x: isinstance(x, PartitionSpec))
        return ReplayBuffer(slots=slots, step_hours=PartitionSpec(None, axis), lead=PartitionSpec())


def _targets_per_sample(sample: Sample) -> int:
    for field in (sample.targets.surf_vars, sample.targets.atmos_vars):
        for value in field.values():
            return int(value.shape[1])
    raise ValueError("the sample has no surface or atmospheric targets")


def empty_buffer(example: Sample, config: ReplayConfig) -> ReplayBuffer:
    """A buffer with every slot empty, shaped for batches like ``example`` (traceable)."""
    steps = _targets_per_sample(example)
    config.check(steps)
    depth = config.buffer_size
    slots = jax.tree.map(lambda x: jnp.zeros((depth,) + jnp.shape(x), jnp.asarray(x).dtype), example)
    step_hours = jnp.zeros((depth, example.batch_size), jnp.asarray(example.inputs.metadata.time).dtype)
    return ReplayBuffer(slots=slots, step_hours=step_hours, lead=jnp.full((depth,), steps, jnp.int32))


def insert(buffer: ReplayBuffer, fresh: Sample, when: jax.Array | bool = True) -> ReplayBuffer:
    """Put ``fresh`` (lead 0) into an empty slot, else over the slot rolled out furthest; with
    ``when`` false (a traced boolean scalar), leave the buffer as it is.

    The choice is a select inside the slot's update, not a branch, so the buffer is updated in
    place either way."""
    slot = jnp.argmax(buffer.lead)  # the first of the largest: empty slots (lead K) come first
    when = jnp.asarray(when)
    first_time = jnp.asarray(fresh.targets.metadata.time)
    step_hours = first_time - jnp.asarray(fresh.inputs.metadata.time).astype(first_time.dtype)

    def put(buf: jax.Array, new: Any) -> jax.Array:
        return buf.at[slot].set(jnp.where(when, jnp.asarray(new).astype(buf.dtype), buf[slot]))

    return ReplayBuffer(
        slots=jax.tree.map(put, buffer.slots, fresh),
        step_hours=put(buffer.step_hours, step_hours),
        lead=put(buffer.lead, 0),
    )


def _target_at(targets: Batch, lead: jax.Array, step_hours: jax.Array) -> Batch:
    """Target ``lead`` (traced) of a slot's targets: fields with t = 1 and its valid time."""
    pick = lambda v: jax.lax.dynamic_slice_in_dim(v, lead, 1, axis=1)  # noqa: E731
    first = jnp.asarray(targets.metadata.time)
    return targets.replace(
        surf_vars={k: pick(v) for k, v in targets.surf_vars.items()},
        atmos_vars={k: pick(v) for k, v in targets.atmos_vars.items()},
        metadata=targets.metadata.replace(time=first + lead.astype(first.dtype) * step_hours.astype(first.dtype)),
    )


def replay_loss(
    predict: Predictor,
    step_loss: StepLoss,
    buffer: ReplayBuffer,
    rng: jax.Array,
    fresh: Sample | None = None,
    feed_back: Any = None,
    insert_fresh: jax.Array | bool = True,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], ReplayBuffer]]:
    """One replay step: ``(loss, (metrics, new_buffer))``, differentiable in ``predict``'s
    parameters (the buffer update carries no gradient).

    ``fresh``: a dataset batch, inserted before drawing when ``insert_fresh`` (a traced boolean
    scalar, or a Python bool), or ``None``.
    ``feed_back``: what a prediction becomes before it is stored as the next input
    (:data:`aurora_loop.weather.rollout.FeedBack`; ``None``: itself).
    ``metrics``: ``replay_lead`` (the lead in steps of the scored prediction, 1..K) and
    ``replay_slots_used`` (non-empty slots after the step).
    """
    if fresh is not None:
        buffer = insert(buffer, fresh, insert_fresh)
    steps = _targets_per_sample(jax.tree.map(lambda x: x[0], buffer.slots))
    available = buffer.lead < steps
    slot = jax.random.categorical(rng, jnp.where(available, 0.0, -jnp.inf))
    sample = jax.tree.map(lambda x: x[slot], buffer.slots)
    lead = buffer.lead[slot]
    target = _target_at(sample.targets, lead, buffer.step_hours[slot])
    prediction = predict(sample.inputs, lead)
    loss = step_loss(prediction, target)
    fed = prediction if feed_back is None else feed_back(prediction)
    history = advance_history(sample.inputs, jax.lax.stop_gradient(fed), target.metadata.time)
    inputs = jax.tree.map(lambda buf, new: buf.at[slot].set(new.astype(buf.dtype)), buffer.slots.inputs, history)
    new_lead = buffer.lead.at[slot].add(1)
    updated = buffer.replace(slots=Sample(inputs, buffer.slots.targets), lead=new_lead)
    metrics = {
        "replay_lead": (lead + 1).astype(jnp.float32),
        "replay_slots_used": jnp.sum(new_lead < steps).astype(jnp.float32),
    }
    return loss, (metrics, updated)


class RepeatEachBatch:
    """A Loader yielding each batch of ``loader`` followed by ``n - 1``
    :data:`~aurora_loop.data.REPEAT_BATCH` markers: ``n`` steps per dataset batch.

    Its position includes the repeats still owed, so a checkpoint between two batches resumes
    there; the first owed step of a resumed run trains on ``loader``'s example batch instead
    (replay ignores the batch of a step that inserts nothing).
    """

    def __init__(self, loader: Any, n: int) -> None:
        self.loader = loader
        self.n = n
        self.owed = 0
        self._example: Any = None

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)
        self.owed = 0

    def __len__(self) -> int:
        return len(self.loader) * self.n

    def example_batch(self) -> Any:
        """One batch shaped like every batch; the inner loader keeps its position (reading an
        example may restart a loader without ``example_batch``, so its state is put back)."""
        if self._example is None:
            position = self.loader.state_dict()
            self._example = example_batch(self.loader)
            self.loader.load_state_dict(position)
        return self._example

    @property
    def steps_into_epoch(self) -> int:
        """Steps of the current epoch already taken (for checkpoints that predate ``epoch_step``)."""
        return int(self.loader.state_dict()["position"]) * self.n - self.owed

    def __iter__(self) -> Iterator[Any]:
        if self.owed > 0:  # resumed between two batches: any batch of the right shape will do
            self.owed -= 1
            yield self.example_batch()
        while self.owed > 0:
            self.owed -= 1
            yield REPEAT_BATCH
        for batch in self.loader:
            self.owed = self.n - 1
            yield batch
            while self.owed > 0:
                self.owed -= 1
                yield REPEAT_BATCH

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "steps_owed": self.owed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.owed = int(state["steps_owed"])


class ReplayTraining:
    """The stateful-Task extension for replay mode, for tasks on ``Sample`` batches.

    A task mixing this in sets ``self.replay`` (a :class:`ReplayConfig`, or ``None`` when
    not in replay mode) and provides ``_predict_fn(params) -> Predictor``,
    ``_step_loss(prediction, target) -> scalar`` and ``_prepare(sample) -> sample`` (e.g. a
    crop). The Trainer then keeps the buffer in ``TrainState.task_state``, and the task's
    ``train_loader`` repeats each dataset batch for ``refresh_every`` steps: the first step
    of each group inserts it into the buffer.
    """

    replay: ReplayConfig | None = None
    rollout_mode: str = "full"

    def _set_rollout_mode(self, mode: str, replay: ReplayConfig | None) -> None:
        """``rollout_mode`` (full | pushforward | replay) and, in replay mode, its settings."""
        self.rollout_mode = mode
        self.replay = (replay or ReplayConfig()) if mode == "replay" else None

    @property
    def _stateless_mode(self) -> str:
        """The :func:`aurora_loop.weather.rollout.rollout_loss` mode of the stateless ``loss``: replay
        mode trains through ``stateful_loss``; scored statelessly it is pushforward."""
        return "pushforward" if self.rollout_mode == "replay" else self.rollout_mode

    @property
    def batch_every(self) -> int:
        """Optimizer steps per dataset batch (1 unless in replay mode)."""
        return self.replay.refresh_every if self.replay is not None else 1

    def train_loader(self, loader: Any) -> Any:
        """The Task hook: in replay mode, each batch for ``batch_every`` steps."""
        return RepeatEachBatch(loader, self.batch_every) if self.batch_every > 1 else loader

    def _prepare(self, sample: Sample) -> Sample:
        return sample

    def init_state(self, example_batch: Sample) -> ReplayBuffer | None:
        """The task's own part of the train state: an empty buffer, or ``None``."""
        if self.replay is None:
            return None
        return empty_buffer(self._prepare(example_batch), self.replay)

    def stateful_loss(
        self, params: Any, task_state: ReplayBuffer, batch: Sample, rng: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, tuple[dict[str, jax.Array], ReplayBuffer]]:
        """``(loss, (metrics, new_task_state))``. ``batch`` enters the buffer on the first step of
        each group of ``batch_every`` (``step``: optimizer steps already taken; groups start at
        multiples of ``batch_every``, as :class:`RepeatEachBatch` yields them)."""
        insert_now = step % self.batch_every == 0
        return replay_loss(self._predict_fn(params), self._step_loss, task_state, rng, self._prepare(batch),
                           getattr(self, "_feed_back", None), insert_now)


def replay_config(config: Any) -> ReplayConfig | None:
    """The ReplayConfig of a TrainingConfig-like object in replay mode, else ``None``."""
    if getattr(config, "rollout_mode", "full") != "replay":
        return None
    return ReplayConfig(
        buffer_size=int(getattr(config, "replay_buffer_size", ReplayConfig.buffer_size)),
        refresh_every=int(getattr(config, "replay_refresh_every", ReplayConfig.refresh_every)),
    )
