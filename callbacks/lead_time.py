"""RMSE against lead time, drawn for loggers from the per-lead validation scores.

The Aurora task reports ``rmse/<field>/<lead>h`` (and ``mae/...``) for every roll-out step
of a validation sample (:func:`aurora_loop.weather.metrics.per_lead`). :func:`lead_curves` gathers
them into one curve per field; :func:`render_lead_curves` draws the curves as one small
panel per field (the fields have different units) with matplotlib's Agg backend, as
:mod:`aurora_loop.callbacks.maps` draws its maps, and returns an RGB image array.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from aurora_loop.weather.metrics import split_lead_key

# Headline fields of WeatherBench2's scorecards.
DEFAULT_LEAD_FIELDS = ("z500", "t850", "2t", "10u")


def lead_curves(
    metrics: Mapping[str, float], fields: Sequence[str] | None = None, kind: str = "rmse", min_leads: int = 2
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """field -> (lead hours (L,), score (L,)), ascending in lead, from per-lead ``metrics``.

    ``fields``: which to keep, in that order, among those with per-lead scores; ``None``:
    :data:`DEFAULT_LEAD_FIELDS` that are present, else the first field with per-lead scores.
    Fields with fewer than ``min_leads`` lead times are left out (one point is no curve).
    """
    by_field: dict[str, dict[float, float]] = {}
    for key, value in metrics.items():
        parsed = split_lead_key(key)
        if parsed is not None and parsed[0] == kind:
            by_field.setdefault(parsed[1], {})[parsed[2]] = float(value)
    available = [name for name, leads in by_field.items() if len(leads) >= min_leads]
    if fields is None:
        chosen = [name for name in DEFAULT_LEAD_FIELDS if name in available] or available[:1]
    else:
        chosen = [name for name in fields if name in available]
    out = {}
    for name in chosen:
        hours = np.asarray(sorted(by_field[name]), np.float64)
        out[name] = (hours, np.asarray([by_field[name][h] for h in hours], np.float64))
    return out


def render_lead_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], kind: str = "rmse", title: str = "") -> np.ndarray:
    """One panel per field of score against lead time (hours) -> (H, W, 3) uint8 image."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.0 * len(curves), 2.6), dpi=80)
    axes = np.atleast_1d(fig.subplots(1, len(curves)))
    for ax, (name, (hours, values)) in zip(axes, curves.items()):
        ax.plot(hours, values, marker="o", linewidth=2, color="tab:blue")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("lead time (h)", fontsize=8)
        ax.set_ylabel(kind.upper(), fontsize=8)
        ax.set_xticks(hours if len(hours) <= 8 else hours[:: -(-len(hours) // 8)])
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _rgb(fig)


def _rgb(fig) -> np.ndarray:
    """A matplotlib Figure as an (H, W, 3) uint8 array (PNG round trip, as in ``maps``)."""
    from matplotlib.image import imread

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    rgba = imread(buf, format="png")
    return (rgba[..., :3] * 255).astype(np.uint8)
