"""Compile time of Aurora's train step: the first compile, and a rerun served by the cache.

    python benchmarks/compile_time.py [--model small|tiny|aurora] [--grid H W] [--levels N] [--repeats 3]

A rerun, a resume after a preemption and the next run with the same shapes start in a new
process, so the measurement does too: each round starts a fresh child process with an empty
persistent compilation cache (``aurora_loop.compile_cache``) and times ``lower`` plus
``compile`` of the real train step (forward, backward, AdamW; the trainer's
``make_train_step``, LoRA off, float32), then a second child process with the cache the
first one filled. Rounds alternate first/rerun, and the medians are printed, with
``rerun_over_first=<r>`` last.

Measured (2 CPU cores, jax 0.10.2, AuroraSmall, 64 x 128, 13 levels, batch 1, 3 rounds):
see the README's "Performance" section for the figures of the latest run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

STANDARD_LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", help="Aurora preset: tiny, small, aurora")
    parser.add_argument("--grid", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--levels", type=int, default=13, help="pressure levels (the first N standard ones)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (first compile, rerun compile)")
    parser.add_argument("--child", metavar="CACHE_DIR", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def compile_once(args: argparse.Namespace, cache_dir: str) -> tuple[float, float]:
    """Seconds to trace and lower the train step, and to compile it (or load it from the
    persistent cache in ``cache_dir``)."""
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    from aurora_loop.compile_cache import enable_compile_cache

    enable_compile_cache(cache_dir)
    import jax
    import optax
    from jax.sharding import NamedSharding

    from aurora_loop.model import AuroraConfig
    from aurora_loop.parallel import make_mesh
    from aurora_loop.step import make_init_fn, make_train_step, state_shardings
    from aurora_loop.tasks.aurora import AuroraTask
    from benchmarks._abstract_step import make_sample

    config = AuroraConfig.preset(args.model, use_lora=False)
    levels = STANDARD_LEVELS[: args.levels]
    task = AuroraTask(config)
    mesh = make_mesh(1)
    sample = make_sample(config, tuple(args.grid), levels, batch=1)
    task.setup(sample)
    optimizer = optax.adamw(1e-4)
    init_fn = make_init_fn(task, optimizer, seed=0)
    abstract = jax.eval_shape(init_fn, sample)
    shardings = state_shardings(abstract, mesh)
    batch_sharding = jax.tree.map(lambda spec: NamedSharding(mesh, spec), sample.partition_specs("data"))
    step = make_train_step(task, optimizer, shardings, batch_sharding, mesh)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    abstract_batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sample, batch_sharding)
    start = time.perf_counter()
    lowered = step.lower(abstract_state, abstract_batch)
    traced = time.perf_counter()
    lowered.compile()
    return traced - start, time.perf_counter() - traced


def child(args: argparse.Namespace, cache_dir: str) -> tuple[float, float]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--grid", *map(str, args.grid),
               "--levels", str(args.levels), "--child", cache_dir]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    record = json.loads(out.strip().splitlines()[-1])
    return float(record["lower_s"]), float(record["compile_s"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        lower_s, compile_s = compile_once(args, args.child)
        print(json.dumps({"lower_s": lower_s, "compile_s": compile_s}), flush=True)
        return 0
    runs: dict[str, list[tuple[float, float]]] = {"first": [], "rerun": []}
    for round_ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="aurora-compile-cache-") as cache:
            runs["first"].append(child(args, cache))
            runs["rerun"].append(child(args, cache))
        (fl, fc), (rl, rc) = runs["first"][-1], runs["rerun"][-1]
        print(f"round {round_ + 1}: first: trace+lower {fl:.2f} s + compile {fc:.2f} s; "
              f"rerun: trace+lower {rl:.2f} s + cache load {rc:.2f} s", flush=True)
    total = {k: statistics.median(lo + co for lo, co in v) for k, v in runs.items()}
    lower = {k: statistics.median(lo for lo, _ in v) for k, v in runs.items()}
    print(f"Aurora {args.model}, {args.grid[0]}x{args.grid[1]}, {args.levels} levels, batch 1, float32, train step "
          f"(medians of {args.repeats})")
    print(f"first_compile_s={total['first']:.2f} (trace+lower {lower['first']:.2f}) "
          f"rerun_compile_s={total['rerun']:.2f} (trace+lower {lower['rerun']:.2f})")
    print(f"rerun_over_first={total['rerun'] / total['first']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
