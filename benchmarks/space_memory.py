"""Memory per device, communication and projected step time of one example split over devices.

    python benchmarks/space_memory.py [--model aurora] [--grid 721x1440] [--spaces 1,2,4,8]
                                      [--precision bf16-mixed] [--no-fsdp]

For each ``space`` size N, compiles the trainer's train step (``aurora-train --estimate_memory``'s
way: abstract parameters, ``aurora_loop.cli.memory``) of the 1.3 B ``aurora`` preset with
``--remat`` on N simulated devices with ``--space_parallel N``, batch 1 (one example over all N
devices), with and without ``--fsdp`` (which then shards the parameters and Adam moments over
all N). From the compiled, SPMD-partitioned program it prints per device: argument and
temporary bytes; hardware FLOPs (``cost_analysis``); every collective by kind with the bytes
a ring moves per device (``benchmarks/scaling.py``'s model: all-reduce 2(p-1)/p N, all-gather,
reduce-scatter and all-to-all (p-1)/p N, collective-permute N); how many times XLA's SPMD
partitioner warned that it replicated an array to reshard it ("Involuntary full
rematerialization": zero is the goal); and the step time projected for one node of H100s on
NVLink (the scaling section's assumptions: 40 % of 989 TFLOP/s, 315 GB/s effective, 20 us
per collective), without and with overlap. The last line is
``space_memory_ratio=<(argument + temp) per device with space 4 (FSDP) over space 1>``.

Compiling the 1.3 B model at 0.25° takes 1-5 minutes per configuration on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_FLOPS, ACHIEVED = 989e12, 0.40  # H100 SXM dense bf16; the fraction the scaling section assumes
NVLINK_BYTES_PER_S, ALPHA_S = 315e9, 20e-6  # 450 GB/s each way at 70 %; latency per collective within a node


@contextlib.contextmanager
def captured_stderr():
    """The process's stderr (file descriptor 2: XLA's C++ warnings) into a temporary file."""
    with tempfile.TemporaryFile(mode="w+") as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        holder: list[str] = []
        try:
            yield holder
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            holder.append(tmp.read())


def measure(model: str, grid: str, space: int, fsdp: bool, precision: str) -> dict:
    import jax

    from aurora_loop.cli.memory import _devices, _loader
    from aurora_loop.cli.train import optimizer_for, step_settings
    from aurora_loop.config import TrainingConfig, validate
    from aurora_loop.memory.estimate import compile_step
    from aurora_loop.task import make_task
    from aurora_loop.trainer import Trainer

    config = TrainingConfig(model=model, precision=precision, remat=True, num_gpus=space, space_parallel=space, fsdp=fsdp,
                            batch_size=1, estimate_memory=True, estimate_grid=grid)
    validate(config)
    mesh, _ = _devices(config)
    loader, _ = _loader(config)
    task = make_task(config.model, config)
    _, groups, optimizer = optimizer_for(config, 1000)
    step, state, batch = Trainer(mesh=mesh, **step_settings(config, optimizer, groups)).abstract_train_step(task, loader)
    from benchmarks.scaling import collective_stats

    with captured_stderr() as err:
        compiled, seconds = compile_step(step, state, batch)
    analysis = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    stats = collective_stats(compiled.as_text(), space)
    traffic = sum(s["traffic"] for s in stats.values())
    count = sum(int(s["count"]) for s in stats.values())
    compute = float(cost.get("flops", 0.0)) / (PEAK_FLOPS * ACHIEVED)
    comm = traffic / NVLINK_BYTES_PER_S + count * ALPHA_S
    del jax
    return {"space": space, "fsdp": fsdp, "argument": int(analysis.argument_size_in_bytes), "temp": int(analysis.temp_size_in_bytes),
            "flops": float(cost.get("flops", 0.0)), "collectives": stats, "traffic": traffic, "count": count,
            "replicated": err[0].count("Involuntary full rematerialization"), "compute_s": compute, "comm_s": comm,
            "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="aurora")
    parser.add_argument("--grid", default="721x1440")
    parser.add_argument("--spaces", default="1,2,4,8", help="comma list of space sizes (1 is the baseline)")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--no-fsdp", action="store_true", help="only the replicated parameters")
    args = parser.parse_args(argv)
    spaces = [int(v) for v in args.spaces.split(",")]
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(max(spaces)))
    import jax

    gib = 2**30
    print(f"# {args.model}, {args.grid}, {args.precision}, remat, 1 example over N devices; {jax.default_backend()}, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}", flush=True)
    print("space fsdp  argument GiB  temp GiB  total GiB  replicated  collectives  traffic GB/dev  TFLOP/dev  "
          "t_compute s  t_comm s  step s (no overlap / overlap)", flush=True)
    results = {}
    for space in spaces:
        for fsdp in (False, True):
            if (fsdp and (space == 1 or args.no_fsdp)):
                continue
            r = measure(args.model, args.grid, space, fsdp, args.precision)
            results[(space, fsdp)] = r
            kinds = ", ".join(f"{k} {int(v['count'])}" for k, v in r["collectives"].items() if v["count"])
            print(f"{space:5d} {'yes' if fsdp else 'no ':4s} {r['argument'] / gib:12.2f} {r['temp'] / gib:9.2f} "
                  f"{(r['argument'] + r['temp']) / gib:10.2f} {r['replicated']:11d}  {r['count']:11d}  {r['traffic'] / 1e9:13.2f}  "
                  f"{r['flops'] / 1e12:9.1f}  {r['compute_s']:11.3f}  {r['comm_s']:8.3f}  "
                  f"{r['compute_s'] + r['comm_s']:.3f} / {max(r['compute_s'], r['comm_s']):.3f}   ({kinds}; compiled in {r['seconds']:.0f} s)",
                  flush=True)
    base = results[(1, False)]
    key = (4, not args.no_fsdp) if (4, not args.no_fsdp) in results else max(results)
    total = lambda r: r["argument"] + r["temp"]  # noqa: E731
    for (space, fsdp), r in results.items():
        print(f"space_memory_ratio[{space}{',fsdp' if fsdp else ''}]={total(r) / total(base):.3f}")
    print(f"space_memory_ratio={total(results[key]) / total(base):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
