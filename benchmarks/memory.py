"""Per-device memory of Aurora's training step, replicated on 1 device vs FSDP on 4.

    python benchmarks/memory.py [--model aurora|small|tiny] [--grid H W] [--levels N]
                                [--no-remat] [--no-bf16] [--no-lora] [--breakdown]
                                [--precision fp32|bf16-mixed|bf16-params|all] [--devices N]

Compiles the trainer's whole training step (forward, backward, AdamW update; the state
donated) of the chosen Aurora configuration -- by default the 1.3 B ``aurora`` preset, with
LoRA, rematerialisation and a bfloat16 backbone (float32 master weights) -- without ever
materialising the parameters, exactly as ``aurora-train --estimate_memory`` does
(``aurora_loop.cli.memory.estimate_config``: abstract train state and batch,
``jit(...).lower(...).compile()``). Two layouts:

- 1 device, batch 1: everything on one device;
- 4 simulated CPU devices, global batch 4 (1 per device), ``--fsdp``: parameters and Adam
  moments split over the ``data`` axis (``aurora_loop.step.state_shardings(fsdp=True)``).

For each it prints the per-device ``argument`` (parameters + optimizer state + batch) and
``temp`` bytes of ``compiled.memory_analysis()`` (with ``--breakdown``, also where the
temporaries peak, by part: ``aurora_loop.memory``); the last line is
``fsdp_memory_ratio=<(argument + temp) per device, 4-device FSDP / 1-device>``.

Precision (``--precision``, the trainer's policies; ``aurora_loop.step.StepOptions``):
``fp32`` (float32 parameters and compute, ``autocast=False``), ``bf16-mixed`` (float32
parameters, the model's bfloat16 backbone, ``autocast=True``) or ``bf16-params`` (the step
casts the floating parameters to bfloat16 for the forward and backward pass,
``StepOptions(compute_dtype=bfloat16)``, with ``autocast=True``; the optimizer updates the
float32 masters). ``--no-bf16`` is ``--precision fp32`` (it may not be combined with another
policy). ``--precision all`` compiles every policy in one process, on 1 device and (unless
``--devices 1``) on the FSDP mesh, prints each one's per-device argument and temp bytes,
``fsdp_memory_ratio[<policy>]``, ``precision_temp_ratio ...`` and, last,
``precision_memory_ratio bf16-mixed/fp32=<r> bf16-params/fp32=<r>``: (argument + temp) per
device on 1 device over fp32's. Parameters, Adam moments and the batch are float32 under
every policy, so the argument bytes are the same and the policies differ in temp bytes.

The figures below were measured before issue 26 (its memory cuts and the switch of this
script to the estimate's code path); docs/performance.md ("Memory per example") has the
current ones at 0.25°.

Measured (2 CPU cores shared with other jobs, jax 0.10; XLA:CPU's handling of bfloat16
says little about a GPU's, so rerun there before drawing conclusions):
``--model tiny --grid 32 64 --levels 4 --precision all`` (remat; 9e5 parameters, so the
batch dominates): FSDP argument+temp per device fp32 0.0076, bf16-mixed 0.0073,
bf16-params 0.0067 GiB; fsdp_memory_ratio[fp32]=0.515, [bf16-mixed]=0.490,
[bf16-params]=0.432; precision_memory_ratio_fsdp bf16-mixed/fp32=0.959
bf16-params/fp32=0.885; precision_temp_ratio bf16-mixed/fp32=1.023 bf16-params/fp32=1.181;
``precision_memory_ratio bf16-mixed/fp32=1.007 bf16-params/fp32=1.054``.
``--model small --grid 64 128 --levels 4 --devices 1 --precision all`` (remat, 1.128e8
parameters): argument 1.263 GiB for all; temp fp32 0.185, bf16-mixed 0.186, bf16-params
0.365 GiB (presumably the bfloat16 copy of the weights and gradients on top of
the float32 ones here); precision_temp_ratio bf16-mixed/fp32=1.005 bf16-params/fp32=1.973;
``precision_memory_ratio bf16-mixed/fp32=1.001 bf16-params/fp32=1.124``.

Measured (2 CPU cores, jax 0.10, defaults: 1.3 B ``aurora``, 64 x 128, 4 levels, LoRA,
remat, bf16 backbone; 3 and 7 minutes of compilation): 1.259e9 parameters; 1 device:
argument 14.07 GiB + temp 0.54 GiB = 14.61 GiB; 4 devices with FSDP: argument 3.52 GiB +
temp 0.86 GiB = 4.38 GiB per device; fsdp_argument_ratio=0.250, fsdp_temp_ratio=1.613,
fsdp_memory_ratio=0.300. (With ``nn.remat`` on the encoder and decoder: temp 0.65 and
0.90 GiB, ratio 0.301. Before the Swin padding-free projections: 1.01 GiB and 0.307. Before the Swin blocks' remat waited for their cotangents,
``swin.remat_after_cotangent``: temp 8.36 and 5.56 GiB, ratio 0.405; with it but with the
roll-out's outer ``jax.checkpoint`` also around one-step roll-outs: 0.86 and 1.70 GiB,
ratio 0.350.)
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

PRECISIONS = ("fp32", "bf16-mixed", "bf16-params")  # aurora_loop.step.PRECISION_COMPUTE_DTYPES (importing it starts jax)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="aurora", help="Aurora preset: aurora (1.3 B), small, tiny")
    parser.add_argument("--grid", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--levels", type=int, default=4, help="pressure levels (the first N standard ones)")
    parser.add_argument("--devices", type=int, default=4, help="devices of the FSDP mesh")
    parser.add_argument("--no-remat", action="store_true", help="keep all activations (no per-block remat)")
    parser.add_argument("--no-bf16", action="store_true", help="float32 backbone (same as --precision fp32)")
    parser.add_argument("--no-lora", action="store_true", help="the preset without LoRA adapters")
    parser.add_argument("--breakdown", action="store_true", help="also where the temporaries peak, by part (aurora_loop.memory)")
    parser.add_argument("--precision", choices=(*PRECISIONS, "all"), default=None,
                        help="training precision policy, or all of them in one run (default: bf16-mixed, "
                             "or fp32 with --no-bf16)")
    args = parser.parse_args(argv)
    if args.no_bf16 and args.precision not in (None, "fp32"):
        parser.error(f"--no-bf16 means --precision fp32 and contradicts --precision {args.precision}")
    if args.precision is None:
        args.precision = "fp32" if args.no_bf16 else "bf16-mixed"
    return args


def measure_config(model: str, grid: tuple[int, int], levels: int, devices: int, fsdp: bool, precision: str, remat: bool,
                   lora: bool = True, breakdown: bool = False) -> dict:
    """The trainer's train step for this configuration, compiled on abstract state with one
    example per device, as ``aurora-train --estimate_memory`` compiles it
    (``aurora_loop.cli.memory.estimate_config``): its per-device bytes."""
    from aurora_loop.cli.memory import estimate_config
    from aurora_loop.config import TrainingConfig
    from aurora_loop.model.normalisation import STANDARD_LEVELS

    config = TrainingConfig(model=model, precision=precision, remat=remat, num_gpus=devices, fsdp=fsdp, batch_size=devices,
                            levels=tuple(int(v) for v in STANDARD_LEVELS[:levels]), estimate_memory=True,
                            estimate_grid=f"{grid[0]}x{grid[1]}", model_kwargs=None if lora else {"use_lora": False})
    report, _, _ = estimate_config(config, breakdown=breakdown)
    return {"argument": report.argument, "temp": report.temp, "output": report.output, "alias": report.alias,
            "compile_s": report.compile_seconds, "params_bytes": report.params, "report": report}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from aurora_loop.memory import format_breakdown

    if len(jax.devices()) < args.devices:
        raise SystemExit(f"need {args.devices} devices, have {len(jax.devices())} (set JAX_NUM_CPU_DEVICES before jax starts)")
    if args.precision == "all":
        return compare_precisions(args)
    print(f"# Aurora {args.model}, {args.grid[0]}x{args.grid[1]} grid, {args.levels} levels, 1 example per device, "
          f"remat={not args.no_remat}, precision={args.precision}, use_lora={not args.no_lora}; "
          f"{jax.default_backend()}, {os.cpu_count()} CPUs", flush=True)
    results = {}
    for name, n, fsdp in (("1 device", 1, False), (f"{args.devices} devices FSDP", args.devices, True)):
        r = measure_config(args.model, tuple(args.grid), args.levels, n, fsdp, args.precision, not args.no_remat, not args.no_lora,
                           breakdown=args.breakdown)
        results[name] = r
        total = r["argument"] + r["temp"]
        print(f"{name}: per-device parameters={r['params_bytes'] / 2**30:.3f} GiB  argument={r['argument'] / 2**30:.3f} GiB  "
              f"temp={r['temp'] / 2**30:.3f} GiB  argument+temp={total / 2**30:.3f} GiB  (compile {r['compile_s']:.0f} s)", flush=True)
        if args.breakdown:
            for line in format_breakdown(r["report"].breakdown, top=10):
                print("  " + line, flush=True)
    one, many = results.values()
    print(f"fsdp_argument_ratio={many['argument'] / one['argument']:.3f}")
    print(f"fsdp_temp_ratio={many['temp'] / one['temp']:.3f}")
    print(f"fsdp_memory_ratio={(many['argument'] + many['temp']) / (one['argument'] + one['temp']):.3f}")
    return 0


def compare_precisions(args: argparse.Namespace) -> int:
    """``--precision all``: every policy's compiled step, on 1 device and (with ``--devices``
    above 1) on the FSDP mesh, in one process; the last line is ``precision_memory_ratio``."""
    import jax

    layouts = [("1 device", 1, False)]
    if args.devices > 1:
        layouts.append((f"{args.devices} devices FSDP", args.devices, True))
    print(f"# Aurora {args.model}, {args.grid[0]}x{args.grid[1]} grid, {args.levels} levels, 1 example per device, "
          f"remat={not args.no_remat}, precisions {', '.join(PRECISIONS)}; {jax.default_backend()}, {os.cpu_count()} CPUs", flush=True)
    results: dict[str, dict[str, dict]] = {}
    for precision in PRECISIONS:
        for name, n, fsdp in layouts:
            r = measure_config(args.model, tuple(args.grid), args.levels, n, fsdp, precision, not args.no_remat, not args.no_lora)
            results.setdefault(precision, {})[name] = r
            print(f"{precision} {name}: per-device parameters={r['params_bytes'] / 2**30:.4f} GiB  argument={r['argument'] / 2**30:.4f} GiB  "
                  f"temp={r['temp'] / 2**30:.4f} GiB  argument+temp={(r['argument'] + r['temp']) / 2**30:.4f} GiB  "
                  f"(compile {r['compile_s']:.0f} s)", flush=True)

    def total(r: dict) -> int:
        return r["argument"] + r["temp"]

    if len(layouts) > 1:
        for precision, by_layout in results.items():
            one, many = by_layout.values()
            print(f"fsdp_memory_ratio[{precision}]={total(many) / total(one):.3f}")
        fsdp_name = layouts[1][0]
        print("precision_memory_ratio_fsdp " + " ".join(
            f"{p}/fp32={total(results[p][fsdp_name]) / total(results['fp32'][fsdp_name]):.3f}" for p in PRECISIONS[1:]))
    print("precision_temp_ratio " + " ".join(
        f"{p}/fp32={results[p]['1 device']['temp'] / results['fp32']['1 device']['temp']:.3f}" for p in PRECISIONS[1:]))
    print("precision_memory_ratio " + " ".join(
        f"{p}/fp32={total(results[p]['1 device']) / total(results['fp32']['1 device']):.3f}" for p in PRECISIONS[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
