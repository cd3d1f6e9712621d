"""Validation metrics as mergeable CLU metrics, and WeatherBench2-style error scores.

CLU's ``Metric`` gives us ``merge`` (over batches; on device, no sync) and ``compute`` (once,
on the host). ``MeanMetrics`` holds named sums and an example count, so a mean over the
global batch inside ``jit`` is a mean over every device and process.
"""

# No ``from __future__ import annotations``: flax.struct / CLU need real annotations here.

from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from aurora_loop.model.batch import Batch


@flax.struct.dataclass
class MeanMetrics(clu_metrics.Metric):
    """Means of named per-example values; keys under ``rmse/`` report the root of the mean.

    ``totals[name]`` is the sum over examples, ``count`` the number of examples. A value
    stored under ``rmse/<x>`` is a per-example mean *squared* error, so ``compute`` gives
    sqrt(mean over examples of MSE), WeatherBench2's RMSE.
    """

    totals: dict
    count: jax.Array

    @classmethod
    def from_values(cls, values: Mapping[str, jax.Array]) -> "MeanMetrics":
        """``values[name]``: per-example values of shape (b,) (or scalars, counted once)."""
        values = {k: jnp.atleast_1d(jnp.asarray(v, jnp.float32)) for k, v in values.items()}
        count = max(v.shape[0] for v in values.values())
        return cls(
            totals={k: jnp.sum(v) * (count / v.shape[0]) for k, v in values.items()},
            count=jnp.asarray(count, jnp.float32),
        )

    @classmethod
    def empty(cls) -> "MeanMetrics":
        return cls(totals={}, count=jnp.asarray(0.0, jnp.float32))

    def merge(self, other: "MeanMetrics") -> "MeanMetrics":
        if not self.totals:
            return other
        if not other.totals:
            return self
        return type(self)(
            totals={k: self.totals[k] + other.totals[k] for k in self.totals},
            count=self.count + other.count,
        )

    def reduce(self) -> "MeanMetrics":
        return type(self)(totals={k: jnp.sum(v, axis=0) for k, v in self.totals.items()}, count=jnp.sum(self.count))

    def compute(self) -> dict:
        totals, count = jax.device_get((self.totals, self.count))
        out = {}
        for name, total in totals.items():
            mean = float(total) / max(float(count), 1.0)
            out[name] = float(np.sqrt(mean)) if name.startswith("rmse/") else mean
        return out


def latitude_weights(lat: jax.Array) -> jax.Array:
    """WeatherBench2's area weights for a grid of latitudes (degrees), normalised to mean 1.

    Each row is weighted by the area of its latitude band between the midpoints to its
    neighbours (the poles clip the outer bands), which for a regular grid is proportional
    to cos(lat) away from the poles. Shape (h,).
    """
    rad = jnp.deg2rad(jnp.asarray(lat, jnp.float32))
    # Band edges: midpoints between rows; the outer rows get half a row spacing beyond them,
    # clipped at the poles, so a cropped grid is weighted like the same rows of a global one.
    half = (rad[1] - rad[0]) / 2 if rad.shape[0] > 1 else jnp.asarray(jnp.pi / 2)
    edges = jnp.concatenate([rad[:1] - half, (rad[:-1] + rad[1:]) / 2, rad[-1:] + half])
    edges = jnp.clip(edges, -jnp.pi / 2, jnp.pi / 2)
    weights = jnp.abs(jnp.sin(edges[1:]) - jnp.sin(edges[:-1]))
    return weights / jnp.mean(weights)


def field_names(batch: Batch) -> list[str]:
    """Score names for a batch: surface variables by name, atmospheric ones as ``<var><level>``."""
    names = list(batch.surf_vars)
    for var in batch.atmos_vars:
        names += [f"{var}{_level_label(level)}" for level in batch.metadata.atmos_levels]
    return names


def _level_label(level) -> str:
    return str(int(level)) if float(level).is_integer() else str(level)


def per_field(batch: Batch) -> dict[str, jax.Array]:
    """Split a batch into fields of shape (b, t, h, w), keyed as in :func:`field_names`."""
    out = dict(batch.surf_vars)
    for var, value in batch.atmos_vars.items():
        for i, level in enumerate(batch.metadata.atmos_levels):
            out[f"{var}{_level_label(level)}"] = value[:, :, i]
    return out


def weather_errors(prediction: Batch, target: Batch) -> dict[str, jax.Array]:
    """Latitude-weighted errors per example, in physical units, per variable and level.

    ``prediction`` and ``target``: Batches of the same variables, shapes (b, t, [c,] h, w).
    Returns ``mae/<name>`` (mean absolute error) and ``rmse/<name>`` (mean squared error, to
    be square-rooted after averaging, see :class:`MeanMetrics`), each of shape (b,).
    """
    weights = latitude_weights(target.metadata.lat)[:, None]
    pred_fields, true_fields = per_field(prediction), per_field(target)
    out = {}
    for name, truth in true_fields.items():
        error = pred_fields[name].astype(jnp.float32) - truth.astype(jnp.float32)
        axes = tuple(range(1, error.ndim))
        out[f"mae/{name}"] = jnp.mean(jnp.abs(error) * weights, axis=axes)
        out[f"rmse/{name}"] = jnp.mean(jnp.square(error) * weights, axis=axes)
    return out
