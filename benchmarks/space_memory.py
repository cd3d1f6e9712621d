"""Memory per device and communication of one example split over devices (``--space_parallel``).

    python benchmarks/space_memory.py [--model aurora] [--grid 721x1440] [--spaces 1,2,4,8]
                                      [--precision bf16-mixed] [--no-fsdp]

For each ``space`` size N, compiles the trainer's train step (``aurora-train --estimate_memory``'s
way: abstract parameters, ``aurora_loop.cli.memory.estimate_config``) of the 1.3 B ``aurora``
preset with ``--remat`` on N simulated devices with ``--space_parallel N``, batch 1 (one example
over all N devices), with and without ``--fsdp`` (which then shards the parameters and Adam
moments over all N). It prints per device: argument and temporary bytes, and from the
compiled program's HLO every collective by kind (count and the bytes its results hold per
step), and how many times XLA's SPMD partitioner warned that it had to replicate an array to
reshard it ("Involuntary full rematerialization": zero is the goal). The last line is
``space_memory_ratio=<(argument + temp) per device with space 4 (FSDP) over space 1>``.

Compiling the 1.3 B model at 0.25° takes 1-5 minutes per configuration on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"(bf16|f16|f32|f64|s32|u32|s8|u8|pred|s64|u64)\[([\d,]*)\]")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "s64": 8, "u64": 8}


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """kind -> (instructions, bytes of their results) in an optimised HLO module's text
    (asynchronous pairs counted once, at their start)."""
    out: dict[str, list[int]] = {k: [0, 0] for k in COLLECTIVES}
    for line in hlo.splitlines():
        if " = " not in line:
            continue
        rhs = line.split(" = ", 1)[1]
        for kind in COLLECTIVES:
            at = next((rhs.find(f" {kind}{suffix}(") for suffix in ("", "-start") if f" {kind}{suffix}(" in rhs), -1)
            if at < 0:
                continue
            size = 0
            for dtype, dims in _SHAPE.findall(rhs[:at]):
                n = 1
                for d in filter(None, dims.split(",")):
                    n *= int(d)
                size += n * _BYTES[dtype]
            out[kind][0] += 1
            out[kind][1] += size
            break
    return {k: (v[0], v[1]) for k, v in out.items()}


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
    with captured_stderr() as err:
        compiled, seconds = compile_step(step, state, batch)
    analysis = compiled.memory_analysis()
    del jax
    return {"space": space, "fsdp": fsdp, "argument": int(analysis.argument_size_in_bytes), "temp": int(analysis.temp_size_in_bytes),
            "collectives": collectives(compiled.as_text()), "replicated": err[0].count("Involuntary full rematerialization"),
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
    print("space fsdp  argument GiB  temp GiB  total GiB  replicated  " + "  ".join(f"{k} (n, GiB)" for k in COLLECTIVES), flush=True)
    results = {}
    for space in spaces:
        for fsdp in (False, True):
            if (fsdp and (space == 1 or args.no_fsdp)):
                continue
            r = measure(args.model, args.grid, space, fsdp, args.precision)
            results[(space, fsdp)] = r
            coll = "  ".join(f"{n:5d} {b / gib:7.3f}" for n, b in (r["collectives"][k] for k in COLLECTIVES))
            print(f"{space:5d} {'yes' if fsdp else 'no ':4s} {r['argument'] / gib:12.2f} {r['temp'] / gib:9.2f} "
                  f"{(r['argument'] + r['temp']) / gib:10.2f} {r['replicated']:11d}  {coll}   ({r['seconds']:.0f} s)", flush=True)
    base = results[(1, False)]
    key = (4, not args.no_fsdp) if (4, not args.no_fsdp) in results else max(results)
    total = lambda r: r["argument"] + r["temp"]  # noqa: E731
    for (space, fsdp), r in results.items():
        print(f"space_memory_ratio[{space}{',fsdp' if fsdp else ''}]={total(r) / total(base):.3f}")
    print(f"space_memory_ratio={total(results[key]) / total(base):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
