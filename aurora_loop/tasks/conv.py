"""``conv``: a small convolutional forecaster, the fast learning baseline.

It sees the same weather batches as Aurora and predicts the next state as the newest input
plus a learned tendency. Each field is standardised by its own spatial mean and spread in
the newest input (per example), so the network needs no dataset statistics; the loss is the
mean absolute error in those standardised units. Longitude is periodic (circular padding);
latitude is padded with edge values.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aurora_loop.model.batch import Batch, Sample
from aurora_loop.task import register_task
from aurora_loop.weather.metrics import MeanMetrics, weather_errors
from aurora_loop.weather.replay import ReplayConfig, ReplayTraining, replay_config
from aurora_loop.weather.rollout import rollout_loss, rollout_scan


def _stack_fields(batch: Batch) -> jax.Array:
    """All dynamic fields as channels: (b, t, h, w, C), surface first then atmos by level."""
    # Sorted names: jit flattens dicts in sorted key order, so insertion order would differ
    # between jitted and eager calls and scramble the channels of a trained model.
    parts = [batch.surf_vars[k][..., None] for k in sorted(batch.surf_vars)]
    parts += [jnp.moveaxis(batch.atmos_vars[k], 2, -1) for k in sorted(batch.atmos_vars)]
    return jnp.concatenate(parts, axis=-1)


def _unstack_fields(channels: jax.Array, like: Batch) -> Batch:
    """Inverse of :func:`_stack_fields` for a (b, h, w, C) array -> Batch with t = 1."""
    surf, atmos, i = {}, {}, 0
    for name in sorted(like.surf_vars):
        surf[name] = channels[:, None, :, :, i]
        i += 1
    levels = len(like.metadata.atmos_levels)
    for name in sorted(like.atmos_vars):
        atmos[name] = jnp.moveaxis(channels[:, None, :, :, i : i + levels], -1, 2)
        i += levels
    return like.replace(surf_vars=surf, atmos_vars=atmos)


class ConvNet(nn.Module):
    """Residual conv stack: (b, h, w, C_in) -> (b, h, w, C_out)."""

    features: int
    out_channels: int
    depth: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def conv(y: jax.Array, features: int) -> jax.Array:
            y = jnp.pad(y, ((0, 0), (0, 0), (1, 1), (0, 0)), mode="wrap")  # periodic longitude
            y = jnp.pad(y, ((0, 0), (1, 1), (0, 0), (0, 0)), mode="edge")
            return nn.Conv(features, (3, 3), padding="VALID")(y)

        h = nn.gelu(conv(x, self.features))
        for _ in range(self.depth - 1):
            h = h + nn.gelu(conv(h, self.features))
        return nn.Dense(self.out_channels, kernel_init=nn.initializers.zeros)(h)


class ConvTask(ReplayTraining):
    """The ``conv`` baseline implementing the Task protocol on ``Sample`` batches.

    ``rollout_mode``: ``full`` or ``pushforward`` (:func:`aurora_loop.weather.rollout.rollout_loss`),
    or ``replay`` with ``replay`` settings (:mod:`aurora_loop.weather.replay`).
    """

    name = "conv"

    def __init__(self, features: int = 32, depth: int = 3, rollout_average: bool = True, rollout_mode: str = "full",
                 replay: ReplayConfig | None = None) -> None:
        self.features = features
        self.depth = depth
        self.rollout_average = rollout_average
        self._set_rollout_mode(rollout_mode, replay)

    def _net(self, channels: int) -> ConvNet:
        return ConvNet(self.features, channels, self.depth)

    @staticmethod
    def _standardise(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(history (b,h,w,t*C) standardised, newest (b,h,w,C), mean, scale), stats over (h, w)."""
        fields = _stack_fields(batch).astype(jnp.float32)  # (b, t, h, w, C)
        newest = fields[:, -1]
        mean = jnp.mean(newest, axis=(1, 2), keepdims=True)
        scale = jnp.std(newest, axis=(1, 2), keepdims=True) + 1e-6
        history = (fields - mean[:, None]) / scale[:, None]
        b, t, h, w, c = history.shape
        history = jnp.moveaxis(history, 1, 3).reshape(b, h, w, t * c)
        return history, newest, mean, scale

    def _static(self, batch: Batch) -> jax.Array | None:
        if not batch.static_vars:
            return None
        static = jnp.stack([batch.static_vars[k].astype(jnp.float32) for k in sorted(batch.static_vars)], axis=-1)
        static = (static - static.mean((0, 1))) / (static.std((0, 1)) + 1e-6)
        return jnp.broadcast_to(static, (batch.batch_size,) + static.shape)

    def _predict_fn(self, params: Any):
        def predict(inputs: Batch, step: jax.Array) -> Batch:
            history, newest, mean, scale = self._standardise(inputs)
            static = self._static(inputs)
            features = history if static is None else jnp.concatenate([history, static], axis=-1)
            tendency = self._net(newest.shape[-1]).apply(params, features)
            return _unstack_fields(newest + tendency * scale, inputs)

        return predict

    def init(self, rng: jax.Array, example_batch: Sample) -> Any:
        history, newest, _, _ = self._standardise(example_batch.inputs)
        static = self._static(example_batch.inputs)
        features = history if static is None else jnp.concatenate([history, static], axis=-1)
        return self._net(newest.shape[-1]).init(rng, features)

    @staticmethod
    def _step_loss(prediction: Batch, target: Batch) -> jax.Array:
        """MAE in units of each field's spatial spread in the target (a scalar)."""
        truth = _stack_fields(target).astype(jnp.float32)
        scale = jnp.std(truth, axis=(2, 3), keepdims=True) + 1e-6
        return jnp.mean(jnp.abs(_stack_fields(prediction) - truth) / scale)

    def loss(self, params: Any, batch: Sample, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        mode = self._stateless_mode
        loss, per_step = rollout_loss(self._predict_fn(params), self._step_loss, batch, average=self.rollout_average, mode=mode)
        return loss, {"rollout_loss_last": per_step[-1]}

    def predict(self, params: Any, sample: Sample) -> Batch:
        """The forecast for every target step of ``sample`` (the optional Task ``predict``).

        Rolls the model out from ``sample.inputs`` over ``sample.targets.num_steps`` steps.
        Returns a Batch shaped like ``sample.targets``: surface fields (b, steps, h, w),
        atmospheric ones (b, steps, c, h, w), the targets' metadata and static fields.
        """

        def per_step(prediction: Batch, target: Batch) -> tuple[dict, dict]:
            return dict(prediction.surf_vars), dict(prediction.atmos_vars)

        surf, atmos = rollout_scan(self._predict_fn(params), sample, per_step)  # (steps, b, 1, ...)
        return sample.targets.replace(
            surf_vars={k: jnp.moveaxis(v[:, :, 0], 0, 1) for k, v in surf.items()},
            atmos_vars={k: jnp.moveaxis(v[:, :, 0], 0, 1) for k, v in atmos.items()},
        )

    def evaluate(self, params: Any, batch: Sample) -> MeanMetrics:
        def per_step(prediction: Batch, target: Batch) -> dict[str, jax.Array]:
            truth = _stack_fields(target).astype(jnp.float32)
            scale = jnp.std(truth, axis=(2, 3), keepdims=True) + 1e-6
            loss = jnp.mean(jnp.abs(_stack_fields(prediction) - truth) / scale, axis=(1, 2, 3, 4))
            return {"loss": loss, **weather_errors(prediction, target)}

        scores = rollout_scan(self._predict_fn(params), batch, per_step)  # each (steps, b)
        return MeanMetrics.from_values({k: jnp.mean(v, axis=0) for k, v in scores.items()})


@register_task("conv")
def make_conv_task(config: Any) -> ConvTask:
    from aurora_loop.errors import UsageError

    if getattr(config, "lead_times", None):
        raise UsageError("--lead_times needs a model with per-sample lead times (v1p5, v1p5_tiny, ...); conv has a fixed step")
    if int(getattr(config, "ensemble_members", 1) or 1) > 1:
        raise UsageError("--ensemble_members needs an ensemble model (v1p5_ensemble, ...); conv is deterministic")
    return ConvTask(rollout_average=getattr(config, "average_rollout_loss", True), rollout_mode=getattr(config, "rollout_mode", "full"),
                    replay=replay_config(config))

