"""Training-step time of Aurora in JAX, side by side with the PyTorch reference.

    python benchmarks/step_time.py [--reference-python /path/to/refvenv/bin/python]
    python benchmarks/step_time.py --precision fp32|bf16-mixed|bf16-params|all [--model M] [--grid H W]

JAX: one training step (forward, backward, AdamW update) of AuroraSmall's architecture on
a 64 x 128 grid with 13 pressure levels and a batch of 1, float32, jitted and timed after
compilation (median of ``--steps`` steps). It also prints the compiled step's temporary
memory (``compiled.memory_analysis()``) of the loss-and-gradient computation without and
with rematerialisation (encoder, every Swin block, decoder), under both remat policies.

With ``--reference-python``, that interpreter (where ``pip install torch==2.14.1
torchvision==0.29.1 microsoft-aurora`` was run) times the reference's forward + backward on
the same shapes in the same run, and then forward + backward + a fused ``torch.optim.AdamW`` step.
It prints ``jax_over_torch_same_work`` (both sides with their AdamW update) and, last,
``jax_over_torch=<ratio>``: the JAX training step over the reference's forward + backward,
the comparison the benchmark was specified with (below 1 means JAX is faster).

Precision mode (``--precision``; without it, the modes above run, where ``--bf16`` is the
hand-built step's ``bf16-mixed``): the trainer's real step instead,
``aurora_loop.step.make_train_step`` on ``AuroraTask`` (its loss; AdamW, 1 device, batch
1, the state donated), under each named policy -- ``fp32`` (``autocast=False``),
``bf16-mixed`` (float32 parameters, the model's bfloat16 backbone, ``autocast=True``),
``bf16-params`` (``StepOptions(compute_dtype=bfloat16)``: bfloat16 weights and gradients in
the forward and backward pass, float32 masters in the optimizer; ``autocast=True``) -- or
``all`` of them in one process. Every policy is compiled, warmed up (``--warmup`` steps
each), then timed interleaved, one step of each per round (fp32, bf16-mixed, bf16-params,
fp32, ...; ``--steps`` rounds) so that the machine's drift hits all alike. Per policy it
prints the median step time and the compiled step's per-device ``argument`` + ``temp``
bytes (``compiled.memory_analysis()``); with more than one policy then
``precision_memory_ratio ...`` and, last, ``precision_step_time_ratio bf16-mixed/fp32=<r>
bf16-params/fp32=<r>`` (median step time over the first policy's; below 1 is faster).
``--remat`` applies; ``--bf16``, ``--reference-python`` and ``--no-memory`` do not.
For the GPU: ``python benchmarks/step_time.py --model small --grid 721 1440 --precision all``
(the task crops the grid to a multiple of the patch size, 720 x 1440).

Measured (2 CPU cores shared with other jobs, jax 0.10; XLA:CPU emulates much of bfloat16
arithmetic, so these timings say little about a GPU's): ``--model tiny --grid 32 64
--levels 4 --precision all --steps 7 --warmup 2``: step fp32 0.0178 s, bf16-mixed 0.0204 s,
bf16-params 0.0222 s; argument+temp 0.0207 / 0.0224 / 0.0211 GiB;
precision_memory_ratio bf16-mixed/fp32=1.078 bf16-params/fp32=1.019;
``precision_step_time_ratio bf16-mixed/fp32=1.145 bf16-params/fp32=1.248``.
``--model small --grid 32 64 --levels 4 --precision all --steps 5 --warmup 1``: step fp32
1.281 s, bf16-mixed 2.264 s, bf16-params 2.134 s; argument 1.261 GiB for all, temp 0.297 /
0.602 / 0.608 GiB; precision_memory_ratio bf16-mixed/fp32=1.195 bf16-params/fp32=1.199;
``precision_step_time_ratio bf16-mixed/fp32=1.767 bf16-params/fp32=1.665``.
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

LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)
PRECISIONS = ("fp32", "bf16-mixed", "bf16-params")  # aurora_loop.step.PRECISION_COMPUTE_DTYPES (importing it starts jax)

# The reference's side: AuroraSmall on random inputs of the same shapes, and ``step(update)``
# (forward + backward, then the fused AdamW update if ``update``). ``args`` (JSON in argv[1])
# holds h, w, levels, bf16 and remat. Also used by benchmarks/reference_ab.py.
TORCH_SETUP = r'''
import datetime, json, statistics, sys, time
import torch
from aurora import AuroraSmallPretrained, Batch, Metadata
args = json.loads(sys.argv[1])
torch.manual_seed(0)
h, w, levels = args["h"], args["w"], tuple(args["levels"])
model = AuroraSmallPretrained(use_lora=False, autocast=args["bf16"])
if args["remat"]:
    model.configure_activation_checkpointing()
model.train()
batch = Batch(
    surf_vars={k: torch.randn(1, 2, h, w) for k in ("2t", "10u", "10v", "msl")},
    static_vars={k: torch.randn(h, w) for k in ("lsm", "z", "slt")},
    atmos_vars={k: torch.randn(1, 2, len(levels), h, w) for k in ("z", "u", "v", "t", "q")},
    metadata=Metadata(lat=torch.linspace(90, -90, h), lon=torch.linspace(0, 360, w + 1)[:-1],
                      time=(datetime.datetime(2020, 1, 1, 6),), atmos_levels=levels),
)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the fastest CPU AdamW
def step(update):
    pred = model(batch)
    loss = sum(v.abs().mean() for v in pred.surf_vars.values()) + sum(v.abs().mean() for v in pred.atmos_vars.values())
    loss.backward()
    if update:
        optimizer.step()
    model.zero_grad(set_to_none=True)
'''
TORCH_SCRIPT = TORCH_SETUP + r'''
def timed(update):
    for _ in range(args["warmup"]):
        step(update)
    times = []
    for _ in range(args["steps"]):
        t0 = time.perf_counter(); step(update); times.append(time.perf_counter() - t0)
    return times
times = timed(False)
adamw_times = timed(True)
print(json.dumps({"median_s": statistics.median(times), "times": times,
                  "adamw_median_s": statistics.median(adamw_times), "adamw_times": adamw_times, "threads": torch.get_num_threads(), "torch": torch.__version__}))
'''


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", help="Python of a venv with the PyTorch reference installed")
    parser.add_argument("--model", default="small", help="Aurora preset (tiny, small, aurora)")
    parser.add_argument("--grid", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--levels", type=int, default=13, help="pressure levels (the first N standard ones)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 backbone (autocast) on both sides")
    parser.add_argument("--remat", action="store_true", help="time with per-block rematerialisation")
    parser.add_argument("--no-memory", action="store_true", help="skip the remat memory comparison")
    parser.add_argument("--precision", choices=(*PRECISIONS, "all"), default=None,
                        help="time the trainer's real step under this precision policy, or all of them interleaved")
    args = parser.parse_args(argv)
    if args.precision is not None and (args.bf16 or args.reference_python):
        parser.error("--precision times the trainer's step under the named policies; --bf16 and --reference-python "
                     "belong to the reference comparison (without --precision)")
    return args


def torch_time(python: str, args: argparse.Namespace, levels: tuple[int, ...]) -> dict:
    payload = json.dumps({"h": args.grid[0], "w": args.grid[1], "levels": levels, "steps": args.steps,
                          "warmup": args.warmup, "bf16": args.bf16, "remat": args.remat})
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(TORCH_SCRIPT)
        script = f.name
    try:
        out = subprocess.run([python, script, payload], check=True, capture_output=True, text=True)
    finally:
        os.unlink(script)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_inputs_and_target(config, grid: tuple[int, int], levels: tuple[int, ...]):
    """(inputs with 2 history steps, target 6 h later), batch 1, drawn around each variable's
    normalisation statistics so the normalised values are O(1)."""
    import numpy as np

    from aurora_loop.model import Batch, Metadata
    from aurora_loop.model.normalisation import atmos_stats, surface_stats

    h, w = grid
    rng = np.random.default_rng(0)

    def physical_surf(name: str, shape: tuple[int, ...]) -> np.ndarray:
        loc, scale = surface_stats(name)
        return (loc + scale * rng.standard_normal(shape)).astype(np.float32)

    def physical_atmos(name: str, t: int) -> np.ndarray:
        loc, scale = atmos_stats(name, levels)
        return (loc[:, None, None] + scale[:, None, None] * rng.standard_normal((1, t, len(levels), h, w))).astype(np.float32)

    def make_batch(t: int, time_h: float) -> Batch:
        return Batch(
            surf_vars={k: physical_surf(k, (1, t, h, w)) for k in config.surf_vars},
            static_vars={k: physical_surf(k, (h, w)) for k in config.static_vars},
            atmos_vars={k: physical_atmos(k, t) for k in config.atmos_vars},
            metadata=Metadata(lat=np.linspace(90, -90, h), lon=np.linspace(0, 360, w, endpoint=False),
                              time=np.array([time_h]), atmos_levels=levels),
        )

    return make_batch(2, 438300.0), make_batch(1, 438306.0)


def build(args: argparse.Namespace, levels: tuple[int, ...], remat: bool, remat_policy: str = "inputs", **model_changes):
    """(jitted train step, params, opt_state, batch) for the benchmark shapes; ``model_changes``:
    further ``AuroraConfig`` fields (e.g. ``level_chunk_tokens``)."""
    import jax
    import jax.numpy as jnp
    import optax

    from aurora_loop.model import AuroraConfig, apply, init_params
    from aurora_loop.tasks.aurora import weighted_mae

    config = AuroraConfig.preset(args.model, use_lora=False, autocast=args.bf16, remat=remat, remat_policy=remat_policy, **model_changes)
    inputs, target = make_inputs_and_target(config, tuple(args.grid), levels)
    params = init_params(config, jax.random.key(0), inputs)
    optimizer = optax.adamw(1e-4)
    opt_state = optimizer.init(params)

    def loss_fn(params, inputs, target):
        return jnp.mean(weighted_mae(apply(config, params, inputs), target))

    def train_step(params, opt_state, inputs, target):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, target)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))
    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    return step, grad_fn, params, opt_state, inputs, target


def jax_time(args: argparse.Namespace, levels: tuple[int, ...]) -> dict:
    import jax

    step, _, params, opt_state, inputs, target = build(args, levels, args.remat)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, inputs, target).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        params, opt_state, _ = compiled(params, opt_state, inputs, target)
    jax.block_until_ready((params, opt_state))  # also defined with --warmup 0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, inputs, target)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times": times, "compile_s": compile_s, "loss": float(loss),
            "backend": jax.default_backend(), "device": str(jax.devices()[0])}


def temp_memory(args: argparse.Namespace, levels: tuple[int, ...], remat: bool, remat_policy: str = "inputs") -> int:
    """Temporary memory of the compiled loss-and-gradient computation (bytes).

    Measured on ``value_and_grad(loss)`` rather than the whole training step: there the
    gradients are outputs, so the temporaries are the activations kept for the backward
    pass, which is what rematerialisation trades for compute. (In the full step the AdamW
    update's parameter-sized temporaries, ~0.45 GB each for AuroraSmall, add the same amount
    with and without remat.)
    """
    _, grad_fn, params, _, inputs, target = build(args, levels, remat, remat_policy)
    analysis = grad_fn.lower(params, inputs, target).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes)


def precision_time(args: argparse.Namespace, levels: tuple[int, ...]) -> int:
    """``--precision``: the trainer's train step under each policy, timed interleaved."""
    import jax
    import optax

    from aurora_loop.model import AuroraConfig, Sample
    from aurora_loop.parallel import batch_shardings, make_mesh, place_batch
    from aurora_loop.step import PRECISION_COMPUTE_DTYPES, StepOptions, make_init_fn, make_train_step, state_shardings
    from aurora_loop.tasks.aurora import AuroraTask

    policies = PRECISIONS if args.precision == "all" else (args.precision,)
    mesh = make_mesh(1)
    print(f"# Aurora {args.model}, {args.grid[0]}x{args.grid[1]} grid, {len(levels)} levels, batch 1, remat={args.remat}, "
          f"trainer step (AuroraTask loss, AdamW); precision {', '.join(policies)}; {jax.default_backend()} {jax.devices()[0]}; "
          f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}", flush=True)
    runs = {}
    for policy in policies:
        config = AuroraConfig.preset(args.model, use_lora=False, autocast=policy != "fp32", remat=args.remat)
        task = AuroraTask(config, name=args.model)
        host = Sample(*make_inputs_and_target(config, tuple(args.grid), levels))
        task.setup(host)  # as the trainer does: the grid's constants
        batch_sharding = batch_shardings(host, mesh)
        batch = place_batch(host, batch_sharding)
        optimizer = optax.adamw(1e-4)
        init_fn = make_init_fn(task, optimizer, seed=0)
        shardings = state_shardings(jax.eval_shape(init_fn, batch), mesh)
        state = jax.jit(init_fn, out_shardings=shardings)(batch)
        options = StepOptions(compute_dtype=PRECISION_COMPUTE_DTYPES[policy])
        step = make_train_step(task, optimizer, shardings, batch_sharding, mesh, options=options)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        analysis = compiled.memory_analysis()
        for _ in range(args.warmup):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        runs[policy] = {"step": compiled, "state": state, "batch": batch, "times": [], "compile_s": compile_s,
                        "argument": int(analysis.argument_size_in_bytes), "temp": int(analysis.temp_size_in_bytes)}
        print(f"# {policy}: compiled in {compile_s:.1f}s", flush=True)
    for _ in range(args.steps):  # interleaved: one step of every policy per round
        for run in runs.values():
            t0 = time.perf_counter()
            run["state"], metrics = run["step"](run["state"], run["batch"])
            jax.block_until_ready((run["state"], metrics))
            run["times"].append(time.perf_counter() - t0)
            run["loss"] = float(metrics["loss"])
    for policy, run in runs.items():
        run["median_s"] = statistics.median(run["times"])
        print(f"{policy}: step_s={run['median_s']:.4f}  argument={run['argument'] / 2**30:.4f} GiB  temp={run['temp'] / 2**30:.4f} GiB  "
              f"argument+temp={(run['argument'] + run['temp']) / 2**30:.4f} GiB  (compile {run['compile_s']:.1f}s; loss {run['loss']:.6g}; "
              f"steps {', '.join(f'{t:.3f}' for t in run['times'])})", flush=True)
    if len(runs) > 1:
        base, *others = policies
        total = {p: runs[p]["argument"] + runs[p]["temp"] for p in policies}
        print("precision_memory_ratio " + " ".join(f"{p}/{base}={total[p] / total[base]:.3f}" for p in others))
        print("precision_step_time_ratio " + " ".join(f"{p}/{base}={runs[p]['median_s'] / runs[base]['median_s']:.3f}" for p in others))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aurora_loop.model.normalisation import STANDARD_LEVELS

    levels = tuple(STANDARD_LEVELS[: args.levels])
    if args.precision is not None:
        return precision_time(args, levels)
    desc = f"Aurora {args.model}, {args.grid[0]}x{args.grid[1]} grid, {len(levels)} levels, batch 1, {'bf16 backbone' if args.bf16 else 'float32'}"
    print(f"# {desc}; {os.cpu_count()} CPUs; python {sys.version.split()[0]}", flush=True)
    if not args.no_memory:
        plain = temp_memory(args, levels, remat=False)
        remat = temp_memory(args, levels, remat=True)
        dots = temp_memory(args, levels, remat=True, remat_policy="dots")
        print(f"grad_temp_memory_no_remat_bytes={plain}")
        print(f"grad_temp_memory_remat_bytes={remat}")
        print(f"grad_temp_memory_remat_dots_bytes={dots} (--remat_policy dots)")
        print(f"remat_temp_memory_reduction={1 - remat / plain:.3f}", flush=True)
    reference = None
    if args.reference_python:
        reference = torch_time(args.reference_python, args, levels)
        print(f"torch_step_s={reference['median_s']:.4f} (forward+backward; threads={reference['threads']}, torch {reference['torch']}; "
              f"steps {', '.join(f'{t:.3f}' for t in reference['times'])})", flush=True)
        print(f"torch_step_with_adamw_s={reference['adamw_median_s']:.4f} (forward+backward+AdamW; "
              f"steps {', '.join(f'{t:.3f}' for t in reference['adamw_times'])})", flush=True)
    ours = jax_time(args, levels)
    print(f"jax_step_s={ours['median_s']:.4f} (forward+backward+AdamW; {ours['backend']} {ours['device']}; compile {ours['compile_s']:.1f}s; "
          f"steps {', '.join(f'{t:.3f}' for t in ours['times'])})", flush=True)
    if reference is not None:
        # Same work on both sides (each with its AdamW update), then the ratio, whose
        # reference side leaves the update out.
        print(f"jax_over_torch_same_work={ours['median_s'] / reference['adamw_median_s']:.3f}")
        print(f"jax_over_torch={ours['median_s'] / reference['median_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
