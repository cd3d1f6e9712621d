"""Autoregressive roll-outs for training and evaluation.

A one-step predictor maps the history to the next state; rolling it out feeds each
prediction back as the newest history step. ``lax.scan`` keeps the compiled program the
size of one step whatever ``rollout_steps`` is.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from aurora_loop.model.batch import Batch, Sample

# predict(inputs, step) -> prediction. ``inputs`` has t = history steps; ``step`` is the
# 0-based roll-out step as a traced int32 scalar; the prediction is a Batch with t = 1 (its
# metadata is not read: the roll-out knows the valid time of every step from the targets).
Predictor = Callable[[Batch, jax.Array], Batch]
# step_loss(prediction, target) -> scalar, both Batches with t = 1.
StepLoss = Callable[[Batch, Batch], jax.Array]
# feed_back(prediction) -> what becomes the next input (e.g. Aurora 1.5's input clipping);
# the loss still sees the prediction itself.
FeedBack = Callable[[Batch], Batch]


def advance_history(inputs: Batch, prediction: Batch, time: jax.Array) -> Batch:
    """Drop the oldest input step and append ``prediction`` (t = 1), valid at ``time``
    (hours since 1970, shape (b,)), as the newest."""
    return inputs.replace(
        surf_vars={k: jnp.concatenate([v[:, 1:], prediction.surf_vars[k].astype(v.dtype)], axis=1) for k, v in inputs.surf_vars.items()},
        atmos_vars={k: jnp.concatenate([v[:, 1:], prediction.atmos_vars[k].astype(v.dtype)], axis=1) for k, v in inputs.atmos_vars.items()},
        metadata=inputs.metadata.replace(time=time),
    )


ROLLOUT_MODES = ("full", "pushforward")


def rollout_scan(
    predict: Predictor,
    sample: Sample,
    per_step: Callable[[Batch, Batch], jax.Array | dict],
    remat: bool = False,
    use_scan: bool | None = None,
    feed_back: FeedBack | None = None,
):
    """Roll ``predict`` out over ``sample.targets.num_steps`` steps.

    Returns ``per_step(prediction, target)`` stacked over steps (leading axis = step).
    With ``remat`` each step's activations are recomputed in the backward pass.
    ``feed_back`` transforms a prediction before it becomes the next input.

    Target times: step k is ``k`` model steps after the first target, except that with
    ``sample.lead_hours`` (sampled lead times) the last step is that many hours after the
    step before it.

    ``use_scan``: ``lax.scan`` over steps (compiled size independent of the step count), or
    a Python loop that unrolls them. ``None`` picks the loop on CPU, where XLA runs
    convolutions inside a while-loop body about 10x slower (measured: the conv task's
    gradient took 300 ms with scan and 30 ms unrolled), and scan elsewhere.
    """
    return _rollout(predict, sample, per_step, remat, use_scan, feed_back=feed_back)[1]


def _step_hours(sample: Sample) -> jax.Array:
    """The model step in hours (b,): between the newest input and the first target, unless
    that is the (sampled) lead of a one-step sample, whose step is then moot."""
    return jnp.asarray(sample.targets.metadata.time) - jnp.asarray(sample.inputs.metadata.time)


def _rollout(predict: Predictor, sample: Sample, per_step, remat: bool, use_scan: bool | None, first_step: int = 0,
             feed_back: FeedBack | None = None):
    """:func:`rollout_scan` that also returns the final history (the carry); the steps are
    numbered from ``first_step`` (``predict`` sees that index; times still start at the targets')."""
    if use_scan is None:
        use_scan = jax.default_backend() != "cpu"
    targets = sample.targets
    first_time = jnp.asarray(targets.metadata.time)
    step_hours = _step_hours(sample)
    last_step = first_step + targets.num_steps - 1
    lead_hours = None if sample.lead_hours is None or targets.num_steps < 2 else jnp.asarray(sample.lead_hours)
    # Only the per-step fields are scanned over; grids and static fields stay whole.
    fields = (
        {k: jnp.moveaxis(v, 1, 0)[:, :, None] for k, v in targets.surf_vars.items()},
        {k: jnp.moveaxis(v, 1, 0)[:, :, None] for k, v in targets.atmos_vars.items()},
    )

    def body(inputs: Batch, x):
        step, (surf, atmos) = x
        time = first_time + (step - first_step).astype(first_time.dtype) * step_hours
        if lead_hours is not None:
            last_time = first_time + (targets.num_steps - 2) * step_hours + lead_hours.astype(first_time.dtype)
            time = jnp.where(step == last_step, last_time, time)
        target = targets.replace(surf_vars=surf, atmos_vars=atmos, metadata=targets.metadata.replace(time=time))
        prediction = predict(inputs, step)
        fed = prediction if feed_back is None else feed_back(prediction)
        return advance_history(inputs, fed, target.metadata.time), per_step(prediction, target)

    if remat:
        body = _checkpointed_step(body)
    steps = jnp.arange(first_step, first_step + targets.num_steps, dtype=jnp.int32)
    if not use_scan:
        carry, outs = sample.inputs, []
        for k in range(targets.num_steps):
            carry, out = body(carry, jax.tree.map(lambda x, k=k: x[k], (steps, fields)))
            outs.append(out)
        return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return jax.lax.scan(body, sample.inputs, (steps, fields))


def _checkpointed_step(body: Callable) -> Callable:
    """``body(carry, (step, fields))`` checkpointed: the forward pass keeps only the step's
    input, and the backward pass recomputes the step when its cotangent arrives
    (:func:`aurora_loop.model.swin.remat_after_cotangent`). ``jax.checkpoint`` would do the
    same on paper, but XLA:CPU runs its recomputations early, so every step's activations
    were alive at once: a 4-step roll-out of the 1.3 B model at 0.25° needed 102 GiB of
    temporaries. What ``body`` closes over (the model's parameters) becomes an explicit
    argument (``jax.closure_convert``), so that it gets its gradient."""
    from aurora_loop.model.swin import remat_after_cotangent

    def run(carry: Batch, xs: tuple) -> tuple:
        step, fields = xs
        converted, consts = jax.closure_convert(lambda c, f, s: body(c, (s, f)), carry, fields, step)

        def fn(consts: list, x: tuple, s: jax.Array) -> tuple:
            return converted(x[0], x[1], s, *consts)

        return remat_after_cotangent(fn, tie_params=False)(consts, (carry, fields), step)

    return run


def rollout_loss(
    predict: Predictor,
    step_loss: StepLoss,
    sample: Sample,
    average: bool = True,
    remat: bool = False,
    use_scan: bool | None = None,
    mode: str = "full",
    feed_back: FeedBack | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The roll-out training loss: (loss, per-step losses of shape (rollout_steps,)).

    ``mode="full"``: ``loss`` is the mean over steps when ``average``
    (``average_rollout_loss``), else the last step's loss; gradients flow through every step.

    ``mode="pushforward"`` (the Aurora paper's roll-out fine-tuning trick): the first
    ``rollout_steps - 1`` steps run without gradients (their predictions are fed back under
    ``lax.stop_gradient``) and ``loss`` is the last step's loss only, whatever ``average``;
    memory and backward cost are those of one step. The earlier steps' losses are still
    returned (detached) for logging. With one roll-out step both modes agree when
    ``average`` is off (and, with one step, also when it is on).
    """
    if mode == "full":
        losses = rollout_scan(predict, sample, step_loss, remat=remat, use_scan=use_scan, feed_back=feed_back)
        return (jnp.mean(losses) if average else losses[-1]), losses
    if mode != "pushforward":
        raise ValueError(f"rollout mode must be one of {ROLLOUT_MODES}, got {mode!r}")
    steps = sample.targets.num_steps
    inputs, head_losses = sample.inputs, None
    if steps > 1:
        head = Sample(sample.inputs, sample.targets.time_slice(0, steps - 1))
        inputs, head_losses = jax.lax.stop_gradient(_rollout(predict, head, step_loss, remat, use_scan, feed_back=feed_back))
    first_time = jnp.asarray(sample.targets.metadata.time)
    step_hours = _step_hours(sample)
    last_time = first_time + (steps - 1) * step_hours
    if sample.lead_hours is not None and steps > 1:
        last_time = first_time + (steps - 2) * step_hours + jnp.asarray(sample.lead_hours).astype(first_time.dtype)
    last_target = sample.targets.time_slice(steps - 1, steps)
    last_target = last_target.replace(metadata=last_target.metadata.replace(time=last_time))
    last = _rollout(predict, Sample(inputs, last_target), step_loss, remat, use_scan, first_step=steps - 1)[1]
    losses = last if head_losses is None else jnp.concatenate([head_losses, last])
    return losses[-1], losses
