"""The Task protocol: what a model plugs into the Trainer.

The trainer owns the optimizer, its state, the step counter and the RNG; a task only says
how to make parameters, how to score a batch for training, and how to evaluate one.
All three are pure functions of arrays, called inside ``jax.jit`` on the *global* batch
(sharded over the mesh's ``data`` axis), so a mean over the batch is a mean over all
devices and processes.

Batches are pytrees; the weather tasks receive :class:`aurora_loop.model.Sample`
(``inputs``: a Batch with t = history steps, ``targets``: a Batch with t = rollout steps).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
from clu import metrics as clu_metrics

Params = Any  # a pytree of jax.Arrays


@runtime_checkable
class Task(Protocol):
    """A trainable model.

    - ``init(rng, example_batch) -> params``: ``rng`` is a PRNG key; ``example_batch`` is a
      global batch of the training data (same pytree structure and shapes as the batches
      ``loss`` will see). Returns the parameter pytree (float32 leaves).
    - ``loss(params, batch, rng) -> (loss, metrics)``: ``loss`` is a scalar float32 (mean over
      the global batch); ``metrics`` a dict of scalar arrays logged as ``train/<name>``.
    - ``evaluate(params, batch) -> clu.metrics.Metric``: the batch's validation metrics as a
      mergeable CLU metric; the trainer merges it over the validation set and reports
      ``metric.compute()`` (a flat dict of floats such as ``loss``, ``mae/2t``,
      ``rmse/z500``) as ``val/<name>``.

    Optional:

    - ``setup(example_batch)``: called once, before anything is traced, with one batch of
      this process's training data on the host (numpy), for constants of the data that the
      compiled steps may embed (Aurora: the grid's patch areas).
    - ``predict(params, batch) -> Batch``: the model's forecast for ``batch`` (for weather
      tasks a Sample: a Batch shaped like ``batch.targets``, one time step per roll-out
      step). Callbacks that show forecasts (TensorBoardLogger's validation maps) use it
      when present, jitted on one device.
    - ``train_loader(loader) -> Loader``: the training loader the trainer iterates, built
      from the one it was given (e.g. one that yields each batch and then
      :data:`aurora_loop.data.REPEAT_BATCH` for a task that trains several steps per batch).
      Steps, epochs and checkpoints count what it yields.
    - A stateful task (e.g. replay mode, :class:`aurora_loop.weather.replay.ReplayTraining`) adds
      ``init_state(example_batch) -> task_state | None`` (arrays kept in
      ``TrainState.task_state``, checkpointed, split over the mesh by their own
      ``partition_specs()``) and ``stateful_loss(params, task_state, batch, rng, step) ->
      (loss, (metrics, new_task_state))``, ``step`` being the optimizer steps already taken
      (a traced int32 scalar). A stateful task does not combine with gradient accumulation.
    """

    name: str

    def init(self, rng: jax.Array, example_batch: Any) -> Params: ...

    def loss(self, params: Params, batch: Any, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]: ...

    def evaluate(self, params: Params, batch: Any) -> clu_metrics.Metric: ...


_REGISTRY: dict[str, Any] = {}


def register_task(name: str):
    """Decorator: make a task factory ``factory(config) -> Task`` selectable by ``--model name``."""

    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


TASK_ENTRY_POINTS = "aurora_loop.tasks"


def available_tasks() -> list[str]:
    _load_task_modules()
    return sorted(_REGISTRY)


def make_task(name: str, config: Any) -> Task:
    """Build the registered task ``name`` from a TrainingConfig."""
    _load_task_modules()
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name](config)


def _load_task_modules() -> None:
    """Import the modules that register tasks: those the ``aurora_loop.tasks`` entry-point group
    names (the built-in ones in ``setup.cfg``, and any installed package's). Through entry
    points, not an import of ``aurora_loop.tasks``, so the core stays below the weather layer;
    importing lazily keeps start-up fast."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=TASK_ENTRY_POINTS):
        entry.load()
