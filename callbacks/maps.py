"""Forecast maps for loggers: predict on one validation batch, render prediction/target/error.

:func:`validation_forecast` runs the task's optional ``predict(params, batch) -> Batch`` on
the first validation batch, jitted under the same shardings as the eval step (parameters
as trained, replicated or FSDP-sharded; the batch split over the mesh), and brings only
example 0's forecast back to the host. Every process must call it at the same validation
(it is a collective); the forecast is computed once per step and shared by every logger of
the run. :func:`forecast_maps` picks fields and a lead step; :func:`render_maps` draws one
field as three panels (prediction, target, error) with colour bars (matplotlib, Agg
backend) and returns an RGB image array.
"""

from __future__ import annotations

import io
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from aurora_loop.parallel import batch_shardings, place_batch
from aurora_loop.step import cast_floating
from aurora_loop.weather.metrics import per_field

DEFAULT_FIELDS = ("2t", "z500")


def choose_fields(available: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """``wanted`` fields that the data has; without a wish: 2t and z500, else the first one."""
    if wanted:
        return [name for name in wanted if name in available]
    chosen = [name for name in DEFAULT_FIELDS if name in available]
    return chosen or list(available[:1])


def _host(x: jax.Array) -> np.ndarray:
    """A replicated (possibly multi-process) array as numpy, from this process's copy."""
    return np.asarray(x.addressable_data(0))


class Forecaster:
    """``task.predict`` for example 0 of a batch, under the trainer's shardings.

    Compiled once per batch shape with the parameters' own shardings (``trainer.
    state_shardings.params``), so FSDP parameters are never gathered onto one device; the
    output, example 0's predicted fields only, is replicated (it is small).
    """

    def __init__(self, trainer: Any) -> None:
        task = trainer.task
        if not callable(getattr(task, "predict", None)):
            raise TypeError(f"task {type(task).__name__} has no predict(params, batch) method")
        self._mesh = trainer.mesh  # not the trainer: the per-trainer cache below holds this weakly

        compute_dtype = getattr(trainer, "compute_dtype", None)

        def first_example(params: Any, batch: Any) -> tuple[dict, dict]:
            prediction = task.predict(cast_floating(params, compute_dtype), batch)  # as validation sees them
            first = lambda fields: {k: v[:1] for k, v in fields.items()}  # noqa: E731
            return first(prediction.surf_vars), first(prediction.atmos_vars)

        self._fn = jax.jit(
            first_example,
            in_shardings=(trainer.state_shardings.params, None),
            out_shardings=NamedSharding(trainer.mesh, PartitionSpec()),
        )

    def __call__(self, params: Any, local_batch: Any) -> Any:
        """Example 0's forecast as a host Batch shaped like ``local_batch.targets`` with b = 1."""
        placed = place_batch(local_batch, batch_shardings(local_batch, self._mesh))
        surf, atmos = self._fn(params, placed)
        return local_batch.targets.replace(
            surf_vars={k: _host(v) for k, v in surf.items()},
            atmos_vars={k: _host(v) for k, v in atmos.items()},
        )


class _ValidationForecasts:
    """The per-trainer forecaster, the first validation batch, and the latest forecast."""

    def __init__(self, trainer: Any) -> None:
        self.forecaster = Forecaster(trainer)
        self.fit_of = (trainer.task, trainer.state_shardings, trainer.val_data)  # a new fit builds anew
        self.batch = trainer.example_val_batch()
        self.step: int | None = None
        self.prediction: Any = None


_BY_TRAINER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def validation_forecast(trainer: Any, step: int) -> tuple[Any, Any] | None:
    """(first validation batch (host, this process's share), example 0's forecast (host
    Batch, b = 1)) with the current evaluation parameters (``trainer.eval_params``: the EMA
    when there is one), or ``None`` when the task has no ``predict``
    or there is no validation batch of ``Sample``s. Computed once per step for all callers;
    every process must call it (the forecast is a collective over the mesh)."""
    if trainer.val_data is None or not callable(getattr(trainer.task, "predict", None)):
        return None
    cached = _BY_TRAINER.get(trainer)
    if cached is None or any(a is not b for a, b in zip(cached.fit_of, (trainer.task, trainer.state_shardings, trainer.val_data))):
        cached = _BY_TRAINER[trainer] = _ValidationForecasts(trainer)
    if cached.batch is None or not hasattr(cached.batch, "targets"):
        return None
    if cached.step != step:
        if cached.step is None and callable(getattr(trainer, "timed_compile", None)):  # the first call compiles
            cached.prediction = trainer.timed_compile("predict step", step, cached.forecaster, trainer.eval_params, cached.batch)
        else:
            cached.prediction = cached.forecaster(trainer.eval_params, cached.batch)
        cached.step = step
    return cached.batch, cached.prediction


def forecast_maps(
    prediction: Any, target: Any, fields: Sequence[str] | None, lead: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(prediction, target) maps of shape (h, w) for example 0 at roll-out step ``lead``
    (0-based; clipped to the last step the batch has, see :func:`lead_step`).

    A model that crops the grid (Aurora drops the last latitude row of a 721-row grid to fit
    its patches) predicts fewer rows than the target has: the target is cropped alike."""
    pred, true = per_field(prediction), per_field(target)
    k = lead_step(target, lead)
    maps = {}
    for name in choose_fields(list(true), fields):
        predicted = np.asarray(pred[name])[0, k]
        h, w = predicted.shape[-2:]
        maps[name] = (predicted, np.asarray(true[name])[0, k][..., :h, :w])
    return maps


def lead_step(target: Any, lead: int) -> int:
    """The roll-out step drawn for a wished ``lead``: at most the targets' last step."""
    return max(0, min(lead, int(target.num_steps) - 1))


def render_maps(name: str, prediction: np.ndarray, target: np.ndarray, lat: Any = None, lon: Any = None, title: str = "") -> np.ndarray:
    """Three panels (prediction, target, prediction - target) with colour bars -> (H, W, 3) uint8."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    error = prediction - target
    lo, hi = float(np.nanmin(target)), float(np.nanmax(target))
    bound = float(np.nanmax(np.abs(error))) or 1.0
    extent = None
    if lat is not None and lon is not None:
        lat, lon = np.asarray(lat)[: prediction.shape[-2]], np.asarray(lon)[: prediction.shape[-1]]
        extent = (float(lon.min()), float(lon.max()), float(lat.min()), float(lat.max()))
    fig = Figure(figsize=(12, 3.2), dpi=80)
    axes = fig.subplots(1, 3)
    panels = (
        (f"{name} predicted", prediction, "viridis", lo, hi),
        (f"{name} target", target, "viridis", lo, hi),
        (f"{name} error (pred - target)", error, "RdBu_r", -bound, bound),
    )
    for ax, (label, data, cmap, vmin, vmax) in zip(axes, panels):
        image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, extent=extent, aspect="auto", origin="upper")
        ax.set_title(label, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    from matplotlib.image import imread

    rgba = imread(buf, format="png")
    return (rgba[..., :3] * 255).astype(np.uint8)
