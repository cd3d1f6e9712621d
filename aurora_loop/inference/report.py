"""Write an :class:`aurora_loop.inference.evaluation.Evaluation` out: CSV/JSON tables, PNG plots, a printed table.

Files written into the report directory:

- ``scores.csv`` / ``scores.json``: one row per (model, variable, level, lead) with ``rmse``,
  ``bias`` (the variable's units), ``acc`` (1) and ``count`` (initial times averaged);
  the JSON also records the stores, the climatology and the initial times.
- ``rmse.png``, ``acc.png``, ``bias.png``: the score against lead time (hours), one panel
  per variable and level, the forecast and every baseline as lines.
- ``error_map_<H>h.png``: for each chosen lead time H, the forecast's error (forecast - truth,
  averaged over initial times) on the latitude x longitude grid, one panel per field.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

from aurora_loop.errors import UsageError
from aurora_loop.inference.evaluation import ENSEMBLE_METRICS, Evaluation

COLUMNS = ("model", "variable", "level", "units", "lead_hours", "rmse", "bias", "acc", "count")
STYLES = {"persistence": dict(linestyle="--", marker="s", color="tab:gray"), "climatology": dict(linestyle=":", marker="^", color="tab:green")}


def write_tables(result: Evaluation, out_dir: str) -> tuple[str, str]:
    """``scores.csv`` and ``scores.json`` in ``out_dir``; returns their paths."""
    rows = result.rows()
    csv_path, json_path = os.path.join(out_dir, "scores.csv"), os.path.join(out_dir, "scores.json")
    columns = COLUMNS + tuple(m for m in ENSEMBLE_METRICS if any(m in row for row in rows))  # an ensemble's own scores
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    record = {
        "forecast": result.forecast_path,
        "truth": result.truth_path,
        "model": result.model,
        "climatology": result.climatology,
        "init_times": [str(t)[:19] for t in result.init_times],
        "lead_hours": [float(h) for h in result.lead_hours],
        "definitions": "WeatherBench2: rmse = sqrt(mean over inits of area-weighted MSE); bias = mean of area-weighted mean(forecast - truth); "
                       "acc = mean over inits of area-weighted anomaly correlation w.r.t. the climatology",
        "rows": rows,
    }
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)
    return csv_path, json_path


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plots need matplotlib: pip install matplotlib (or pass --no-plots)") from None
    return plt


def _grid(n: int, cols: int = 4) -> tuple[int, int]:
    cols = min(cols, n)
    return math.ceil(n / cols), cols


def plot_scores(result: Evaluation, out_dir: str, metrics: Sequence[str] = ("rmse", "acc", "bias"), dpi: int = 80) -> list[str]:
    """One PNG per metric: score vs lead time, a panel per field, a line per model."""
    plt = _pyplot()
    paths = []
    hours = result.lead_hours
    for metric in metrics:
        rows, cols = _grid(len(result.fields))
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
        for ax, field in zip(axes.flat, result.fields):
            for model, scores in field.scores.items():
                values = scores[metric]
                if np.all(np.isnan(values)):
                    continue
                ax.plot(hours, values, label=model, **STYLES.get(model, dict(marker="o", color="tab:blue", linewidth=2)))
            ax.set_title(field.label, fontsize=9)
            ax.set_xlabel("lead time (h)", fontsize=8)
            unit = "" if metric == "acc" else f" ({field.units})" if field.units else ""
            ax.set_ylabel(f"{metric.upper()}{unit}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(result.fields):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{metric.upper()} of {result.model} vs baselines ({len(result.init_times)} init times)", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{metric}.png")
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_error_maps(result: Evaluation, out_dir: str, lead_indices: Sequence[int], dpi: int = 80) -> list[str]:
    """One PNG per lead index: the mean forecast error map of every field (diverging colours,
    symmetric about 0)."""
    plt = _pyplot()
    paths = []
    for k in lead_indices:
        rows, cols = _grid(len(result.fields))
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.2 * rows), squeeze=False)
        for ax, field in zip(axes.flat, result.fields):
            error = field.mean_error[k]
            limit = float(np.nanmax(np.abs(error))) if np.any(np.isfinite(error)) else 1.0
            mesh = ax.pcolormesh(result.lon, result.lat, error, cmap="RdBu_r", vmin=-limit, vmax=limit, shading="auto")
            fig.colorbar(mesh, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
            ax.set_title(f"{field.label} ({field.units})" if field.units else field.label, fontsize=8)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(result.fields):]:
            ax.axis("off")
        hours = result.lead_hours[k]
        fig.suptitle(f"{result.model} error (forecast - truth) at +{hours:g} h, mean over {len(result.init_times)} init times", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"error_map_{hours:g}h.png")
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.4g}"
    return f"{x:.3e}"


def print_table(result: Evaluation, lead_indices: Sequence[int], stream: TextIO) -> None:
    """A compact table: per field and chosen lead, RMSE of the forecast and each baseline, its ACC and bias."""
    models = list(result.fields[0].scores) if result.fields else []
    head = ["field", "lead"] + [f"rmse:{m}" for m in models] + [f"acc:{models[0]}", f"bias:{models[0]}"] if models else []
    table = [head]
    for field in result.fields:
        for k in lead_indices:
            s = field.scores
            table.append([field.label, f"{result.lead_hours[k]:g}h"] + [_fmt(s[m]["rmse"][k]) for m in models]
                         + [_fmt(s[models[0]]["acc"][k]), _fmt(s[models[0]]["bias"][k])])
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        stream.write("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() + "\n")
    stream.flush()


def lead_indices_for(result: Evaluation, hours: Sequence[float] | None) -> list[int]:
    """Indices of the lead times ``hours`` (default: the first and the last lead)."""
    available = list(result.lead_hours)
    if not hours:
        return sorted({0, len(available) - 1})
    out = []
    for h in hours:
        matches = [i for i, a in enumerate(available) if abs(a - h) < 1e-6]
        if not matches:
            raise UsageError(f"lead time {h:g} h is not in the forecast (it has {', '.join(f'{a:g}' for a in available)} h)")
        out.append(matches[0])
    return out
