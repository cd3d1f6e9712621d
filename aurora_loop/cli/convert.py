"""``aurora-loop convert SRC... OUT.zarr``: NetCDF/GRIB files -> a WeatherBench2-layout store."""

from __future__ import annotations

import argparse

from aurora_loop.datasets.convert import convert
from aurora_loop.errors import UsageError


def _mapping(text: str) -> dict[str, str]:
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.count("=") == 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"--rename takes SOURCE=WB2 pairs like t2m=2m_temperature,sp=surface_pressure, got {text!r}")
    return dict(p.split("=") for p in pairs)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="SRC... OUT.zarr", help="NetCDF/GRIB sources, then the store to create (must not exist)")
    parser.add_argument("--rename", type=_mapping, default=None, help="source=WB2 variable names, comma list (ERA5 short names are known, Aurora 1.5's included: "
                             "tp becomes total_precipitation_1hr, u100 100m_u_component_of_wind, sd snow_depth, ...)")
    parser.add_argument("--member", type=int, default=None, help="keep one ensemble member (default: keep the ensemble dim; each member is a sample)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="dtype of the fields")
    parser.add_argument("--engine", default=None, help="xarray engine (default: cfgrib for .grib files, else xarray's choice)")
    parser.add_argument("--zarr_format", type=int, choices=(2, 3), default=2, help="Zarr format (2: as WeatherBench2)")


def run(args: argparse.Namespace) -> int:
    if len(args.paths) < 2:
        raise UsageError("give at least one source and the output: aurora-loop convert SRC... OUT.zarr")
    *sources, out = args.paths
    ds = convert(sources, out, variable_map=args.rename, member=args.member, dtype=args.dtype, engine=args.engine, zarr_format=args.zarr_format)
    sizes = " x ".join(f"{d} {n}" for d, n in ds.sizes.items())
    print(f"wrote {out}: {', '.join(map(str, ds.data_vars))} ({sizes})")
    return 0
