"""``aurora-loop evaluate FORECAST.zarr --truth STORE --out REPORT_DIR``: WeatherBench2 scores.

Latitude-weighted RMSE, bias and ACC per variable, level and lead time, for the forecast and
the baselines (persistence, climatology); ``REPORT_DIR/scores.csv`` and ``scores.json``,
PNG plots (score vs lead time; error maps at chosen lead times), and a compact table on
stdout. Definitions and the climatology: :mod:`aurora_loop.inference.evaluation`.
"""

from __future__ import annotations

import argparse
import os
import sys

from aurora_loop.cli.stats import add_storage_flags
from aurora_loop.errors import UsageError


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("forecast", metavar="FORECAST.zarr", help="forecast store in the WeatherBench2 layout (aurora-loop forecast writes one)")
    parser.add_argument("--truth", required=True, metavar="STORE", help="WeatherBench2-layout Zarr store holding the valid times (e.g. the store the forecast started from)")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR", help="directory for scores.csv, scores.json and the PNG plots (created; existing report files are replaced)")
    parser.add_argument("--baselines", default="persistence,climatology", help="comma list from persistence, climatology; empty: none (default: both)")
    parser.add_argument("--climatology_period", metavar="START,END", help="truth times averaged into the climatology (default: the truth's times before the first init time, or all of them if fewer than 4)")
    parser.add_argument("--variables", help="comma list of WB2 variable names to score (default: all)")
    parser.add_argument("--levels", help="comma list of pressure levels (hPa) to score (default: all)")
    parser.add_argument("--leads", metavar="HOURS", help="lead times (hours, comma list) for the error maps and the printed table (default: first and last)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="write the tables only")
    add_storage_flags(parser)


def _list(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def _numbers(text: str | None, flag: str, kind: type) -> list:
    try:
        return [kind(v) for v in _list(text)]
    except ValueError:
        raise UsageError(f"{flag} must be a comma list of numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from aurora_loop.datasets.storage import parse_storage_options
    from aurora_loop.inference.evaluation import evaluate
    from aurora_loop.inference.report import lead_indices_for, plot_error_maps, plot_scores, print_table, write_tables

    period = _list(args.climatology_period)
    if period and len(period) != 2:
        raise UsageError(f"--climatology_period wants START,END, got {args.climatology_period!r}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file; pass a directory")
    result = evaluate(
        args.forecast,
        args.truth,
        baselines=_list(args.baselines),
        period=period or None,
        variables=_list(args.variables) or None,
        levels=_numbers(args.levels, "--levels", int) or None,
        storage_options=parse_storage_options(args.storage_options),
        cache_dir=args.cache_dir,
    )
    leads = lead_indices_for(result, _numbers(args.leads, "--leads", float))
    os.makedirs(args.out, exist_ok=True)
    written = list(write_tables(result, args.out))
    if args.plots:
        written += plot_scores(result, args.out)
        written += plot_error_maps(result, args.out, leads)
    print(f"{result.model} vs truth {result.truth_path}: {len(result.init_times)} init times; climatology: {result.climatology}")
    if result.grid_note:
        print(result.grid_note)
    print_table(result, leads, sys.stdout)
    print(f"Wrote {len(written)} files to {os.path.abspath(args.out)}: {', '.join(os.path.basename(p) for p in written)}")
    return 0
