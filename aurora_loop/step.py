"""The jit-compiled, sharded train and eval steps, the optimizer and the train state.

One ``jax.jit`` with explicit ``NamedSharding``s over ``Mesh(("data",))`` (pjit semantics):
parameters and optimizer state replicated, the batch split over ``data``. The task's loss is
a mean over the *global* batch, so the gradient XLA computes is already averaged over all
devices (it inserts the all-reduce); no ``pmean`` by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aurora_loop.errors import UsageError
from aurora_loop.parallel import DATA_AXIS, batch_shardings, replicated
from aurora_loop.task import Task


@flax.struct.dataclass
class TrainState:
    """Everything the optimizer loop carries between steps (all device arrays).

    ``step``: int32 scalar, optimizer steps taken. ``rng``: a raw uint32 PRNG key of shape
    (2,); step ``s`` uses ``fold_in(rng, s)`` so randomness depends only on (seed, step) and
    a resumed run draws the same numbers. ``task_state``: a stateful task's own arrays
    (e.g. the replay buffer, :mod:`aurora_loop.replay`), checkpointed with the rest;
    ``None`` for ordinary tasks.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    task_state: Any = None


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak``, then cosine decay to ``peak / 10`` at ``total_steps``.

    (The Aurora paper's pre-training schedule shape.) With fewer total steps than warm-up
    steps, the warm-up is shortened to half the run.
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(int(warmup_steps), total_steps // 2)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=peak / 10,
    )


def is_lora_param(path: tuple) -> bool:
    """Whether a parameter's key path names a LoRA weight (Aurora's ``lora_qkv`` /
    ``lora_proj`` modules hold ``lora_A`` / ``lora_B``): the path contains "lora"."""
    return "lora" in jax.tree_util.keystr(path).lower()


def make_optimizer(
    schedule: optax.Schedule,
    weight_decay: float = 0.0,
    grad_clip_norm: float | None = None,
    trainable: Callable[[tuple], bool] | None = None,
) -> optax.GradientTransformation:
    """AdamW on ``schedule``, optionally after clipping gradients to a global norm.

    ``trainable(key_path) -> bool`` (e.g. :func:`is_lora_param` for ``--lora_only``): only
    those parameters are optimised (clipping sees only their gradients); the others get
    zero updates and keep no Adam state (``optax.multi_transform`` with ``set_to_zero``).
    """
    parts = []
    if grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    parts.append(optax.adamw(schedule, weight_decay=weight_decay))
    optimizer = optax.chain(*parts)
    if trainable is None:
        return optimizer

    def labels(params: Any) -> Any:
        out = jax.tree_util.tree_map_with_path(lambda path, _: "train" if trainable(path) else "frozen", params)
        if "train" not in jax.tree.leaves(out):
            raise UsageError("no parameter is trainable (--lora_only on a model without LoRA weights?); "
                             "use an Aurora model with LoRA (use_lora) or drop --lora_only")
        return out

    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def state_shardings(abstract_state: TrainState, mesh: Mesh, fsdp: bool = False) -> TrainState:
    """Shardings of the train state: every leaf replicated over the mesh, or with ``fsdp``
    every parameter and optimizer-state leaf with ndim >= 1 split over the ``data`` axis on
    its largest dimension divisible by that axis's size (replicated when none is).

    FSDP-style (ZeRO-3): each device holds 1/n of the weights and Adam moments; XLA gathers a
    layer's weights where the computation needs them and reduce-scatters the gradients.
    ``step`` and ``rng`` stay replicated. A task state is split like a batch (its own
    ``partition_specs()``, see :func:`aurora_loop.parallel.batch_shardings`).
    """
    sharding = replicated(mesh)
    task_state = None if abstract_state.task_state is None else batch_shardings(abstract_state.task_state, mesh)
    if not fsdp:
        return jax.tree.map(lambda _: sharding, abstract_state.replace(task_state=None)).replace(task_state=task_state)
    size = mesh.shape[DATA_AXIS]

    def leaf(x: Any) -> NamedSharding:
        shape = tuple(getattr(x, "shape", ()))
        dims = [d for d, n in enumerate(shape) if n % size == 0 and n >= size]
        if not dims:
            return sharding
        d = max(dims, key=lambda d: (shape[d], -d))  # largest; the first of equals
        return NamedSharding(mesh, PartitionSpec(*([None] * d + [DATA_AXIS])))

    return abstract_state.replace(
        step=sharding,
        rng=sharding,
        params=jax.tree.map(leaf, abstract_state.params),
        opt_state=jax.tree.map(leaf, abstract_state.opt_state),
        task_state=task_state,
    )


def make_init_fn(task: Task, optimizer: optax.GradientTransformation, seed: int) -> Callable[[Any], TrainState]:
    """``init(batch) -> TrainState``: parameters from the task, fresh optimizer state, and
    the task's own state when it has one (``task.init_state(batch)``)."""

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
        )

    return init


def make_train_step(
    task: Task,
    optimizer: optax.GradientTransformation,
    state_sharding: TrainState,
    batch_sharding: Any,
    mesh: Mesh,
    trainable: Callable[[tuple], bool] | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted ``train_step(state, batch) -> (state, metrics)``; ``state`` is donated.

    ``metrics`` holds scalars: ``loss``, ``grad_norm`` (global L2 norm of the averaged
    gradient of the ``trainable`` parameters, all by default, before clipping),
    ``learning_rate`` when the optimizer injects it (``optax.inject_hyperparams``), and
    whatever the task's loss reports.

    With ``batch_sharding=None`` the step takes no batch (``train_step(state)``): for a
    stateful task's steps between dataset batches (``task.batch_every > 1``).
    """
    step_fn = _train_step_fn(task, optimizer, trainable)
    metric_sharding = NamedSharding(mesh, PartitionSpec())
    if batch_sharding is None:
        return jax.jit(
            lambda state: step_fn(state, None),
            in_shardings=(state_sharding,),
            out_shardings=(state_sharding, metric_sharding),
            donate_argnums=(0,),
        )
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, metric_sharding),
        donate_argnums=(0,),
    )


def _train_step_fn(task: Task, optimizer: optax.GradientTransformation, trainable: Callable[[tuple], bool] | None = None):
    """The pure step. A task with a state (``TrainState.task_state`` not ``None``) is scored
    by ``task.stateful_loss(params, task_state, batch, rng)``, which also returns the next
    task state; every other task by ``task.loss(params, batch, rng)``."""

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        task_state = state.task_state
        if task_state is None:
            (loss, task_metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(state.params, batch, rng)
        else:
            stateful = jax.value_and_grad(task.stateful_loss, has_aux=True)
            (loss, (task_metrics, task_state)), grads = stateful(state.params, task_state, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        watched = grads if trainable is None else _trainable_leaves(grads, trainable)
        metrics = {"loss": loss, "grad_norm": _global_norm(watched), **task_metrics}
        lr = injected_hyperparam(opt_state, "learning_rate")
        if lr is not None:
            metrics["learning_rate"] = jnp.asarray(lr, jnp.float32)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, task_state=task_state), metrics

    return train_step


def make_eval_step(task: Task, param_sharding: Any, batch_sharding: Any, mesh: Mesh) -> Callable[[Any, Any], Any]:
    """The jitted ``eval_step(params, batch) -> clu.metrics.Metric`` (replicated output)."""
    return jax.jit(
        task.evaluate,
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
