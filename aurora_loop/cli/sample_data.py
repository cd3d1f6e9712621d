"""``aurora-loop sample-data OUT.zarr``: write a synthetic WeatherBench2-layout store."""

from __future__ import annotations

import argparse

from aurora_loop.datasets.sample_data import (
    DEFAULT_LEVELS,
    PRESETS,
    STANDARD_SURFACE,
    SURFACE_VARIABLES,
    check_surface_variables,
    write_sample_store,
)
from aurora_loop.errors import UsageError


def _grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"grid must look like 32x64 (latitudes x longitudes), got {text!r}") from err
    return h, w


def _levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"levels must be hPa values like 250,500,850, got {text!r}") from err


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT.zarr", help="store to create (must not exist)")
    parser.add_argument("--grid", type=_grid, default=(32, 64), help="latitudes x longitudes (default: 32x64)")
    parser.add_argument("--times", type=int, default=120, help="number of time steps, --step_hours apart (120: 30 days of 6-hourly steps)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--levels", type=_levels, default=DEFAULT_LEVELS, help="pressure levels in hPa (comma list)")
    parser.add_argument("--zarr_format", type=int, choices=(2, 3), default=2, help="Zarr format (2: as WeatherBench2)")
    parser.add_argument("--step_hours", type=int, default=6, help="hours between time steps (1 for hourly data, e.g. for --lead_times 1,3,6)")
    parser.add_argument("--variables", choices=PRESETS, default="standard",
                        help="variable set: standard (2t,10u,10v,msl; statics lsm,z,slt) or v1p5 (every Aurora 1.5 variable: its 26 surface "
                             "variables, output-only ones included, and its 36 statics, with slt kept too)")
    parser.add_argument("--surf_vars", default=None,
                        help=f"surface variables, Aurora names (comma list; default: the --variables set, {','.join(STANDARD_SURFACE)} for standard; "
                             f"available: {', '.join(SURFACE_VARIABLES)})")


def run(args: argparse.Namespace) -> int:
    if args.times < 1 or args.step_hours < 1:
        raise UsageError(f"--times and --step_hours must be at least 1, got {args.times} and {args.step_hours}")
    given = None if args.surf_vars is None else [v.strip() for v in args.surf_vars.split(",") if v.strip()]
    surf_vars = check_surface_variables(given, args.variables)
    path = write_sample_store(args.out, grid=args.grid, times=args.times, seed=args.seed, levels=args.levels, zarr_format=args.zarr_format, step_hours=args.step_hours,
                              surf_vars=surf_vars, variables=args.variables)
    h, w = args.grid
    statics = " and Aurora 1.5's statics" if args.variables == "v1p5" else ""
    print(f"wrote {path}: {args.times} times ({args.step_hours} h apart) x {h}x{w} grid, levels {list(args.levels)} hPa, "
          f"surface variables {','.join(surf_vars)}{statics}, seed {args.seed}")
    return 0
