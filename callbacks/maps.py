"""Forecast maps for loggers: predict on one validation batch, render prediction/target/error.

:func:`forecast_maps` runs the task's optional ``predict(params, batch) -> Batch`` (jitted on
one device of this process, so no other process has to join) on the first validation
batch and returns, per chosen field, the maps of the first example at one lead time.
:func:`render_maps` draws one field as three panels (prediction, target, error) with
colour bars (matplotlib, Agg backend) and returns an RGB image array.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from aurora_loop.metrics import per_field

DEFAULT_FIELDS = ("2t", "z500")


def _local(tree: Any) -> Any:
    """One device-local copy of replicated (possibly multi-process) arrays."""

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x.addressable_data(0)
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            return x.addressable_data(0)
        return x

    return jax.tree.map(one, tree)


def choose_fields(available: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """``wanted`` fields that the data has; without a wish: 2t and z500, else the first one."""
    if wanted:
        return [name for name in wanted if name in available]
    chosen = [name for name in DEFAULT_FIELDS if name in available]
    return chosen or list(available[:1])


class Forecaster:
    """Jitted ``task.predict`` on one device, compiled once per batch shape."""

    def __init__(self, task: Any) -> None:
        if not callable(getattr(task, "predict", None)):
            raise TypeError(f"task {type(task).__name__} has no predict(params, batch) method")
        self._fn = jax.jit(task.predict)

    def __call__(self, params: Any, local_batch: Any) -> Any:
        device = jax.local_devices()[0]
        params = jax.device_put(_local(params), device)
        batch = jax.device_put(local_batch, device)
        return jax.device_get(self._fn(params, batch))


def forecast_maps(
    prediction: Any, target: Any, fields: Sequence[str] | None, lead: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(prediction, target) maps of shape (h, w) for example 0 at roll-out step ``lead``
    (0-based; clipped to the last step the batch has, see :func:`lead_step`)."""
    pred, true = per_field(prediction), per_field(target)
    k = lead_step(target, lead)
    return {name: (np.asarray(pred[name])[0, k], np.asarray(true[name])[0, k]) for name in choose_fields(list(true), fields)}


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
        lat, lon = np.asarray(lat), np.asarray(lon)
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
