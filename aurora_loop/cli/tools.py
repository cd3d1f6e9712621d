"""``aurora-loop``: the tool box (sub-commands).

Each sub-command is a module in this package exposing ``register(subparsers)``, which adds
its parser and sets ``func=run`` where ``run(args) -> int`` returns the exit status (or
``forward(argv) -> int``, which takes the raw arguments, as ``memory`` hands them to
``aurora-train``). List a
new module in ``SUBCOMMANDS``. Modules are imported only when their command runs, so
``aurora-loop --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from aurora_loop.cli.help import HelpFormatter
from aurora_loop.errors import UsageError, report_usage_error

# command name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sample-data": ("sample_data", "write a synthetic WeatherBench2-layout Zarr store (learnable weather)"),
    "convert": ("convert", "turn NetCDF/GRIB files into a WeatherBench2-layout Zarr store"),
    "import-checkpoint": ("import_checkpoint", "convert a reference Aurora checkpoint (.ckpt/.npz/.safetensors) into encoder/backbone/decoder checkpoints"),
    "export-checkpoint": ("export_checkpoint", "write a run's checkpoint for handing on: encoder/backbone/decoder orbax weights, or the PyTorch reference's state dict (torch, safetensors, npz)"),
    "forecast": ("forecast", "roll a trained model out to a WeatherBench2 forecast Zarr store"),
    "evaluate": ("evaluate", "score a forecast store against the truth: RMSE, bias, ACC vs baselines; CSV/JSON and plots"),
    "stats": ("stats", "normalisation statistics (mean, std per variable and level) of a store, for aurora-train --stats"),
    "memory": ("memory", "will a run fit? compile aurora-train's step for its flags on abstract parameters and print the memory per device"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aurora-loop", usage="%(prog)s COMMAND [ARGS ...]", formatter_class=HelpFormatter,
                                     description="The aurora_loop tools; aurora-loop COMMAND --help tells more of each.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = build_parser()
        if argv and not argv[0].startswith("-"):
            print(f"aurora-loop: error: unknown command {argv[0]!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"aurora_loop.cli.{SUBCOMMANDS[argv[0]][0]}")
    if callable(getattr(module, "forward", None)):  # a command that takes another command's flags as they are
        return int(module.forward(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog=f"aurora-loop {argv[0]}", description=SUBCOMMANDS[argv[0]][1], formatter_class=HelpFormatter)
    module.register(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UsageError as err:
        return report_usage_error(err, prog=f"aurora-loop {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
