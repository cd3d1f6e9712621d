"""The Aurora paper's training loss: a weighted mean absolute error on normalised variables.

Bodnar et al. (Nature 2025), supplementary "Training objective", for one prediction:

    L = gamma / (V_S + V_A) * [ alpha * sum_k w_k^S * mean_(i,j) |s_hat - s|
                              + beta  * sum_k w_k^A * mean_(c,i,j) |a_hat - a| ]

over the V_S surface and V_A atmospheric variables, with both fields normalised by the
model's statistics, ``alpha = 1/4``, ``beta = 1`` and ``gamma`` a per-dataset weight.

Defaults are the paper's pre-training values as we read them: surface 2t 3.0, 10u 0.77,
10v 0.66, msl 1.5; atmospheric z 2.8, q 0.78, t 1.7, u 0.87, v 0.6 (one weight per
variable, shared by all its pressure levels, and the atmospheric term a mean over levels);
variables the paper does not list weigh 1. The paper's dataset weights were, we believe,
2.0 for ERA5 and 1.5 for GFS-T0 analyses in pre-training (1 for the others); ``gamma``
defaults to 1 because with a single dataset it only rescales the loss (AdamW is almost
invariant to that). The paper's loss has no latitude weighting; ``latitude_weighted``
adds WeatherBench2's area weights (normalised to mean 1) to the grid mean as an option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from aurora_loop.model.batch import Batch
from aurora_loop.weather.crps import fair_crps
from aurora_loop.weather.metrics import latitude_weights

PAPER_SURFACE_WEIGHTS = {"2t": 3.0, "10u": 0.77, "10v": 0.66, "msl": 1.5}
PAPER_ATMOS_WEIGHTS = {"z": 2.8, "q": 0.78, "t": 1.7, "u": 0.87, "v": 0.6}
PAPER_ALPHA, PAPER_BETA = 0.25, 1.0


@dataclasses.dataclass(frozen=True)
class WeightedMAE:
    """The paper's loss with its knobs; ``loss(prediction, target)`` -> per-example (b,).

    ``surf_weights`` / ``atmos_weights``: variable -> weight, on top of the paper's (a
    variable in neither weighs 1). ``alpha`` / ``beta``: the surface / atmospheric factors.
    ``gamma``: the dataset weight. ``latitude_weighted``: weight each grid row by its area.
    """

    surf_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    atmos_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    alpha: float = PAPER_ALPHA
    beta: float = PAPER_BETA
    gamma: float = 1.0
    latitude_weighted: bool = False

    def surface_weight(self, name: str) -> float:
        return float(self.surf_weights.get(name, PAPER_SURFACE_WEIGHTS.get(name, 1.0)))

    def atmos_weight(self, name: str) -> float:
        return float(self.atmos_weights.get(name, PAPER_ATMOS_WEIGHTS.get(name, 1.0)))

    def __call__(self, prediction: Batch, target: Batch, surf_stats: Mapping[str, tuple[float, float]] | None = None) -> jax.Array:
        """Per-example loss, shape (b,).

        ``prediction`` and ``target``: Batches with the same variables, surface fields
        (b, t, h, w) and atmospheric ones (b, t, c, h, w), in physical units; both are
        normalised here with the model's statistics (``surf_stats`` overrides some).
        """
        pred = prediction.normalise(surf_stats)
        true = target.normalise(surf_stats)
        rows = latitude_weights(target.metadata.lat)[:, None] if self.latitude_weighted else None  # (h, 1)

        def mean_error(p: jax.Array, t: jax.Array) -> jax.Array:
            err = jnp.abs(p.astype(jnp.float32) - t.astype(jnp.float32))
            if rows is not None:
                err = err * rows
            return jnp.mean(err, axis=tuple(range(1, err.ndim)))

        terms = [self.alpha * self.surface_weight(k) * mean_error(pred.surf_vars[k], v) for k, v in true.surf_vars.items()]
        terms += [self.beta * self.atmos_weight(k) * mean_error(pred.atmos_vars[k], v) for k, v in true.atmos_vars.items()]
        if not terms:
            raise ValueError("the batch has no surface or atmospheric variables to score")
        return self.gamma * sum(terms) / len(terms)


@dataclasses.dataclass(frozen=True)
class WeightedCRPS(WeightedMAE):
    """The paper's weighting with the fair CRPS over ``members`` in place of the absolute
    error: the training loss of Aurora 1.5's ensemble. A degenerate ensemble (all members
    equal) scores exactly :class:`WeightedMAE`.

    ``loss(prediction, target)`` -> per-example (b,): ``prediction`` holds the members of
    every example next to each other, fields (b * members, t, [c,] h, w) with example i's
    members at rows ``i * members .. (i + 1) * members - 1``; ``target`` the same rows
    (each example's target repeated) or one row per example, (b, ...).
    """

    members: int = 2

    def __call__(self, prediction: Batch, target: Batch, surf_stats: Mapping[str, tuple[float, float]] | None = None) -> jax.Array:
        m = self.members
        pred = prediction.normalise(surf_stats)
        true = target.normalise(surf_stats)
        rows = latitude_weights(target.metadata.lat)[:, None] if self.latitude_weighted else None  # (h, 1)

        def score(p: jax.Array, t: jax.Array) -> jax.Array:
            ensemble = p.reshape(-1, m, *p.shape[1:]).swapaxes(0, 1)  # (M, b, ...)
            if t.shape[0] != ensemble.shape[1]:
                t = t[::m]
            return fair_crps(ensemble.astype(jnp.float32), t.astype(jnp.float32), rows)

        terms = [self.alpha * self.surface_weight(k) * score(pred.surf_vars[k], v) for k, v in true.surf_vars.items()]
        terms += [self.beta * self.atmos_weight(k) * score(pred.atmos_vars[k], v) for k, v in true.atmos_vars.items()]
        if not terms:
            raise ValueError("the batch has no surface or atmospheric variables to score")
        return self.gamma * sum(terms) / len(terms)
