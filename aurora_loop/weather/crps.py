"""Ensemble scores: the fair CRPS (a training loss and a validation score) and spread/skill.

Pure ``jax.numpy``: every function is jittable and works with the batch axis sharded, since it
only uses elementwise ops, a sort and reductions along the member axis (never sharded), and
a weighted mean over the field dims of each example.

Conventions (shared by every function here):

- ``ensemble``: (M, B, *field), M members first; ``target``: (B, *field). Values in the
  field's physical units (K, Pa, m^2 s^-2, ...); scores come out in those units (CRPS), or
  their square (variances, squared errors). Computation is in float32 at least.
- ``weights``: optional, broadcastable to ``field`` by numpy's trailing-dims rules, for
  example latitude weights ``latitude_weights(lat)[:, None]`` of shape (H, 1) for a field
  (H, W), (C, H, W) or (T, H, W). The spatial mean is ``sum(w * f) / sum(w)`` over the field
  (``w`` broadcast to it), so the weights are normalised to average 1 over the grid; with
  weights that already average 1 (:func:`aurora_loop.weather.metrics.latitude_weights`) this is
  exactly ``mean(w * f)``, :func:`aurora_loop.weather.metrics.weather_errors`' weighting.
- Every score is per example: shape (B,), to be averaged over examples by
  :class:`aurora_loop.weather.metrics.MeanMetrics`.

Everything is computed on the errors ``x_m - y``: CRPS, variance and the pairwise
differences are shift invariant, and errors are small numbers where the raw values are not
(geopotential ~5e4), so float32 keeps its precision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from aurora_loop.weather.metrics import _level_label, latitude_weights

Array = Any  # jax or numpy array

SPREAD_VAR = "spread_var"
MSE_OF_MEAN = "mse_of_mean"
SPREAD_SKILL = "spread_skill"


def _members(ensemble: Array) -> int:
    """The ensemble size M (a static Python int); at least 2 or ValueError."""
    if ensemble.ndim < 2:
        raise ValueError(f"an ensemble needs shape (members, batch, *field), got shape {ensemble.shape}")
    m = ensemble.shape[0]
    if m < 2:
        raise ValueError(
            f"ensemble scores need at least 2 members, got {m} (ensemble of shape {ensemble.shape}); "
            "the fair CRPS and the unbiased ensemble variance divide by M - 1"
        )
    return m


def _errors(ensemble: Array, target: Array) -> Array:
    """``ensemble - target`` of shape (M, B, *field), in float32 (float64 stays float64)."""
    ensemble, target = jnp.asarray(ensemble), jnp.asarray(target)
    _members(ensemble)
    if ensemble.shape[1:] != target.shape:
        raise ValueError(
            f"ensemble of shape {ensemble.shape} is (members, batch, *field) but the target has "
            f"shape {target.shape}, not {ensemble.shape[1:]}"
        )
    dtype = jnp.promote_types(jnp.result_type(ensemble, target), jnp.float32)
    return ensemble.astype(dtype) - target.astype(dtype)[None]


def spatial_mean(values: Array, weights: Array | None = None) -> Array:
    """Weighted mean over all but the first axis: (B, *field) -> (B,).

    ``weights`` broadcastable to ``field``; normalised here, so only their ratios matter.
    """
    axes = tuple(range(1, values.ndim))
    if weights is None:
        return jnp.mean(values, axis=axes)
    weights = jnp.asarray(weights, values.dtype)
    if weights.ndim > values.ndim - 1:
        raise ValueError(f"weights of shape {weights.shape} have more dims than the field {values.shape[1:]}")
    full = jnp.broadcast_to(weights, values.shape[1:])  # raises on a shape that does not fit
    return jnp.sum(values * weights, axis=axes) / jnp.sum(full)


def pairwise_abs_sum(ensemble: Array) -> Array:
    """``sum_{m, m'} |x_m - x_m'|`` over all ordered member pairs: (M, ...) -> (...).

    O(M log M) with a sort along the member axis instead of an M x M broadcast, so memory
    stays O(M * field). For the sorted members x_(0) <= ... <= x_(M-1) (0-based),
    x_(i) is the larger of a pair with the i members below it and the smaller with the
    M - 1 - i above, so ``sum_{i<j} (x_(j) - x_(i)) = sum_i (2i - M + 1) x_(i)``; the sum
    over ordered pairs is twice that.
    """
    m = ensemble.shape[0]
    coeff = 2.0 * jnp.arange(m, dtype=ensemble.dtype) - (m - 1)
    ordered = jnp.sort(ensemble, axis=0)
    return 2.0 * jnp.tensordot(coeff, ordered, axes=(0, 0))


def _crps_terms(ensemble: Array, target: Array) -> tuple[Array, Array, int]:
    """Per grid point: ``mean_m |x_m - y|`` and ``sum_{m,m'} |x_m - x_m'|``, both (B, *field)."""
    errors = _errors(ensemble, target)
    return jnp.mean(jnp.abs(errors), axis=0), pairwise_abs_sum(errors), errors.shape[0]


def fair_crps(ensemble: Array, target: Array, weights: Array | None = None) -> Array:
    """The fair (unbiased) CRPS of an M-member ensemble, per example, in the field's units.

    ``ensemble``: (M, B, *field), M >= 2; ``target``: (B, *field); ``weights``: broadcastable
    to ``field`` (see the module docstring). Returns (B,): the weighted spatial mean of

        mean_m |x_m - y|  -  1 / (2 M (M - 1)) * sum_{m, m'} |x_m - x_m'|

    the estimator of Ferro (2014) and Zamo & Naveau (2018) (their CRPS_fair), used as the
    training loss of ensemble ML weather models (AIFS-CRPS, Aurora 1.5's ensemble). Its
    expectation over the M members drawn from a forecast distribution F is exactly
    CRPS(F, y), for any M >= 2, so it does not reward an under-dispersed small ensemble.
    Raises ValueError for M < 2.
    """
    skill, pairs, m = _crps_terms(ensemble, target)
    return spatial_mean(skill - pairs / (2.0 * m * (m - 1)), weights)


def crps_ensemble(ensemble: Array, target: Array, weights: Array | None = None) -> Array:
    """The plain ("energy form") ensemble CRPS, the CRPS of the ensemble's empirical
    distribution, per example: (M, B, *field), (B, *field) -> (B,).

        mean_m |x_m - y|  -  1 / (2 M^2) * sum_{m, m'} |x_m - x_m'|

    For reference: as an estimate of the forecast distribution's CRPS it is biased high, by
    E|X - X'| / (2 M) (for a Gaussian of std sigma: sigma / (M sqrt(pi))). Raises ValueError
    for M < 2 (like :func:`fair_crps`, though the formula itself would accept M = 1).
    """
    skill, pairs, m = _crps_terms(ensemble, target)
    return spatial_mean(skill - pairs / (2.0 * m * m), weights)


def spread_skill(ensemble: Array, target: Array, weights: Array | None = None) -> tuple[Array, Array]:
    """Per example, the spread and skill terms of the spread/skill ratio: two (B,) arrays.

    ``ensemble``: (M, B, *field), M >= 2; ``target``: (B, *field); ``weights`` as in
    :func:`fair_crps`. Returns

    - ``spread_var``: weighted spatial mean of the unbiased ensemble variance
      ``sum_m (x_m - xbar)^2 / (M - 1)`` (units squared);
    - ``mse_of_mean``: weighted spatial mean of ``(xbar - y)^2``, the squared error of the
      ensemble mean (units squared).

    Average both over examples, then take :func:`spread_skill_ratio` (or
    :func:`spread_skill_ratios` on ``MeanMetrics.compute()``'s dict).
    """
    errors = _errors(ensemble, target)
    m = errors.shape[0]
    mean_error = jnp.mean(errors, axis=0)
    variance = jnp.sum(jnp.square(errors - mean_error[None]), axis=0) / (m - 1)
    return spatial_mean(variance, weights), spatial_mean(jnp.square(mean_error), weights)


def spread_skill_ratio(spread_var: float, mse_of_mean: float, members: int) -> float:
    """``sqrt((M + 1) / M) * sqrt(mean spread_var) / sqrt(mean mse_of_mean)``; 1 when calibrated.

    Arguments are the means over examples (and lead times, as wanted) of
    :func:`spread_skill`'s two terms. For a perfectly calibrated ensemble (target and
    members exchangeable draws) E[(xbar - y)^2] = (M + 1) / M * E[s^2], with s^2 the
    unbiased (ddof = 1) ensemble variance (Fortin et al. 2014, "Why should ensemble spread
    match the RMSE of the ensemble mean?", J. Hydrometeor.), hence the factor: the ratio is
    1 for a calibrated ensemble of any size, below 1 when under-dispersive.

    WeatherBench2 reports the uncorrected ``sqrt(mean var / mean mse)`` (same ddof = 1
    variance, the spatially weighted mean per time, then the mean over times), which tends to
    sqrt(M / (M + 1)) for a calibrated M-member ensemble; multiply ours by sqrt(M / (M + 1))
    to compare. (WeatherBench-X's ``UnbiasedSpreadSkillRatio`` instead debiases the MSE,
    mse - var / M, which has the same expectation as our correction.)
    ``nan`` when both terms are 0; ``inf`` when only the MSE is.
    """
    if members < 2:
        raise ValueError(f"a spread/skill ratio needs at least 2 members, got {members}")
    spread_var, mse_of_mean = float(spread_var), float(mse_of_mean)
    if mse_of_mean <= 0.0:
        return math.nan if spread_var <= 0.0 else math.inf
    return math.sqrt((members + 1) / members * spread_var / mse_of_mean)


def spread_skill_ratios(computed: Mapping[str, float], members: int) -> dict[str, float]:
    """``MeanMetrics.compute()``'s dict plus ``spread_skill/<name>`` for every pair
    ``spread_var/<name>`` and ``mse_of_mean/<name>`` in it (see :func:`spread_skill_ratio`).

    Nothing is dropped or changed; ``<name>`` may carry a suffix (``spread_var/z500/12h`` ->
    ``spread_skill/z500/12h``) and the key a prefix (``val/spread_var/z500`` ->
    ``val/spread_skill/z500``): the ``spread_var`` path component is what is matched.
    A ``spread_var`` key without its ``mse_of_mean`` partner gets no ratio.

    MeanMetrics has no hook for values derived from several means (``compute`` only roots
    ``rmse/`` means one by one), so a task post-processes its ``compute()`` with this.
    """
    out = dict(computed)
    for key, spread in computed.items():
        parts = key.split("/")
        if SPREAD_VAR not in parts:
            continue
        i = parts.index(SPREAD_VAR)
        partner = "/".join([*parts[:i], MSE_OF_MEAN, *parts[i + 1 :]])
        if partner not in computed:
            continue
        out["/".join([*parts[:i], SPREAD_SKILL, *parts[i + 1 :]])] = spread_skill_ratio(spread, computed[partner], members)
    return out


def ensemble_scores(
    members: Mapping[str, Array],
    target: Mapping[str, Array],
    weights: Array | None = None,
    *,
    lat: Array | None = None,
    levels: Sequence[int | float] | None = None,
) -> dict[str, Array]:
    """Fair CRPS and spread/skill terms per named field and example.

    ``members[name]``: (M, B, H, W) for a surface field, (M, B, C, H, W) for an atmospheric
    one; ``target[name]``: the same without M. Both dicts have the same names.
    ``levels``: the C pressure levels (hPa) of the atmospheric fields; each level is scored
    as its own field named like :func:`aurora_loop.weather.metrics.weather_errors` names it
    (``z`` at 500 -> ``z500``, so ``crps/z500`` sits next to ``mae/z500``). With ``levels``,
    a target of 3 dims is a surface field and one of 4 dims is atmospheric (C must equal
    ``len(levels)``); without ``levels`` every field is scored whole, under its own name
    (use that for fields already split per level, or with a time axis).
    ``weights``: broadcastable to (H, W), e.g. ``latitude_weights(lat)[:, None]``; or pass
    ``lat`` (degrees, (H,)) to use :func:`aurora_loop.weather.metrics.latitude_weights`, as
    ``weather_errors`` does. Neither: unweighted.

    Returns (B,) arrays ``crps/<name>`` (:func:`fair_crps`, field units),
    ``spread_var/<name>`` and ``mse_of_mean/<name>`` (:func:`spread_skill`, units squared).
    """
    if set(members) != set(target):
        raise ValueError(f"members and target name different fields: {sorted(members)} vs {sorted(target)}")
    if lat is not None:
        if weights is not None:
            raise ValueError("pass either weights or lat, not both")
        weights = latitude_weights(lat)[:, None]
    out = {}
    for name, truth in target.items():
        for field, ens, true in _split_levels(name, jnp.asarray(members[name]), jnp.asarray(truth), levels):
            spread_var, mse_of_mean = spread_skill(ens, true, weights)
            out[f"crps/{field}"] = fair_crps(ens, true, weights)
            out[f"{SPREAD_VAR}/{field}"] = spread_var
            out[f"{MSE_OF_MEAN}/{field}"] = mse_of_mean
    return out


def _split_levels(name: str, ensemble: Array, target: Array, levels: Sequence[int | float] | None) -> list[tuple[str, Array, Array]]:
    """``[(field name, (M, B, H, W) members, (B, H, W) target)]`` for one named field."""
    if ensemble.shape[1:] != target.shape:
        raise ValueError(f"{name}: members of shape {ensemble.shape} do not match the target's {target.shape} (members first)")
    if levels is None:
        return [(name, ensemble, target)]
    if target.ndim == 3:
        return [(name, ensemble, target)]
    if target.ndim != 4:
        raise ValueError(f"{name}: a target of shape {target.shape} is neither (B, H, W) nor (B, C, H, W)")
    if target.shape[1] != len(levels):
        raise ValueError(f"{name}: {target.shape[1]} levels in shape {target.shape} but {len(levels)} level names {tuple(levels)}")
    return [(f"{name}{_level_label(level)}", ensemble[:, :, i], target[:, i]) for i, level in enumerate(levels)]
