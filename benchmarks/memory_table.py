"""The memory table of the docs: the 1.3 B Aurora at 0.25° under every precision, remat
policy, mesh and roll-out, per device, from the compiled train steps.

    python benchmarks/memory_table.py [--out memory_table.jsonl] [--grid 721x1440] [--quick]
                                      [--model aurora] [--devices 8]

Each row is ``aurora-train --model aurora --estimate_memory --estimate_grid 721x1440`` for
one configuration (``aurora_loop.cli.memory.estimate_config``: the trainer's own step,
compiled on abstract parameters; 13 levels, one example per device, LoRA as the preset has
it): precision (fp32, bf16-mixed, bf16-params) x remat (none, inputs, dots) x mesh (1
device; 8 devices with ``--fsdp``) with one roll-out step; roll-outs of 2 and 4 steps,
``full`` and ``pushforward``, under bf16-mixed with remat; and the HRRR CONUS grid
(1059 x 1799 cropped to whole 4-point patches, 1056 x 1796, 13 levels; microsoft/aurora #99). Rows are appended to ``--out`` as JSON
lines as they finish (a rerun skips the rows already there), then printed as a Markdown
table with the cards each fits. The last line is ``rows=<n>``.

Compiling one 0.25° configuration takes 1-2 minutes on one device of a 2-core CPU and a few
more on 8 simulated devices: the whole table about an hour.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")  # the FSDP rows' mesh (--devices)

PRECISIONS = ("fp32", "bf16-mixed", "bf16-params")
REMATS = ("none", "inputs", "dots")


def rows(grid: str, quick: bool, devices: int = 8) -> list[dict]:
    """The configurations of the table, in order."""
    table = []
    meshes = ((1, False), (devices, True))
    for precision in PRECISIONS:
        for remat in REMATS:
            for devices, fsdp in meshes:
                table.append(dict(grid=grid, precision=precision, remat=remat, devices=devices, fsdp=fsdp, rollout=1, mode="full"))
    rollouts = [dict(grid=grid, precision="bf16-mixed", remat="inputs", devices=devices, fsdp=fsdp, rollout=steps, mode=mode)
                for devices, fsdp in meshes for steps in (2, 4) for mode in ("full", "pushforward")]
    regional = [dict(grid="1056x1796", precision="bf16-mixed", remat="inputs", devices=devices, fsdp=fsdp, rollout=1, mode="full")
                for devices, fsdp in meshes]
    # The 8-device roll-outs compile longest (each step unrolled on XLA:CPU): last.
    table += rollouts[:4] + regional + rollouts[4:]
    if quick:  # the rows of the goal, on the main grid
        table = [r for r in table if r["rollout"] == 1 and r["precision"] == "bf16-mixed" and r["remat"] == "inputs" and r["grid"] == grid]
    return table


def key(row: dict) -> str:
    return json.dumps({k: row[k] for k in ("model", "grid", "precision", "remat", "devices", "fsdp", "rollout", "mode")}, sort_keys=True)


def measure(row: dict) -> dict:
    from aurora_loop.cli.memory import estimate_config
    from aurora_loop.config import TrainingConfig, validate

    config = TrainingConfig(
        model=row["model"], precision=row["precision"], remat=row["remat"] != "none",
        remat_policy="inputs" if row["remat"] == "none" else row["remat"], num_gpus=row["devices"], fsdp=row["fsdp"],
        batch_size=row["devices"], rollout_steps=row["rollout"], rollout_mode=row["mode"], estimate_memory=True,
        estimate_grid=row["grid"],
    )
    validate(config)
    start = time.perf_counter()
    report, _, _ = estimate_config(config, breakdown=False)
    fit, _ = report.cards()
    return {**row, "argument": report.argument, "temp": report.temp, "total": report.total, "params": report.params,
            "optimizer": report.optimizer, "batch": report.batch, "fits": fit, "seconds": time.perf_counter() - start}


def markdown(results: list[dict]) -> list[str]:
    gib = 2**30
    lines = ["| grid | precision | remat | devices | roll-out | argument GiB | temporaries GiB | total GiB | fits |",
             "|---|---|---|---|---|---:|---:|---:|---|"]
    for r in results:
        mesh = f"{r['devices']} (FSDP)" if r["fsdp"] else str(r["devices"])
        rollout = f"{r['rollout']} ({r['mode']})" if r["rollout"] > 1 else "1"
        lines.append(f"| {r['grid']} | {r['precision']} | {r['remat']} | {mesh} | {rollout} | {r['argument'] / gib:.2f} | "
                     f"{r['temp'] / gib:.2f} | {r['total'] / gib:.2f} | {', '.join(r['fits']) or 'none'} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="memory_table.jsonl", help="JSON lines, appended as rows finish")
    parser.add_argument("--grid", default="721x1440")
    parser.add_argument("--quick", action="store_true", help="only the bf16-mixed, remat inputs, one-step rows of --grid")
    parser.add_argument("--model", default="aurora", help="Aurora preset (aurora: the 1.3 B)")
    parser.add_argument("--devices", type=int, default=8, help="devices of the FSDP rows")
    args = parser.parse_args(argv)
    done = {}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            for line in fh:
                if line.strip():
                    result = json.loads(line)
                    done[key(result)] = result
    results = []
    for row in rows(args.grid, args.quick, args.devices):
        row = {"model": args.model, **row}
        if key(row) not in done:
            result = measure(row)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(result) + "\n")
            print(f"# {key(row)}: total {result['total'] / 2**30:.2f} GiB ({result['seconds']:.0f} s)", flush=True)
            done[key(row)] = result
        results.append(done[key(row)])
    for line in markdown(results):
        print(line)
    print(f"rows={len(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
