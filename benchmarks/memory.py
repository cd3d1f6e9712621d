"""Per-device memory of Aurora's training step, replicated on 1 device vs FSDP on 4.

    python benchmarks/memory.py [--model aurora|small|tiny] [--grid H W] [--levels N]
                                [--no-remat] [--no-bf16]

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="aurora", help="Aurora preset: aurora (1.3 B), small, tiny")
    parser.add_argument("--grid", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--levels", type=int, default=4, help="pressure levels (the first N standard ones)")
    parser.add_argument("--devices", type=int, default=4, help="devices of the FSDP mesh")
    parser.add_argument("--no-remat", action="store_true", help="keep all activations (no per-block remat)")
    parser.add_argument("--no-bf16", action="store_true", help="float32 backbone")
    return parser.parse_args(argv)


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


def measure(task, config, args, levels, num_devices: int, fsdp: bool) -> dict:
    import jax
    import optax
    from jax.sharding import NamedSharding

    from aurora_loop.parallel import make_mesh
    from aurora_loop.step import make_init_fn, make_train_step, state_shardings

    mesh = make_mesh(num_devices)
    sample = make_sample(config, tuple(args.grid), levels, batch=num_devices)
    optimizer = optax.adamw(1e-4)
    init_fn = make_init_fn(task, optimizer, seed=0)
    abstract = jax.eval_shape(init_fn, sample)  # shapes only: no parameter is materialised
    shardings = state_shardings(abstract, mesh, fsdp=fsdp)
    batch_sharding = jax.tree.map(lambda spec: NamedSharding(mesh, spec), sample.partition_specs("data"))
    step = make_train_step(task, optimizer, shardings, batch_sharding, mesh)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    abstract_batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sample, batch_sharding)
    t0 = time.perf_counter()
    compiled = step.lower(abstract_state, abstract_batch).compile()
    compile_s = time.perf_counter() - t0
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
    config = AuroraConfig.preset(args.model, remat=not args.no_remat, autocast=not args.no_bf16)
    task = AuroraTask(config, name=args.model)
    print(f"# Aurora {args.model}, {args.grid[0]}x{args.grid[1]} grid, {len(levels)} levels, 1 example per device, "
          f"remat={config.remat}, bf16 backbone={config.autocast}, use_lora={config.use_lora}; "
          f"{jax.default_backend()}, {os.cpu_count()} CPUs", flush=True)
    results = {}
    for name, n, fsdp in (("1 device", 1, False), (f"{args.devices} devices FSDP", args.devices, True)):
        r = measure(task, config, args, levels, n, fsdp)
        results[name] = r
        total = r["argument"] + r["temp"]
        print(f"{name}: params={r['params'] / 1e9:.3f}e9  per-device argument={r['argument'] / 2**30:.3f} GiB  "
              f"temp={r['temp'] / 2**30:.3f} GiB  argument+temp={total / 2**30:.3f} GiB  (compile {r['compile_s']:.0f} s)", flush=True)
    one, many = results.values()
    print(f"fsdp_argument_ratio={many['argument'] / one['argument']:.3f}")
    print(f"fsdp_temp_ratio={many['temp'] / one['temp']:.3f}")
    print(f"fsdp_memory_ratio={(many['argument'] + many['temp']) / (one['argument'] + one['temp']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
