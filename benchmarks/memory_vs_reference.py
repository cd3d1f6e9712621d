"""Memory per example: our compiled train step against the PyTorch reference, same work.

    python benchmarks/memory_vs_reference.py --reference-python /path/to/refvenv/bin/python
        [--grid 256 512] [--levels 13] [--remat-policy inputs|dots] [--level-chunk-tokens N]

AuroraSmall (``aurora.AuroraSmallPretrained(use_lora=False)``), batch 1, float32, activation
checkpointing on both sides, random inputs on an H x W grid with the first ``--levels``
standard pressure levels.

- The reference (in its own venv; ``pip install torch==2.14.1 torchvision==0.29.1
  microsoft-aurora``), with ``configure_activation_checkpointing()``: the rise of the
  process's peak resident memory (``ru_maxrss``) over the loaded model and batch across one
  forward + backward, gradients included.
- Ours: the trainer's whole train step (forward, backward, AdamW update; the state
  donated), compiled on abstract parameters as ``benchmarks/memory.py`` does, with
  ``--remat``; its ``temp`` bytes (``compiled.memory_analysis()``): activations kept for
  the backward pass, gradients and the update's temporaries. Parameters, Adam moments and
  the batch are the arguments, the counterpart of the reference's loaded model.

Both in one run; the last line is ``ours_over_reference=<our temp bytes / the reference's
rise>`` (without ``--reference-python``, ``ours_temp_gib=<ours>``). Before it, the breakdown of our peak by part (``aurora_loop.memory``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")

from step_time import LEVELS, TORCH_SETUP  # noqa: E402

TORCH_MEMORY = TORCH_SETUP + r'''
import gc, resource
gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step(False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rise_bytes": (after - before) * 1024, "loaded_bytes": before * 1024, "torch": torch.__version__}))
'''


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", help="Python of a venv with the PyTorch reference installed (without it: our side only)")
    parser.add_argument("--grid", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    parser.add_argument("--levels", type=int, default=13, help="pressure levels (the first N standard ones)")
    parser.add_argument("--remat-policy", default="inputs", choices=("inputs", "dots"))
    parser.add_argument("--level-chunk-tokens", type=int, default=None, help="AuroraConfig.level_chunk_tokens (default: the model's)")
    return parser.parse_args(argv)


def reference_rise(python: str, grid: tuple[int, int], levels: tuple[int, ...]) -> dict:
    payload = json.dumps({"h": grid[0], "w": grid[1], "levels": levels, "bf16": False, "remat": True})
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(TORCH_MEMORY)
        script = f.name
    try:
        out = subprocess.run([python, script, payload], check=True, capture_output=True, text=True)
    finally:
        os.unlink(script)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ours(args: argparse.Namespace, levels: tuple[int, ...]) -> tuple[object, list[str]]:
    """(the estimate of our compiled step, the lines of its breakdown): what
    ``aurora-train --model small --remat --estimate_memory --estimate_grid HxW`` reports."""
    from aurora_loop.cli.memory import estimate_config
    from aurora_loop.config import TrainingConfig
    from aurora_loop.memory import format_breakdown

    kwargs = None if args.level_chunk_tokens is None else {"level_chunk_tokens": args.level_chunk_tokens}
    config = TrainingConfig(model="small", precision="fp32", remat=True, remat_policy=args.remat_policy, batch_size=1, num_gpus=1,
                            levels=levels, estimate_memory=True, estimate_grid=f"{args.grid[0]}x{args.grid[1]}", model_kwargs=kwargs)
    report, _, _ = estimate_config(config)
    return report, list(format_breakdown(report.breakdown))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = LEVELS[: args.levels]
    h, w = args.grid
    print(f"# AuroraSmall, {h}x{w} grid, {len(levels)} levels, batch 1, float32, activation checkpointing "
          f"(ours: --remat_policy {args.remat_policy})", flush=True)
    reference = None
    if args.reference_python:
        reference = reference_rise(args.reference_python, (h, w), levels)
        print(f"reference (torch {reference['torch']}): peak resident memory over the loaded model "
              f"{reference['loaded_bytes'] / 2**30:.3f} GiB rises by {reference['rise_bytes'] / 2**30:.3f} GiB "
              f"across one forward + backward", flush=True)
    report, lines = ours(args, levels)
    print(f"ours: argument {report.argument / 2**30:.3f} GiB, temp {report.temp / 2**30:.3f} GiB "
          f"(compiled in {report.compile_seconds:.0f} s)")
    for line in lines:
        print("  " + line)
    if reference is None:
        print(f"ours_temp_gib={report.temp / 2**30:.3f}")
    else:
        print(f"ours_over_reference={report.temp / reference['rise_bytes']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
