"""Validation metrics as mergeable CLU metrics, and WeatherBench2-style error scores.

CLU's ``Metric`` gives us ``merge`` (over batches; on device, no sync) and ``compute`` (once,
on the host). ``MeanMetrics`` holds named sums and an example count, so a mean over the
global batch inside ``jit`` is a mean over every device and process.
"""

# No ``from __future__ import annotations``: flax.struct / CLU need real annotations here.

import re
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
    def from_rollout(cls, scores: Mapping[str, jax.Array], step_hours: float) -> "MeanMetrics":
        """Scores of a roll-out: ``scores[name]`` of shape (steps, b), one row per step.

        Each name is averaged over the steps (``loss``, ``mae/2t``, ``rmse/z500``: the mean
        over lead times), and ``mae/`` and ``rmse/`` names are also kept per lead time
        (:func:`per_lead`), so ``rmse/z500/12h`` is WeatherBench2's RMSE at that lead.
        """
        means = {k: jnp.mean(v, axis=0) for k, v in scores.items()}
        return cls.from_values({**means, **per_lead(scores, step_hours)})

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


# Scores kept per lead time; the loss is only averaged (its per-step value is a training detail).
LEAD_KINDS = ("mae", "rmse")
_LEAD = re.compile(r"(?P<kind>[^/]+)/(?P<field>[^/]+)/(?P<hours>[^/]+)h")


def lead_label(hours: float) -> str:
    """A lead time (hours) as score names spell it: ``6h``, ``12h``, ``1.5h``."""
    return f"{float(hours):g}h"


def per_lead(scores: Mapping[str, jax.Array], step_hours: float) -> dict[str, jax.Array]:
    """``mae/<field>`` and ``rmse/<field>`` scores of shape (steps, b) -> one (b,) score per
    lead time, ``<kind>/<field>/<lead>h``, step k's lead being (k + 1) * ``step_hours``.

    Values keep their meaning (``rmse/`` ones stay per-example MSE, so :class:`MeanMetrics`
    roots them after averaging over examples: WeatherBench2's RMSE per lead). Other names
    (``loss``) are left out.
    """
    out = {}
    for name, value in scores.items():
        if name.split("/", 1)[0] not in LEAD_KINDS:
            continue
        for k in range(value.shape[0]):
            out[f"{name}/{lead_label((k + 1) * step_hours)}"] = value[k]
    return out


def split_lead_key(key: str) -> tuple[str, str, float] | None:
    """``rmse/z500/12h`` -> ``("rmse", "z500", 12.0)``; ``None`` for a name that is not a
    per-lead score (``rmse/z500``, ``loss``, ``val/rmse/z500/12h``)."""
    match = _LEAD.fullmatch(key)
    if match is None or match["kind"] not in LEAD_KINDS:
        return None
    try:
        hours = float(match["hours"])
    except ValueError:
        return None
    return match["kind"], match["field"], hours
