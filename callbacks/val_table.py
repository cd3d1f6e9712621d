"""Validation scores as a scorecard: atmospheric variables as rows, pressure levels as columns,
surface variables on one line.

Scores arrive as flat names (``rmse/z500``, ``rmse/2t``, ``crps/t850``); an atmospheric field
is a variable name followed by its level in hPa. The console shows one metric by default
(RMSE, the one people compare), and when the levels do not fit a terminal's width only
WeatherBench2's headline levels; every score still goes to the loggers (TensorBoard, W&B).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# WeatherBench2's headline scores are z500, t850, q700 and the wind at 850 hPa: these levels
# are the ones kept when all of them do not fit.
HEADLINE_LEVELS = (500.0, 700.0, 850.0)
# The fields a one-line headline quotes (those a run has), WeatherBench2's order.
HEADLINE_FIELDS = ("z500", "t850", "q700", "2t", "msl", "u850", "v850", "10u", "10v")
# Rows in Aurora's order; other variables follow alphabetically.
SURFACE_ORDER = ("2t", "10u", "10v", "msl")
ATMOS_ORDER = ("z", "u", "v", "t", "q")
# (metric prefix, title): what a table block shows.
METRIC_TITLES = {"rmse": "RMSE", "mae": "MAE", "crps": "CRPS", "spread_skill": "spread/skill"}
VAL_TABLE_MODES = ("compact", "full", "none")

_ATMOS = re.compile(r"([A-Za-z](?:\w*[A-Za-z_])?)(\d+(?:\.\d+)?)")
_LABEL, _CELL = 9, 10  # characters: the row label (two of indent), one number


def _ordered(names: Iterable[str], preferred: tuple[str, ...]) -> list[str]:
    names = list(dict.fromkeys(names))
    return [n for n in preferred if n in names] + sorted(n for n in names if n not in preferred)


def split_fields(names: Iterable[str], surface: Iterable[str] = ()) -> tuple[list[str], dict[str, dict[float, str]]]:
    """(surface field names, atmospheric variable -> {level in hPa: field name}), in display
    order. ``surface``: names known to be surface variables (a hint for names such as
    ``swvl1`` that would otherwise read as a variable at a level)."""
    known_surface = set(surface)
    flat, atmos = [], {}
    for name in names:
        match = None if name in known_surface else _ATMOS.fullmatch(name)
        if match:
            atmos.setdefault(match.group(1), {})[float(match.group(2))] = name
        else:
            flat.append(name)
    rows = {var: dict(sorted(atmos[var].items())) for var in _ordered(atmos, ATMOS_ORDER)}
    return _ordered(flat, SURFACE_ORDER), rows


def _label(text: str) -> str:
    """A row's label column: indented, padded, and at least one space before the numbers."""
    return f"  {text:<{_LABEL - 3}} "


def _number(value: float) -> str:
    return f"{value:.4g}"


def _level(level: float) -> str:
    return f"{level:g}"


def columns_that_fit(levels: list[float], width: int) -> list[float]:
    """The levels to show in ``width`` characters: all when they fit, else the headline
    levels among them (or, lacking those, levels spread evenly over the range)."""
    room = max((width - _LABEL) // _CELL, 1)
    if len(levels) <= room:
        return levels
    headline = [lv for lv in levels if lv in HEADLINE_LEVELS]
    if headline:
        return headline[:room]
    step = (len(levels) - 1) / max(room - 1, 1)
    return [levels[round(i * step)] for i in range(room)] if room > 1 else levels[:1]


def table_block(metrics: Mapping[str, float], prefix: str, width: int | None = 80,
                surface: Iterable[str] = ()) -> tuple[list[str], str]:
    """The rows of one metric (``prefix`` ``rmse``, ``mae``, ``crps``, ``spread_skill``):
    a line of surface scores, a header of levels and a row per atmospheric variable.

    ``width``: characters to fit (``None``: show every level). Returns (lines, a note naming
    the levels left out, or "").
    """
    names = [k.split("/", 1)[1] for k in metrics if k.startswith(prefix + "/") and k.count("/") == 1]
    flat, atmos = split_fields(names, surface)
    lines = []
    if flat:
        cells = [f"{name} {_number(metrics[f'{prefix}/{name}'])}" for name in flat]
        line = _label("surface")
        for cell in cells:
            if width is not None and len(line) + len(cell) > width and line.strip() != "surface":
                lines.append(line.rstrip())
                line = " " * _LABEL
            line += cell + "   "
        lines.append(line.rstrip())
    note = ""
    if atmos:
        levels = sorted({lv for row in atmos.values() for lv in row})
        shown = levels if width is None else columns_that_fit(levels, width)
        if len(shown) < len(levels):
            note = f"{len(shown)} of {len(levels)} levels"
        lines.append(_label("hPa") + "".join(_level(lv).rjust(_CELL) for lv in shown).lstrip(" ").rjust(_CELL * len(shown) - 1))
        for var, row in atmos.items():
            cells = [(_number(metrics[f"{prefix}/{row[lv]}"]) if lv in row else "-").rjust(_CELL) for lv in shown]
            lines.append(_label(var) + "".join(cells)[1:])
    return lines, note


def validation_lines(step: int, metrics: Mapping[str, float], mode: str = "compact", width: int = 80,
                     surface: Iterable[str] = ()) -> list[str]:
    """What the console prints after a validation at ``step``.

    ``mode``: ``compact`` (RMSE, or for an ensemble RMSE of its mean, CRPS and spread/skill,
    at the levels that fit ``width``), ``full`` (every metric at every level) or ``none`` (the
    loss line alone).
    """
    if mode not in VAL_TABLE_MODES:
        raise ValueError(f"val_table must be one of {', '.join(VAL_TABLE_MODES)}, got {mode!r}")
    title = f"Validation at step {step}: loss {metrics.get('loss', float('nan')):.4f}"
    present = [p for p in METRIC_TITLES if any(k.startswith(p + "/") for k in metrics)]
    if mode == "none" or not present:
        return [title]
    if mode == "compact":
        chosen = [p for p in present if p != "mae"] or present
        blocks = [(p, table_block(metrics, p, width, surface)) for p in chosen]
    else:
        blocks = [(p, table_block(metrics, p, None, surface)) for p in present]
    cut = any(note for _, (_, note) in blocks)
    hidden = [METRIC_TITLES[p] for p in present if p not in {prefix for prefix, _ in blocks}]
    parts = (["all levels"] if cut else []) + hidden + ["per-lead scores"]
    elsewhere = (", ".join(parts[:-1]) + " and " if len(parts) > 1 else "") + parts[-1] + " in TensorBoard"
    if len(blocks) == 1:
        prefix, (rows, _) = blocks[0]
        return [f"{title}   {METRIC_TITLES[prefix]}; {elsewhere}", *rows]
    mean = "RMSE of the ensemble mean; " if "crps" in present else ""
    lines = [f"{title}   ({mean}{elsewhere})"]
    for prefix, (rows, _) in blocks:
        lines.append(f"  {METRIC_TITLES[prefix]}")
        lines += ["  " + row for row in rows]
    return lines


def headline(metrics: Mapping[str, float], prefix: str = "rmse", most: int = 6) -> dict[str, float]:
    """Up to ``most`` headline scores of ``prefix`` (WeatherBench2's z500, t850, q700, ...
    that the run has; else its first fields), field name -> value."""
    names = [k.split("/", 1)[1] for k in metrics if k.startswith(prefix + "/") and k.count("/") == 1]
    chosen = [n for n in HEADLINE_FIELDS if n in names]
    if not chosen:
        flat, atmos = split_fields(names)
        chosen = flat + [name for row in atmos.values() for name in row.values()]
    return {name: float(metrics[f"{prefix}/{name}"]) for name in chosen[:most]}
