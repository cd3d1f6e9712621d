"""The jit-compiled, sharded train and eval steps and the train state (the optimizer is in :mod:`aurora_loop.optim`).

One ``jax.jit`` with explicit ``NamedSharding``s over ``Mesh(("data",))`` (pjit semantics):
parameters and optimizer state replicated, the batch split over ``data``. The task's loss is
a mean over the *global* batch, so the gradient XLA computes is already averaged over all
devices (it inserts the all-reduce); no ``pmean`` by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aurora_loop.accumulation import MicroBatches
from aurora_loop.parallel import DATA_AXIS, SPACE_AXIS, batch_shardings, replicated
from aurora_loop.task import Task


@flax.struct.dataclass
class TrainState:
    """Everything the optimizer loop carries between steps (all device arrays).

    ``step``: int32 scalar, optimizer steps taken. ``rng``: a raw uint32 PRNG key of shape
    (2,); step ``s`` uses ``fold_in(rng, s)`` so randomness depends only on (seed, step) and
    a resumed run draws the same numbers. ``task_state``: a stateful task's own arrays
    (e.g. the replay buffer, :mod:`aurora_loop.weather.replay`), checkpointed with the rest;
    ``None`` for ordinary tasks.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    task_state: Any = None
    ema_params: Any = None  # the weights' exponential moving average (``ema_decay``), sharded like params


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How the train step turns micro-batches into one optimizer update.

    ``accumulate``: micro-batches per update (the step takes them stacked on a leading axis
    and scans over them, so compiled memory does not grow with their number); gradients,
    loss and metrics are their means. ``ema_decay``: keep ``TrainState.ema_params`` with
    decay ``min(ema_decay, (1 + n) / (10 + n))`` after update ``n``. ``compute_dtype``: cast
    floating parameters to this dtype for the forward and backward pass (``bf16-params``:
    the model sees bfloat16 weights and its gradients are bfloat16, while the optimizer
    updates the float32 masters in ``params``).
    """

    accumulate: int = 1
    ema_decay: float | None = None
    compute_dtype: Any = None


PRECISION_COMPUTE_DTYPES = {"fp32": None, "bf16-mixed": None, "bf16-params": jnp.bfloat16}


def cast_floating(tree: Any, dtype: Any) -> Any:
    """``tree`` with its floating leaves cast to ``dtype`` (``None``: unchanged)."""
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def ema_update(ema: Any, params: Any, decay: float, updates_done: jax.Array) -> Any:
    """One EMA step after ``updates_done`` optimizer updates (int32 scalar): the decay ramps
    up as ``(1 + n) / (10 + n)`` so that early averages are not dominated by the initial
    weights (TensorFlow's ``ExponentialMovingAverage(num_updates=...)``)."""
    n = updates_done.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p.astype(e.dtype)).astype(e.dtype), ema, params)


def state_shardings(abstract_state: TrainState, mesh: Mesh, fsdp: bool = False) -> TrainState:
    """Shardings of the train state: every leaf replicated over the mesh, or with ``fsdp``
    every parameter and optimizer-state leaf with ndim >= 1 split over the ``data`` axis (and
    the ``space`` axis when the mesh has one: over all its devices) on its largest dimension
    divisible by that many devices (replicated when none is).

    FSDP-style (ZeRO-3): each device holds 1/n of the weights and Adam moments; XLA gathers a
    layer's weights where the computation needs them and reduce-scatters the gradients.
    ``step`` and ``rng`` stay replicated. A task state is split like a batch (its own
    ``partition_specs()``, see :func:`aurora_loop.parallel.batch_shardings`).
    """
    sharding = replicated(mesh)
    task_state = None if abstract_state.task_state is None else batch_shardings(abstract_state.task_state, mesh)
    if not fsdp:
        return jax.tree.map(lambda _: sharding, abstract_state.replace(task_state=None)).replace(task_state=task_state)
    axes = tuple(name for name in (DATA_AXIS, SPACE_AXIS) if name in mesh.axis_names)
    size = int(np.prod([mesh.shape[name] for name in axes]))
    split = axes[0] if len(axes) == 1 else axes  # with a space axis: over all devices

    def leaf(x: Any) -> NamedSharding:
        shape = tuple(getattr(x, "shape", ()))
        dims = [d for d, n in enumerate(shape) if n % size == 0 and n >= size]
        if not dims:
            return sharding
        d = max(dims, key=lambda d: (shape[d], -d))  # largest; the first of equals
        return NamedSharding(mesh, PartitionSpec(*([None] * d + [split])))

    return abstract_state.replace(
        step=sharding,
        rng=sharding,
        params=jax.tree.map(leaf, abstract_state.params),
        ema_params=jax.tree.map(leaf, abstract_state.ema_params),
        opt_state=jax.tree.map(leaf, abstract_state.opt_state),
        task_state=task_state,
    )


def make_init_fn(task: Task, optimizer: optax.GradientTransformation, seed: int, ema: bool = False) -> Callable[[Any], TrainState]:
    """``init(batch) -> TrainState``: parameters from the task, fresh optimizer state, the
    task's own state when it has one (``task.init_state(batch)``), and with ``ema`` the
    moving average, starting at the initial parameters."""

    def init(batch: Any) -> TrainState:
        rng = jax.random.PRNGKey(seed)
        init_rng, step_rng = jax.random.split(rng)
        params = task.init(init_rng, batch)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=step_rng,
            task_state=task.init_state(batch) if hasattr(task, "init_state") else None,
            ema_params=jax.tree.map(jnp.copy, params) if ema else None,
        )

    return init


def make_train_step(
    task: Task,
    optimizer: optax.GradientTransformation,
    state_sharding: TrainState,
    batch_sharding: Any,
    mesh: Mesh,
    trainable: Callable[[tuple], bool] | None = None,
    options: StepOptions = StepOptions(),
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted ``train_step(state, batch) -> (state, metrics)``; ``state`` is donated.

    ``metrics`` holds scalars: ``loss``, ``grad_norm`` (global L2 norm of the averaged
    gradient of the ``trainable`` parameters, all by default, before clipping),
    ``learning_rate`` when the optimizer injects it (``optax.inject_hyperparams``), and
    whatever the task's loss reports.

    With ``options.accumulate = N > 1`` the batch is N micro-batches as one
    :class:`aurora_loop.accumulation.MicroBatches` (``batch_sharding`` likewise).
    """
    step_fn = _train_step_fn(task, optimizer, trainable, options, state_sharding.params)
    metric_sharding = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, metric_sharding),
        donate_argnums=(0,),
    )


def _loss_and_grads(task: Task, params: Any, task_state: Any, batch: Any, rng: jax.Array, compute_dtype: Any, step: jax.Array | None):
    """((loss, task metrics, next task state), gradients as float32-or-params' dtype) of one batch.

    With ``compute_dtype`` the gradient is taken with respect to the cast parameters (so it,
    and its reduction over devices, is in that dtype) and cast back to the parameters' dtypes.
    """
    compute_params = cast_floating(params, compute_dtype)
    if task_state is None:
        (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(compute_params, batch, rng)
    else:
        stateful = jax.value_and_grad(task.stateful_loss, has_aux=True)
        (loss, (metrics, task_state)), grads = stateful(compute_params, task_state, batch, rng, step)
    if compute_dtype is not None:
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return (loss, metrics, task_state), grads


def _accumulated_loss_and_grads(task: Task, params: Any, micro_batches: MicroBatches, rng: jax.Array, options: StepOptions,
                                param_sharding: Any):
    """Means over ``options.accumulate`` micro-batches (:class:`MicroBatches`) of the loss, the
    task's metrics and the gradients, scanned so only one micro-batch's activations live at once.

    The running gradient sum is constrained to the parameters' shardings (FSDP: each device
    sums its own shard) and kept in float32.
    """
    n = options.accumulate

    def body(carry, xs):
        index, slices = xs
        batch = micro_batches.micro_batch(slices)
        (loss, metrics, _), grads = _loss_and_grads(task, params, None, batch, jax.random.fold_in(rng, index), options.compute_dtype, None)
        grads = jax.lax.with_sharding_constraint(grads, param_sharding)
        total_loss, total_metrics, total_grads = carry
        return (total_loss + loss, jax.tree.map(jnp.add, total_metrics, metrics),
                jax.tree.map(lambda t, g: t + g.astype(t.dtype), total_grads, grads)), None

    metric_shapes = jax.eval_shape(lambda: task.loss(params, micro_batches.first(), rng)[1])
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), metric_shapes),
             jax.lax.with_sharding_constraint(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), param_sharding))
    (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(n, dtype=jnp.int32), micro_batches.stacked_leaves))
    grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grads, params)
    return (loss / n, jax.tree.map(lambda m: m / n, metrics), None), grads


def _train_step_fn(task: Task, optimizer: optax.GradientTransformation, trainable: Callable[[tuple], bool] | None = None,
                   options: StepOptions = StepOptions(), param_sharding: Any = None):
    """The pure step. A task with a state (``TrainState.task_state`` not ``None``) is scored
    by ``task.stateful_loss(params, task_state, batch, rng, step)``, which also returns the next
    task state; every other task by ``task.loss(params, batch, rng)``."""

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        if options.accumulate > 1:
            (loss, task_metrics, task_state), grads = _accumulated_loss_and_grads(task, state.params, batch, rng, options, param_sharding)
        else:
            (loss, task_metrics, task_state), grads = _loss_and_grads(task, state.params, state.task_state, batch, rng, options.compute_dtype, state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        watched = grads if trainable is None else _trainable_leaves(grads, trainable)
        metrics = {"loss": loss, "grad_norm": _global_norm(watched), **task_metrics}
        lr = injected_hyperparam(opt_state, "learning_rate")
        if lr is not None:
            metrics["learning_rate"] = jnp.asarray(lr, jnp.float32)
        ema = state.ema_params
        if ema is not None and options.ema_decay is not None:
            ema = ema_update(ema, params, options.ema_decay, state.step + 1)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, task_state=task_state, ema_params=ema), metrics

    return train_step


def make_eval_step(task: Task, param_sharding: Any, batch_sharding: Any, mesh: Mesh, compute_dtype: Any = None) -> Callable[[Any, Any], Any]:
    """The jitted ``eval_step(params, batch) -> clu.metrics.Metric`` (replicated output);
    ``compute_dtype`` casts the floating parameters first, as the train step does."""
    return jax.jit(
        lambda params, batch: task.evaluate(cast_floating(params, compute_dtype), batch),
        in_shardings=(param_sharding, batch_sharding),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )


def _global_norm(tree: Any) -> jax.Array:
    """L2 norm over all leaves of a pytree (float32 accumulation)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _trainable_leaves(grads: Any, trainable: Callable[[tuple], bool]) -> list[jax.Array]:
    """The gradient leaves of the parameters ``trainable(key_path)`` selects."""
    return [g for path, g in jax.tree_util.tree_leaves_with_path(grads) if trainable(path)]


def injected_hyperparam(opt_state: Any, name: str) -> Any:
    """Hyper-parameter ``name`` of the first ``optax.inject_hyperparams`` state found in
    ``opt_state`` (after an update: the value that update used), else ``None``."""
    found: list[Any] = []

    def visit(node: Any) -> None:
        if found:
            return
        hyper = getattr(node, "hyperparams", None)
        if isinstance(hyper, Mapping) and name in hyper:
            found.append(hyper[name])
            return
        if isinstance(node, Mapping):
            children = node.values()
        elif isinstance(node, (tuple, list)):
            children = node
        else:
            children = [getattr(node, f) for f in ("inner_states", "inner_state") if hasattr(node, f)]
        for child in children:
            visit(child)

    visit(opt_state)
    return found[0] if found else None
