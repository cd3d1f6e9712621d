"""``aurora-loop forecast``: roll a trained model out to a WeatherBench2 forecast Zarr store.

    aurora-loop forecast --checkpoint runs/a --init 2020-01-25T00,2020-01-26T00 --steps 8 --out fc.zarr

``--checkpoint``: a run dir (its newest step), ``run/checkpoints/<step>``, or an exported
checkpoint dir (``aurora-loop export-checkpoint``). The variables, levels, history and model
step come from the run's config; the data from ``--dataset_path`` (default: the run's store),
read one model step apart (a 6 h model forecasts from an hourly store).

Aurora 1.5: ``--fine_lead_times 1,2,3,4,5,6`` writes every sub-step's prediction (lead times
1 h, 2 h, ..., 6 h, 7 h, ...); ``--ensemble_members M`` (the ensemble model) writes M members
along a ``number`` dim, their noise seeded by ``--seed``. Without ``--ensemble_members`` a
stochastic model writes one forecast (member 0 of that seed) in the deterministic layout.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from aurora_loop.cli.stats import add_storage_flags
from aurora_loop.errors import UsageError
from aurora_loop.inference.runs import WEIGHT_CHOICES, WEIGHTS_HELP

#: TrainingConfig fields the flags may override (for checkpoints without a training config).
OVERRIDES = ("surf_vars", "static_vars", "atmos_vars", "levels", "timestep_hours")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a run dir (newest step), run/checkpoints/<step>, or an exported encoder/backbone/decoder (or model/) dir",
    )
    parser.add_argument(
        "--dataset_path",
        metavar="STORE",
        help="WB2-layout Zarr store to read the initial conditions from (default: the run's dataset_path)",
    )
    parser.add_argument("--static_path", metavar="STORE", help="separate store of static fields (default: the run's static_path)")
    add_storage_flags(parser)
    parser.add_argument(
        "--init",
        required=True,
        metavar="TIMES",
        help="initial times: ISO times comma-separated (2020-01-25T00,2020-01-26T00), START/END[/EVERY] (2020-01-20/2020-01-25/12h), or all",
    )
    parser.add_argument(
        "--steps",
        type=int,
        required=True,
        metavar="N",
        help="roll-out steps; lead times are 1..N times the model step (the run's; see --timestep_hours)",
    )
    parser.add_argument(
        "--out", required=True, metavar="FORECAST.zarr", help="Zarr store to write (refused if it exists, unless --overwrite)"
    )
    parser.add_argument("--model", metavar="NAME", help="task name, for checkpoints without a training config (e.g. imported Aurora weights)")
    for name in ("surf_vars", "static_vars", "atmos_vars", "levels"):
        parser.add_argument(
            f"--{name}", metavar="A,...", help=f"override the run's {name} (comma list; for checkpoints without a training config)"
        )
    parser.add_argument(
        "--timestep_hours",
        metavar="H",
        help="the model step in hours (default: the run's, else the largest of its --lead_times, else the store's time step); "
        "inputs are read this far apart",
    )
    parser.add_argument(
        "--fine_lead_times",
        metavar="H1,H2,..",
        help="write every sub-step of each model step (models with variable lead times, Aurora 1.5): hours in increasing order, "
        "the last the model step, e.g. 1,2,3,4,5,6",
    )
    parser.add_argument(
        "--ensemble_members",
        type=int,
        metavar="M",
        help="a stochastic model's (v1p5_ensemble) ensemble: M forecasts with independent noise along a 'number' dim "
        "(default: one forecast, no member dim)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of a stochastic model's noise, folded per member and initial time"
    )
    parser.add_argument("--member", type=int, default=0, help="ensemble member of the store to start from")
    parser.add_argument(
        "--batch_size", type=int, help="initial times per batch, split over the devices (default: one per device)"
    )
    parser.add_argument("--num_devices", "--num_gpus", dest="num_devices", type=int, help="devices to use (default: all visible)")
    parser.add_argument("--space_parallel", type=int, default=1, metavar="N",
                        help="devices that split every forecast's grid between them, in bands of latitude rows, as in "
                             "aurora-train (a divisor of the device count; default: 1)")
    parser.add_argument(
        "--zarr_format",
        type=int,
        choices=(2, 3),
        default=2,
        help="Zarr format of the output, consolidated (2: as WeatherBench2)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto", help=WEIGHTS_HELP)
    parser.add_argument(
        "--compile_cache",
        default="~/.cache/aurora_loop/xla",
        metavar="DIR",
        help="JAX's persistent compilation cache, so the next forecast of the same shapes skips compiling "
        "($XDG_CACHE_HOME is honoured; JAX_COMPILATION_CACHE_DIR wins; none: off)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _use_cpu_devices(count: int | None) -> None:
    """On a CPU-only machine ``--num_devices N`` means N CPU devices (as in aurora-train); this
    only works before JAX starts its backends and leaves accelerator backends alone."""
    if (
        count
        and "JAX_NUM_CPU_DEVICES" not in os.environ
        and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")
    ):
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", count)
        except (AttributeError, RuntimeError):
            pass


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.num_devices is not None and args.num_devices < 1:
        raise UsageError(f"--num_devices must be at least 1, got {args.num_devices}")
    if args.space_parallel < 1:
        raise UsageError(f"--space_parallel must be at least 1, got {args.space_parallel}")
    if args.ensemble_members is not None and args.ensemble_members < 1:
        raise UsageError(f"--ensemble_members must be at least 1, got {args.ensemble_members}")
    if args.seed < 0:
        raise UsageError(f"--seed must be at least 0, got {args.seed}")
    from aurora_loop.inference.times import parse_fine_lead_times

    parse_fine_lead_times(args.fine_lead_times)  # a bad list fails before anything loads
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out} already exists; choose a new path or pass --overwrite")
    _use_cpu_devices(args.num_devices)
    from aurora_loop.compile_cache import enable_compile_cache

    enable_compile_cache(args.compile_cache)
    from aurora_loop.datasets.storage import parse_storage_options
    from aurora_loop.inference.forecast import forecast_from_checkpoint

    result = forecast_from_checkpoint(
        checkpoint=args.checkpoint,
        init=args.init,
        steps=args.steps,
        out=args.out,
        dataset_path=args.dataset_path,
        static_path=args.static_path,
        model=args.model,
        member=args.member,
        batch_size=args.batch_size,
        num_devices=args.num_devices,
        space=args.space_parallel,
        zarr_format=args.zarr_format,
        overwrite=args.overwrite,
        progress=args.progress,
        weights=args.weights,
        overrides={k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None},
        fine_lead_times=args.fine_lead_times,
        ensemble_members=args.ensemble_members,
        seed=args.seed,
        storage_options=parse_storage_options(args.storage_options) if args.storage_options is not None else None,
        cache_dir=args.cache_dir,
    )
    hours = result.leads / np.timedelta64(1, "h")
    members = f" x {result.members} member(s) along 'number'" if result.members is not None else ""
    print(
        f"Wrote {result.count} forecast(s){members} of {args.steps} step(s) of {result.step_hours:g} h "
        f"({hours.size} lead time(s), {hours[0]:g} h to {hours[-1]:g} h) to {result.path}"
    )
    if result.stochastic and result.members is None:
        print(
            f"Note: the model is stochastic: this is one draw of its noise (member 0 of --seed {result.seed}); "
            "pass --ensemble_members M for an ensemble"
        )
    print(f"Score them with: aurora-loop evaluate {result.path} --truth STORE --out REPORT_DIR")
    return 0
