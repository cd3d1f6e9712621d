"""One report of Aurora's training step on the machine at hand (made for one GPU).

    python benchmarks/gpu_report.py                       # AuroraSmall and Aurora 1.3 B, 721 x 1440, 13 levels
    python benchmarks/gpu_report.py --models small --reference-python /path/to/torch-venv/bin/python
    python benchmarks/gpu_report.py --models tiny --grid 32 64 --levels 4 --steps 2   # CPU smoke size (CI)

For each model: the real train step of the trainer (``make_train_step``: forward, backward,
AdamW update, the state donated; batch 1, LoRA off, per-block remat (``--remat-policy``), ``--precision``
bf16-mixed by default, i.e. float32 parameters and a bfloat16 backbone, the reference's
autocast), compiled once (the compile time is reported), then timed for ``--steps`` steps
after ``--warmup``; the median step time, the achieved TFLOP/s (FLOPs from XLA's cost
analysis of the compiled step) and the MFU against the device's peak
(``aurora_loop.callbacks.throughput.PEAK_FLOPS``), and the peak memory: the device's
``peak_bytes_in_use`` where the backend reports it (GPUs), else the compiled step's
argument + temp bytes. With ``--reference-python``, ``benchmarks/step_time.py``'s PyTorch
side times the same step of the reference in that interpreter (AuroraSmall's architecture
only) and the ratio is printed.

The last line is ``gpu_report_done models=<n> seconds=<s>``; the whole report is also
written as JSON with ``--json PATH``. Everything runs in one process, one model after the
other; the 1.3 B model needs about 40 GB at this size in bf16 with remat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

STANDARD_LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,aurora", help="comma list of Aurora presets: tiny, small, aurora")
    parser.add_argument("--grid", type=int, nargs=2, default=(721, 1440), metavar=("H", "W"))
    parser.add_argument("--levels", type=int, default=13)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="bf16-mixed", choices=("fp32", "bf16-mixed", "bf16-params"))
    parser.add_argument("--no-remat", action="store_true")
    parser.add_argument("--remat-policy", default="inputs", choices=("inputs", "dots"),
                        help="what each rematerialised block keeps (aurora-train --remat_policy)")
    parser.add_argument("--reference-python", help="Python of a venv with torch and microsoft-aurora")
    parser.add_argument("--json", help="also write the report here")
    return parser.parse_args(argv)


def peak_memory_bytes(device, compiled) -> tuple[int, str]:
    """(bytes, what they are): the device's peak in use when it reports one, else the
    compiled step's argument + temp bytes."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("peak_bytes_in_use"):
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    analysis = compiled.memory_analysis()
    return int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes), "compiled argument + temp"


def measure(model: str, args: argparse.Namespace) -> dict:
    """Compile and time one model's train step; returns its figures."""
    import jax
    import numpy as np
    import optax
    from jax.sharding import NamedSharding

    from aurora_loop.callbacks.throughput import _flops_of, peak_flops
    from aurora_loop.model import AuroraConfig
    from aurora_loop.parallel import make_mesh
    from aurora_loop.step import PRECISION_COMPUTE_DTYPES, StepOptions, make_init_fn, make_train_step, state_shardings
    from aurora_loop.tasks.aurora import AuroraTask
    from benchmarks._abstract_step import make_sample

    config = AuroraConfig.preset(model, use_lora=False, autocast=args.precision != "fp32", remat=not args.no_remat,
                                 remat_policy=args.remat_policy)
    levels = STANDARD_LEVELS[: args.levels]
    task = AuroraTask(config)
    mesh = make_mesh(1)
    device = mesh.devices.reshape(-1)[0]
    host = make_sample(config, tuple(args.grid), levels, batch=1)
    task.setup(host)
    batch_sharding = jax.tree.map(lambda spec: NamedSharding(mesh, spec), host.partition_specs("data"))
    batch = jax.device_put(host, batch_sharding)
    optimizer = optax.adamw(1e-4)
    init_fn = make_init_fn(task, optimizer, seed=0)
    abstract = jax.eval_shape(init_fn, batch)
    shardings = state_shardings(abstract, mesh)
    options = StepOptions(compute_dtype=PRECISION_COMPUTE_DTYPES[args.precision])
    step = make_train_step(task, optimizer, shardings, batch_sharding, mesh, options=options)
    state = jax.jit(init_fn, out_shardings=shardings)(batch)

    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = _flops_of(compiled)
    peak = peak_flops(device)
    memory, memory_kind = peak_memory_bytes(device, compiled)
    return {
        "model": model,
        "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract.params))),
        "device": f"{device.platform}: {getattr(device, 'device_kind', '?')}",
        "grid": list(args.grid),
        "levels": args.levels,
        "precision": args.precision,
        "remat": args.remat_policy if not args.no_remat else False,
        "compile_s": round(compile_s, 2),
        "step_s_median": step_s,
        "flops_per_step": flops,
        "tflops_per_s": None if flops is None else flops / step_s / 1e12,
        "mfu": None if flops is None or peak is None else flops / step_s / peak,
        "peak_memory_gib": memory / 2**30,
        "peak_memory_kind": memory_kind,
        "loss": float(metrics["loss"]),
    }


def reference_step_s(python: str, args: argparse.Namespace) -> float | None:
    """The PyTorch reference's step time from ``benchmarks/step_time.py`` (AuroraSmall)."""
    from benchmarks.step_time import torch_time

    levels = STANDARD_LEVELS[: args.levels]
    ns = argparse.Namespace(grid=tuple(args.grid), steps=args.steps, warmup=args.warmup,
                            bf16=args.precision != "fp32", remat=not args.no_remat)
    result = torch_time(python, ns, levels)
    return result.get("median_s") if isinstance(result, dict) else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    started = time.perf_counter()
    report = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        figures = measure(model, args)
        if args.reference_python and model == "small":
            figures["reference_step_s"] = reference_step_s(args.reference_python, args)
            if figures["reference_step_s"]:
                figures["jax_over_torch"] = figures["step_s_median"] / figures["reference_step_s"]
        report.append(figures)
        tflops = "n/a" if figures["tflops_per_s"] is None else f"{figures['tflops_per_s']:.1f}"
        mfu = "n/a" if figures["mfu"] is None else f"{figures['mfu']:.1%}"
        print(f"{model}: {figures['parameters'] / 1e6:.0f} M parameters on {figures['device']}, "
              f"{args.grid[0]}x{args.grid[1]}, {args.levels} levels, batch 1, {args.precision}, remat={figures['remat']}: "
              f"compile {figures['compile_s']:.1f} s, step {figures['step_s_median'] * 1e3:.1f} ms (median of {args.steps}), "
              f"{tflops} TFLOP/s, MFU {mfu}, peak memory {figures['peak_memory_gib']:.2f} GiB ({figures['peak_memory_kind']})",
              flush=True)
        if "jax_over_torch" in figures:
            print(f"{model}: reference step {figures['reference_step_s'] * 1e3:.1f} ms, jax_over_torch={figures['jax_over_torch']:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    print(f"gpu_report_done models={len(report)} seconds={time.perf_counter() - started:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
