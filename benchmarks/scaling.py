"""FLOPs and collective traffic per device of Aurora's training step under DP and FSDP.

    python benchmarks/scaling.py [--model aurora|small|tiny] [--grid H W] [--levels N]
                                 [--devices N [N ...]] [--layouts dp fsdp] [--no-remat]
                                 [--precision fp32|bf16-mixed|bf16-params] [--tiny]

For each device count and layout it compiles the trainer's whole training step (forward,
backward, AdamW update, the state donated; ``aurora_loop.step.make_train_step`` on
``AuroraTask``, 1 example per device, as ``benchmarks/memory.py`` does it: abstract state from
``jax.eval_shape``, ``jit(...).lower(...).compile()`` on simulated CPU devices, so nothing
is materialised) and reads off the compiled, SPMD-partitioned (per-device) program:

- ``flops``: XLA's ``compiled.cost_analysis()["flops"]`` of the per-device program
  (hardware FLOPs: the rematerialised forward passes are counted; a multiply-add is 2);
- every collective in the HLO text (``all-reduce``, ``all-gather``, ``reduce-scatter``,
  ``all-to-all``, ``collective-permute``; their ``-start`` forms once): its count, its
  payload ``N`` (all-reduce: the reduced buffer; all-gather: the gathered result;
  reduce-scatter: the operand, i.e. the result times the group size ``p``; taken from the
  result shapes and dtypes and the ``replica_groups``) and the bytes a ring moves per
  device: all-reduce ``2 (p-1)/p N``, all-gather / reduce-scatter / all-to-all
  ``(p-1)/p N``, collective-permute ``N``.

Layouts: ``dp`` (parameters and Adam moments replicated, the batch split over ``data``;
XLA all-reduces the gradients) and ``fsdp`` (``state_shardings(fsdp=True)``: parameters and
moments split over ``data``; XLA all-gathers the weights where they are used and
reduce-scatters the gradients). Defaults: the 1.3 B ``aurora`` preset (LoRA on, as the
preset has it), 64 x 128 grid, 13 levels, remat, ``bf16-mixed`` (float32 parameters,
bfloat16 backbone, ``autocast=True``), 8 devices. ``--tiny``: the ``tiny`` preset with one Swin block in
each of two stages (``TINY_OVERRIDES``) on a 32 x 64 grid, 4 levels, 4 devices (seconds on a CPU; what ``tests/test_scaling_benchmark.py``
runs). Collective bytes do not depend on the grid under DP and FSDP (they move parameters
and gradients only), and FLOPs per device do not depend on the device count; see
``docs/performance.md`` for the measurements at several grids and device counts, the
extrapolation to 720 x 1440 and the projected step times on H100 / H200 clusters.

Printed: one row per (devices, layout) and then summary lines; the last line is
``fsdp_over_dp_comm_bytes=<r>``: FSDP's per-device collective bytes over DP's at the largest
device count measured (with one ``--layouts`` only: ``<layout>_comm_over_param_bytes=<r>``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

PRECISIONS = ("fp32", "bf16-mixed", "bf16-params")
# --tiny: the ``tiny`` preset with two Swin stages of one block each (half its blocks), so
# that both layouts compile in seconds
TINY_OVERRIDES = dict(encoder_depths=(1, 1), encoder_num_heads=(2, 4), decoder_depths=(1, 1), decoder_num_heads=(4, 2))

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# ring traffic per device as a multiple of the payload N, given the group size p
RING_FACTOR = {
    "all-reduce": lambda p: 2 * (p - 1) / p,
    "all-gather": lambda p: (p - 1) / p,
    "reduce-scatter": lambda p: (p - 1) / p,
    "all-to-all": lambda p: (p - 1) / p,
    "collective-permute": lambda p: 1.0,
}

_OP_RE = re.compile(r"=\s*(?P<shape>\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
                    r"(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?P<start>-start)?\(")
_ARRAY_RE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_GROUPS_LIST_RE = re.compile(r"replica_groups=\{(\{[0-9,]*\}(?:,\{[0-9,]*\})*)\}")
_GROUPS_IOTA_RE = re.compile(r"replica_groups=\[([0-9]+),([0-9]+)\]<=")
_GROUPS_MESH_RE = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")  # mesh['axis_0'=4,'axis_1'=2] {'axis_0'}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="aurora", help="Aurora preset: aurora (1.3 B), small, tiny")
    parser.add_argument("--grid", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--levels", type=int, default=13, help="pressure levels (the first N standard ones)")
    parser.add_argument("--devices", type=int, nargs="+", default=[8], help="device counts (one mesh each)")
    parser.add_argument("--layouts", nargs="+", choices=("dp", "fsdp"), default=["dp", "fsdp"])
    parser.add_argument("--no-remat", action="store_true", help="keep all activations (no per-block remat)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed")
    parser.add_argument("--tiny", action="store_true", help="tiny model, 32 x 64 grid, 4 levels, 4 devices (seconds on a CPU)")
    parser.add_argument("--dump-hlo", default=None, metavar="DIR", help="write each compiled step's HLO text here")
    args = parser.parse_args(argv)
    args.overrides = {}
    if args.tiny:
        args.model, args.grid, args.levels, args.devices = "tiny", (32, 64), 4, [4]
        args.overrides = TINY_OVERRIDES
    return args


def _group_size(line: str, num_devices: int) -> int:
    m = _GROUPS_MESH_RE.search(line)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=([0-9]+)", m.group(1))}
        size = 1
        for axis in re.findall(r"'([^']+)'", m.group(2)):
            size *= sizes[axis]
        return size
    m = _GROUPS_IOTA_RE.search(line)
    if m:
        return int(m.group(2))
    m = _GROUPS_LIST_RE.search(line)
    if m:
        first = m.group(1).split("}")[0].strip("{")
        return len([x for x in first.split(",") if x]) or num_devices
    return num_devices  # replica_groups={} : all devices


def _shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY_RE.findall(shape):
        if dtype not in DTYPE_BYTES:
            continue  # token[] and the like
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * DTYPE_BYTES[dtype]
    return total


def collective_stats(hlo_text: str, num_devices: int) -> dict[str, dict[str, float]]:
    """Per collective kind: ``count``, ``payload`` (N, bytes) and ``traffic`` (ring bytes
    moved per device) summed over the ops of the per-device HLO text. ``while`` bodies are
    counted once (``cost_analysis`` does the same); the caller checks there are none."""
    stats = {k: {"count": 0, "payload": 0.0, "traffic": 0.0} for k in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _OP_RE.search(line)
        if not m:
            continue
        op, shape = m.group("op"), m.group("shape")
        p = _group_size(line, num_devices)
        if p <= 1:
            continue
        result = _shape_bytes(shape)
        if m.group("start") and shape.startswith("("):
            # async start ops return (operands, results[, contexts]): count the results once
            arrays = _ARRAY_RE.findall(shape)
            half = _shape_bytes(" ".join(f"{d}[{s}]" for d, s in arrays[len(arrays) // 2:]))
            result = half if op != "all-gather" else max(half, result - half)
        payload = result * p if op == "reduce-scatter" else result
        s = stats[op]
        s["count"] += 1
        s["payload"] += payload
        s["traffic"] += RING_FACTOR[op](p) * payload
    return stats


def measure(task, config, grid, levels, num_devices: int, fsdp: bool, precision: str, dump_dir: str | None = None) -> dict:
    import jax

    from benchmarks._abstract_step import compile_step

    compiled, abstract, compile_s = compile_step(task, config, grid, levels, num_devices, fsdp, precision)
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0]
    hlo = compiled.as_text()
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, f"step_{num_devices}_{'fsdp' if fsdp else 'dp'}.hlo.txt"), "w") as f:
            f.write(hlo)
    params = jax.tree.leaves(abstract.params)
    memory = compiled.memory_analysis()
    return {
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "collectives": collective_stats(hlo, num_devices),
        "while_loops": len(re.findall(r"\swhile\(", hlo)),
        "params": sum(x.size for x in params),
        "param_bytes": sum(x.size * x.dtype.itemsize for x in params),
        "argument": int(memory.argument_size_in_bytes),
        "temp": int(memory.temp_size_in_bytes),
        "compile_s": compile_s,
    }


def comm_bytes(r: dict) -> float:
    return sum(s["traffic"] for s in r["collectives"].values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    need = max(args.devices)
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(need))
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={need}")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    from aurora_loop.model import AuroraConfig
    from aurora_loop.model.normalisation import STANDARD_LEVELS
    from aurora_loop.tasks.aurora import AuroraTask

    if len(jax.devices()) < need:
        raise SystemExit(f"need {need} devices, have {len(jax.devices())} (set JAX_NUM_CPU_DEVICES before jax starts)")
    levels = tuple(STANDARD_LEVELS[: args.levels])
    config = AuroraConfig.preset(args.model, remat=not args.no_remat, autocast=args.precision != "fp32", **args.overrides)
    task = AuroraTask(config, name=args.model)
    h, w = args.grid
    ph, pw = h - h % config.patch_size, w - w % config.patch_size
    print(f"# Aurora {args.model}, {h}x{w} grid ({ph}x{pw} = {ph * pw} points after the crop), {len(levels)} levels, "
          f"1 example per device, remat={config.remat}, precision={args.precision}, use_lora={config.use_lora}"
          f"{', ' + str(args.overrides) if args.overrides else ''}; "
          f"{jax.default_backend()}, {os.cpu_count()} CPUs, jax {jax.__version__}", flush=True)
    print(f"{'devices':>7} {'layout':>6} {'GFLOP/dev':>11} {'all-reduce N':>13} {'all-gather N':>13} "
          f"{'red-scat N':>13} {'other N':>11} {'comm/dev GB':>12} {'#coll':>6} {'compile s':>9}")
    results: dict[tuple[int, str], dict] = {}
    for n in args.devices:
        for layout in args.layouts:
            r = measure(task, config, args.grid, levels, n, layout == "fsdp", args.precision, args.dump_hlo)
            results[(n, layout)] = r
            c = r["collectives"]
            other = sum(c[k]["payload"] for k in ("all-to-all", "collective-permute"))
            count = sum(s["count"] for s in c.values())
            print(f"{n:>7} {layout:>6} {r['flops'] / 1e9:>11.2f} {c['all-reduce']['payload'] / 1e9:>12.4f}G "
                  f"{c['all-gather']['payload'] / 1e9:>12.4f}G {c['reduce-scatter']['payload'] / 1e9:>12.4f}G "
                  f"{other / 1e9:>10.4f}G {comm_bytes(r) / 1e9:>12.4f} {count:>6} {r['compile_s']:>9.0f}", flush=True)
            if r["while_loops"]:
                print(f"  warning: {r['while_loops']} while loop(s) in the HLO; their bodies are counted once", flush=True)
    first = next(iter(results.values()))
    print(f"params={first['params']} param_bytes={first['param_bytes']} ({first['param_bytes'] / 1e9:.4f} GB)")
    for (n, layout), r in results.items():
        c = r["collectives"]
        print(f"per-step[{n},{layout}] flops={r['flops']:.4e} comm_bytes={comm_bytes(r):.4e} "
              + " ".join(f"{k}_N={c[k]['payload']:.4e} {k}_bytes={c[k]['traffic']:.4e}" for k in COLLECTIVES if c[k]["count"])
              + f" allreduce_N_over_param_bytes={c['all-reduce']['payload'] / r['param_bytes']:.4f}"
              + f" argument+temp_GiB={(r['argument'] + r['temp']) / 2**30:.3f}")
    if "dp" in args.layouts and "fsdp" in args.layouts:
        n = max(args.devices)
        dp, fsdp = results[(n, "dp")], results[(n, "fsdp")]
        print(f"fsdp_over_dp_flops={fsdp['flops'] / dp['flops']:.4f}")
        print(f"fsdp_over_dp_comm_bytes={comm_bytes(fsdp) / comm_bytes(dp):.4f}")
    else:  # one layout: its per-device collective bytes over the parameter bytes, at the largest mesh
        r = results[(max(args.devices), args.layouts[0])]
        print(f"{args.layouts[0]}_comm_over_param_bytes={comm_bytes(r) / r['param_bytes']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
