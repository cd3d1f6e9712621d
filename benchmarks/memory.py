"""Per-device memory of Aurora's training step, replicated on 1 device vs FSDP on 4.

    python benchmarks/memory.py [--model aurora|small|tiny] [--grid H W] [--levels N]
                                [--no-remat] [--no-bf16]
                                [--precision fp32|bf16-mixed|bf16-params|all] [--devices N]

Compiles the whole training step (forward, backward, AdamW update; the state donated) of
the chosen Aurora configuration -- by default the 1.3 B ``aurora`` preset, with LoRA,
per-Swin-block rematerialisation and a bfloat16 backbone (float32 master weights) -- on a
small grid, without ever materialising the parameters (``jax.eval_shape`` gives the abstract
train state; ``jit(...).lower(...).compile()`` needs only shapes). Two layouts:

- 1 device, batch 1: everything on one device;
- 4 simulated CPU devices, global batch 4 (1 per device), ``--fsdp``: parameters and Adam
  moments split over the ``data`` axis (``aurora_loop.step.state_shardings(fsdp=True)``).

For each it prints the per-device ``argument`` (parameters + optimizer state + batch) and
``temp`` bytes of ``compiled.memory_analysis()``; the last line is
``fsdp_memory_ratio=<(argument + temp) per device, 4-device FSDP / 1-device>``.

Precision (``--precision``, the trainer's policies; ``aurora_loop.step.StepOptions``):
``fp32`` (float32 parameters and compute, ``autocast=False``), ``bf16-mixed`` (float32
parameters, the model's bfloat16 backbone, ``autocast=True``) or ``bf16-params`` (the step
casts the floating parameters to bfloat16 for the forward and backward pass,
``StepOptions(compute_dtype=bfloat16)``, with ``autocast=True``; the optimizer updates the
float32 masters). The default stays ``bf16-mixed`` -- the output above, unchanged --
since ``all`` on the 1.3 B default would triple its ten minutes of compilation and end on
another line; ``--no-bf16`` is ``--precision fp32`` (it may not be combined with another
policy). ``--precision all`` compiles every policy in one process, on 1 device and (unless
``--devices 1``) on the FSDP mesh, prints each one's per-device argument and temp bytes,
``fsdp_memory_ratio[<policy>]``, ``precision_temp_ratio ...`` and, last,
``precision_memory_ratio bf16-mixed/fp32=<r> bf16-params/fp32=<r>``: (argument + temp) per
device on 1 device over fp32's. Parameters, Adam moments and the batch are float32 under
every policy, so the argument bytes are the same and the policies differ in temp bytes.

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
import time

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
    parser.add_argument("--precision", choices=(*PRECISIONS, "all"), default=None,
                        help="training precision policy, or all of them in one run (default: bf16-mixed, "
                             "or fp32 with --no-bf16)")
    args = parser.parse_args(argv)
    if args.no_bf16 and args.precision not in (None, "fp32"):
        parser.error(f"--no-bf16 means --precision fp32 and contradicts --precision {args.precision}")
    if args.precision is None:
        args.precision = "fp32" if args.no_bf16 else "bf16-mixed"
    return args


def make_sample(config, grid: tuple[int, int], levels: tuple[int, ...], batch: int):
    import numpy as np

    from aurora_loop.model import Batch, Metadata, Sample, stack_samples

    h, w = grid
    rng = np.random.default_rng(0)

    def one(t: int, time_h: float) -> Batch:
        return Batch(
            surf_vars={k: rng.standard_normal((1, t, h, w)).astype(np.float32) for k in config.surf_vars},
            static_vars={k: rng.standard_normal((h, w)).astype(np.float32) for k in config.static_vars},
            atmos_vars={k: rng.standard_normal((1, t, len(levels), h, w)).astype(np.float32) for k in config.atmos_vars},
            metadata=Metadata(lat=np.linspace(90, -90, h), lon=np.linspace(0, 360, w, endpoint=False),
                              time=np.array([time_h]), atmos_levels=levels),
        )

    return stack_samples([Sample(one(2, 438300.0), one(1, 438306.0)) for _ in range(batch)])


def compile_step(task, config, grid, levels, num_devices: int, fsdp: bool, precision: str) -> tuple:
    """The trainer's train step compiled on abstract state (no parameter is materialised),
    1 example per device: ``(compiled, abstract state, compile seconds)``."""
    import jax
    import optax
    from jax.sharding import NamedSharding

    from aurora_loop.parallel import make_mesh
    from aurora_loop.step import PRECISION_COMPUTE_DTYPES, StepOptions, make_init_fn, make_train_step, state_shardings

    mesh = make_mesh(num_devices)
    sample = make_sample(config, tuple(grid), levels, batch=num_devices)
    optimizer = optax.adamw(1e-4)
    init_fn = make_init_fn(task, optimizer, seed=0)
    abstract = jax.eval_shape(init_fn, sample)  # shapes only: no parameter is materialised
    shardings = state_shardings(abstract, mesh, fsdp=fsdp)
    batch_sharding = jax.tree.map(lambda spec: NamedSharding(mesh, spec), sample.partition_specs("data"))
    options = StepOptions(compute_dtype=PRECISION_COMPUTE_DTYPES[precision])
    step = make_train_step(task, optimizer, shardings, batch_sharding, mesh, options=options)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    abstract_batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sample, batch_sharding)
    t0 = time.perf_counter()
    compiled = step.lower(abstract_state, abstract_batch).compile()
    return compiled, abstract, time.perf_counter() - t0


def measure(task, config, args, levels, num_devices: int, fsdp: bool, precision: str = "bf16-mixed") -> dict:
    import jax

    compiled, abstract, compile_s = compile_step(task, config, args.grid, levels, num_devices, fsdp, precision)
    analysis = compiled.memory_analysis()
    n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    return {
        "argument": int(analysis.argument_size_in_bytes),
        "temp": int(analysis.temp_size_in_bytes),
        "output": int(analysis.output_size_in_bytes),
        "alias": int(analysis.alias_size_in_bytes),
        "compile_s": compile_s,
        "params": n_params,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from aurora_loop.model import AuroraConfig
    from aurora_loop.model.normalisation import STANDARD_LEVELS
    from aurora_loop.tasks.aurora import AuroraTask

    if len(jax.devices()) < args.devices:
        raise SystemExit(f"need {args.devices} devices, have {len(jax.devices())} (set JAX_NUM_CPU_DEVICES before jax starts)")
    levels = tuple(STANDARD_LEVELS[: args.levels])
    if args.precision == "all":
        return compare_precisions(args, levels)
    config = AuroraConfig.preset(args.model, remat=not args.no_remat, autocast=args.precision != "fp32")
    task = AuroraTask(config, name=args.model)
    print(f"# Aurora {args.model}, {args.grid[0]}x{args.grid[1]} grid, {len(levels)} levels, 1 example per device, "
          f"remat={config.remat}, precision={args.precision} (bf16 backbone={config.autocast}), use_lora={config.use_lora}; "
          f"{jax.default_backend()}, {os.cpu_count()} CPUs", flush=True)
    results = {}
    for name, n, fsdp in (("1 device", 1, False), (f"{args.devices} devices FSDP", args.devices, True)):
        r = measure(task, config, args, levels, n, fsdp, args.precision)
        results[name] = r
        total = r["argument"] + r["temp"]
        print(f"{name}: params={r['params'] / 1e9:.3f}e9  per-device argument={r['argument'] / 2**30:.3f} GiB  "
              f"temp={r['temp'] / 2**30:.3f} GiB  argument+temp={total / 2**30:.3f} GiB  (compile {r['compile_s']:.0f} s)", flush=True)
    one, many = results.values()
    print(f"fsdp_argument_ratio={many['argument'] / one['argument']:.3f}")
    print(f"fsdp_temp_ratio={many['temp'] / one['temp']:.3f}")
    print(f"fsdp_memory_ratio={(many['argument'] + many['temp']) / (one['argument'] + one['temp']):.3f}")
    return 0


def compare_precisions(args: argparse.Namespace, levels: tuple[int, ...]) -> int:
    """``--precision all``: every policy's compiled step, on 1 device and (with ``--devices``
    above 1) on the FSDP mesh, in one process; the last line is ``precision_memory_ratio``."""
    import jax

    from aurora_loop.model import AuroraConfig
    from aurora_loop.tasks.aurora import AuroraTask

    layouts = [("1 device", 1, False)]
    if args.devices > 1:
        layouts.append((f"{args.devices} devices FSDP", args.devices, True))
    print(f"# Aurora {args.model}, {args.grid[0]}x{args.grid[1]} grid, {len(levels)} levels, 1 example per device, "
          f"remat={not args.no_remat}, precisions {', '.join(PRECISIONS)}; {jax.default_backend()}, {os.cpu_count()} CPUs", flush=True)
    results: dict[str, dict[str, dict]] = {}
    for precision in PRECISIONS:
        config = AuroraConfig.preset(args.model, remat=not args.no_remat, autocast=precision != "fp32")
        task = AuroraTask(config, name=args.model)
        for name, n, fsdp in layouts:
            r = measure(task, config, args, levels, n, fsdp, precision)
            results.setdefault(precision, {})[name] = r
            print(f"{precision} {name}: params={r['params'] / 1e9:.4f}e9  per-device argument={r['argument'] / 2**30:.4f} GiB  "
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
