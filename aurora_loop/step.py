"""The jit-compiled, sharded train and eval steps, the optimizer and the train state.

One ``jax.jit`` with explicit ``NamedSharding``s over ``Mesh(("data",))`` (pjit semantics):
parameters and optimizer state replicated, the batch split over ``data``. The task's loss is
a mean over the *global* batch, so the gradient XLA computes is already averaged over all
devices (it inserts the all-reduce); no ``pmean`` by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aurora_loop.parallel import replicated
from aurora_loop.task import Task


@flax.struct.dataclass
class TrainState:
    """Everything the optimizer loop carries between steps (all device arrays).

    ``step``: int32 scalar, optimizer steps taken. ``rng``: a raw uint32 PRNG key of shape
    (2,); step ``s`` uses ``fold_in(rng, s)`` so randomness depends only on (seed, step) and
    a resumed run draws the same numbers.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


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


def make_optimizer(
    schedule: optax.Schedule, weight_decay: float = 0.0, grad_clip_norm: float | None = None
) -> optax.GradientTransformation:
    """AdamW on ``schedule``, optionally after clipping gradients to a global norm."""
    parts = []
    if grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    parts.append(optax.adamw(schedule, weight_decay=weight_decay))
    return optax.chain(*parts)


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
    """Replicate every leaf of the train state over the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda _: sharding, abstract_state)


def make_init_fn(task: Task, optimizer: optax.GradientTransformation, seed: int) -> Callable[[Any], TrainState]:
    """``init(batch) -> TrainState``: parameters from the task, fresh optimizer state."""

    def init(batch: Any) -> TrainState:
        rng = jax.random.PRNGKey(seed)
        init_rng, step_rng = jax.random.split(rng)
        params = task.init(init_rng, batch)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=step_rng,
        )

    return init


def make_train_step(
    task: Task,
    optimizer: optax.GradientTransformation,
    state_sharding: TrainState,
    batch_sharding: Any,
    mesh: Mesh,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted ``train_step(state, batch) -> (state, metrics)``; ``state`` is donated.

    ``metrics`` holds scalars: ``loss``, ``grad_norm`` (global L2 norm of the averaged
    gradient, before clipping) and whatever the task's loss reports.
    """

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, task_metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(state.params, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": _global_norm(grads), **task_metrics}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=(0,),
    )


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
