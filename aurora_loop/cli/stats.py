"""``aurora-loop stats STORE --out stats.json``: normalisation statistics of a store.

Writes the mean (location) and standard deviation (scale) of every selected variable, per
pressure level for atmospheric ones, over the chosen times and all grid points, in the
reference's convention (``{"locations": {"2t": ..., "z_500": ...}, "scales": {...},
"source": {...}}``). ``aurora-train --stats stats.json`` then uses them for the variables
Aurora has no built-in statistics for.
"""

from __future__ import annotations

import argparse
import os

from aurora_loop.errors import UsageError


def add_storage_flags(parser: argparse.ArgumentParser) -> None:
    """``--storage_options`` and ``--cache_dir``, for stores in object storage (s3://, gs://, az://, https://)."""
    parser.add_argument("--storage_options", default=None, metavar="JSON",
                        help="for a store in object storage (s3://, gs://, az://, https://): obstore settings as a JSON object "
                             "(default: credentials from the usual AWS_*/GOOGLE_*/AZURE_* environment, else anonymous)")
    parser.add_argument("--cache_dir", default=None, help="keep the chunks read from a remote store in this local directory")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE", help="WeatherBench2-layout Zarr store to read")
    parser.add_argument("--out", required=True, metavar="FILE", help="JSON file to write (refused if it exists, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--train_start", default=None, help="first time used (ISO 8601, inclusive; default: the store's first)")
    parser.add_argument("--train_end", default=None, help="last time used (ISO 8601, inclusive; default: the store's last)")
    parser.add_argument("--surf_vars", default=None, help="surface variables, Aurora names, comma list; empty: none (default: 2t,10u,10v,msl)")
    parser.add_argument("--static_vars", default=None, help="static variables, comma list; empty: none (default: lsm,z,slt)")
    parser.add_argument("--atmos_vars", default=None, help="atmospheric variables, comma list; empty: none (default: z,u,v,t,q)")
    parser.add_argument("--levels", default=None, help="pressure levels in hPa, comma list (default: every level in the store)")
    parser.add_argument("--static_path", default=None, help="separate Zarr store with the static fields (tried first)")
    parser.add_argument("--variable_map", default=None, help="store name -> Aurora name overrides, e.g. total_precipitation=tp,t2m=2t")
    parser.add_argument("--chunk_times", type=int, default=8, help="time steps read at once per variable (bounds memory)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")
    add_storage_flags(parser)


def _variable_map(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    out = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        store_name, sep, aurora_name = part.partition("=")
        if not sep or not store_name.strip() or not aurora_name.strip():
            raise UsageError(f"--variable_map takes STORE_NAME=AURORA_NAME pairs, e.g. total_precipitation=tp; got {part!r}")
        out[store_name.strip()] = aurora_name.strip()
    return out


def run(args: argparse.Namespace) -> int:
    from aurora_loop.datasets.build import selection_from_config
    from aurora_loop.weather.stats import compute, write_json

    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"{args.out} exists; choose another --out or pass --overwrite")
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a directory; pass a file path like stats.json")
    from aurora_loop.datasets.storage import is_remote, parse_storage_options

    if not is_remote(args.store) and not os.path.exists(args.store):
        raise UsageError(f"data store {args.store!r} does not exist; pass the path of a WeatherBench2-layout Zarr store")
    config = argparse.Namespace(surf_vars=args.surf_vars, static_vars=args.static_vars, atmos_vars=args.atmos_vars,
                                levels=args.levels or (), variable_map=_variable_map(args.variable_map))
    selection = selection_from_config(config)
    stats = compute(args.store, selection, start=args.train_start, end=args.train_end, chunk_times=args.chunk_times,
                    static_path=args.static_path, progress=not args.no_progress,
                    storage_options=parse_storage_options(args.storage_options), cache_dir=args.cache_dir)
    write_json(stats, args.out, overwrite=args.overwrite)
    src = stats["source"]
    print(f"wrote {args.out}: {len(stats['locations'])} statistics from {src['times']} times "
          f"({src['first_time']} .. {src['last_time']}) x {src['grid_points']} grid points")
    return 0
