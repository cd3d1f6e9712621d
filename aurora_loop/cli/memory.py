"""``aurora-train ... --estimate_memory`` (and ``aurora-loop memory``): will this run fit?

Compiles the train step the run would compile (same task, optimizer, parameter groups,
precision, remat, roll-out, accumulation, EMA, mesh and FSDP) on abstract parameters, on
``--num_gpus`` devices (simulated CPU devices where the machine has fewer), and prints
what one device needs: parameters, optimizer state, batch, temporaries, and where the
temporaries peak. Against a card (``--device_memory_gib``, or this machine's accelerator)
it says whether the run fits and, if not, compiles the cheapest changes one by one and
names the first that fits. Nothing is allocated on a device and nothing is written (the
compilation cache stays off; XLA's dump goes to a temporary directory).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aurora_loop.config import TrainingConfig, parse_grid
from aurora_loop.errors import UsageError

GiB = 2**30


def _devices(config: TrainingConfig) -> Any:
    """The mesh of ``--num_gpus`` devices: this machine's own where it has enough, else
    simulated CPU devices (their number is set before JAX starts its backends)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from aurora_loop.parallel import DATA_AXIS, SPACE_AXIS

    wanted = config.num_gpus or len(jax.devices())
    devices = jax.devices()
    simulated = False
    if len(devices) < wanted:
        devices, simulated = jax.devices("cpu"), devices[0].platform != "cpu"
        if len(devices) < wanted:
            raise UsageError(f"cannot simulate {wanted} devices: JAX started with {len(devices)} CPU devices; "
                             f"set JAX_NUM_CPU_DEVICES={wanted} (or unset it) and rerun")
    space = config.space_parallel
    if wanted % space:
        raise UsageError(f"--space_parallel {space} does not divide the {wanted} devices of the mesh; choose a divisor of {wanted}")
    if space == 1:
        return Mesh(np.asarray(devices[:wanted]), (DATA_AXIS,)), simulated
    return Mesh(np.asarray(devices[:wanted]).reshape(wanted // space, space), (DATA_AXIS, SPACE_AXIS)), simulated


def _loader(config: TrainingConfig) -> tuple[Any, str]:
    """(a loader whose example batch has the run's shapes, what the grid is)."""
    from aurora_loop.datasets.shapes import ShapeOnlyLoader, shape_only_sample

    if config.estimate_grid is not None:
        h, w = parse_grid(config.estimate_grid)
        return ShapeOnlyLoader(shape_only_sample(config, (h, w), config.batch_size)), f"{h} x {w} grid (--estimate_grid)"
    if config.dataset_path is None:
        return ShapeOnlyLoader(shape_only_sample(config, (32, 64), config.batch_size)), "32 x 64 grid (the built-in sample's)"
    from aurora_loop.datasets import build_loaders

    train_loader, _ = build_loaders(config)
    sample = train_loader.example_batch()
    h, w = sample.inputs.spatial_shape
    return train_loader, f"{h} x {w} grid ({config.dataset_path})"


def estimate_config(config: TrainingConfig, breakdown: bool = True, dump_dir: str | None = None) -> tuple[Any, str, bool]:
    """(the :class:`aurora_loop.memory.MemoryEstimate` of ``config``'s train step, what its
    grid is, whether its devices are simulated); ``dump_dir``: keep XLA's dump there."""
    import numpy as np

    from aurora_loop.cli.train import optimizer_for, step_settings
    from aurora_loop.memory import estimate
    from aurora_loop.task import available_tasks, make_task
    from aurora_loop.trainer import Trainer

    if config.model not in available_tasks():
        raise UsageError(f"--model {config.model} is not a known model; choose one of: {', '.join(available_tasks())}")
    mesh, simulated = _devices(config)
    from aurora_loop.parallel import check_batch_divisible

    check_batch_divisible(config.batch_size, mesh)
    loader, grid = _loader(config)
    if config.timestep_hours is None and getattr(loader, "time_step", None) is not None:
        config = config.replace(timestep_hours=float(loader.time_step / np.timedelta64(1, "h")))
    task = make_task(config.model, config)
    _, groups, optimizer = optimizer_for(config, config.lr_schedule_steps or 1000)  # the schedule's length costs no memory
    trainer = Trainer(mesh=mesh, **step_settings(config, optimizer, groups))
    step, state, batch = trainer.abstract_train_step(task, loader)
    return estimate(step, state, batch, breakdown=breakdown, dump_dir=dump_dir), grid, simulated


def candidate_changes(config: TrainingConfig) -> list[tuple[str, dict[str, Any]]]:
    """Changes that cut a step's memory, cheapest first: (flags, TrainingConfig changes).

    Sharding the state costs only communication; a smaller per-device batch with as much
    accumulation keeps the update the same, and so does splitting each example over k
    devices (``--space_parallel``) with k times the accumulation; remat costs a second forward pass, ``inputs``
    over ``dots`` a little more of one; bfloat16 changes the numerics; the roll-out changes
    the objective, so it comes last.
    """
    devices = config.num_gpus or 1
    changes: list[tuple[str, dict[str, Any]]] = []
    if devices > 1 and not config.fsdp:
        changes.append(("--fsdp", {"fsdp": True}))
    per_device = config.batch_size // devices
    if per_device > 1 and config.rollout_mode != "replay":
        half = config.batch_size // 2
        accumulate = config.accumulate_grad_batches * 2
        changes.append((f"--batch_size {half} --accumulate_grad_batches {accumulate}",
                        {"batch_size": half, "accumulate_grad_batches": accumulate}))
    if config.space_parallel == 1 and config.rollout_mode != "replay" and config.model != "conv":
        # One example over k devices: a k-th of its activations each; as many examples per
        # update through accumulation (k times fewer in flight).
        for k in (d for d in range(2, devices + 1) if devices % d == 0 and config.batch_size % d == 0):
            batch, accumulate = config.batch_size // k, config.accumulate_grad_batches * k
            if batch % (devices // k) == 0:
                changes.append((f"--space_parallel {k} --batch_size {batch} --accumulate_grad_batches {accumulate}",
                                {"space_parallel": k, "batch_size": batch, "accumulate_grad_batches": accumulate}))
    if not config.remat:
        changes.append(("--remat", {"remat": True, "remat_policy": "inputs"}))
    elif config.remat_policy != "inputs":
        changes.append(("--remat_policy inputs", {"remat_policy": "inputs"}))
    if not config.compute_bf16:
        changes.append(("--precision bf16-mixed", {"precision": "bf16-mixed"}))
    if config.rollout_steps > 1 and config.rollout_mode == "full":
        changes.append(("--rollout_mode pushforward", {"rollout_mode": "pushforward"}))
    if config.rollout_steps > 1:
        changes.append((f"--rollout_steps {config.rollout_steps // 2}", {"rollout_steps": config.rollout_steps // 2}))
    return changes


def _gib(n: float) -> str:
    """Bytes as GiB (MiB below one GiB)."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def report_lines(report: Any, config: TrainingConfig, grid: str, simulated: bool) -> list[str]:
    """The estimate as the console shows it."""
    from aurora_loop.memory import format_breakdown
    from aurora_loop.memory.estimate import USABLE_FRACTION, environment_note

    remat = f"remat ({config.remat_policy})" if config.remat else "no remat"
    where = f"{report.devices} x {report.platform}" + (" (simulated)" if simulated else "")
    lines = [
        f"Memory estimate for --model {config.model} on a {grid}: {config.batch_size * config.space_parallel // report.devices} example(s) per device"
        f"{f' (split over {config.space_parallel})' if config.space_parallel > 1 else ''}, "
        f"{where}{', FSDP' if config.fsdp else ''}, {remat}, precision {config.precision if not config.bf16 else 'bf16-mixed'}, "
        f"roll-out {config.rollout_steps} step(s) ({config.rollout_mode}); compiled in {report.compile_seconds:.0f} s",
        "Per device:",
        f"  parameters          {_gib(report.params):>12}",
        f"  optimizer state     {_gib(report.optimizer):>12}",
    ]
    if report.ema:
        lines.append(f"  EMA weights         {_gib(report.ema):>12}")
    if report.task_state:
        lines.append(f"  task state          {_gib(report.task_state):>12}")
    lines += [
        f"  batch               {_gib(report.batch):>12}",
        f"  temporaries         {_gib(report.temp):>12}   (activations, gradients, the update's intermediates)",
    ]
    if report.output > report.alias:
        lines.append(f"  outputs             {_gib(report.output - report.alias):>12}")
    lines.append(f"  total               {_gib(report.total):>12}   (arguments {_gib(report.argument)} + temporaries)")
    if report.breakdown is not None:
        lines.append("Where the temporaries peak:")
        lines += ["  " + line for line in format_breakdown(report.breakdown, top=6)]
    fit, too_small = report.cards()
    lines.append(f"Cards it fits (a step may use {USABLE_FRACTION:.0%} of a card): {', '.join(fit) or 'none of the usual ones'}"
                 + (f"; too small: {', '.join(too_small)}" if too_small else ""))
    note = environment_note(report.platform, config.compute_bf16)
    if note:
        lines.append(f"Note: {note}")
    return lines


def estimate_run(config: TrainingConfig) -> int:
    """``--estimate_memory``: print the estimate (and, against a card that is too small, the
    cheapest change that fits); exit status 0."""
    from aurora_loop.cli.train import _use_cpu_devices

    _use_cpu_devices(config)
    import jax

    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # writes nothing, not even compiled programs
    try:
        return _estimate_and_advise(config)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)


def _estimate_and_advise(config: TrainingConfig) -> int:
    from aurora_loop.memory.estimate import USABLE_FRACTION, device_capacity_gib

    print(f"Compiling the train step of --model {config.model} on abstract parameters (no parameter is allocated)...", flush=True)
    report, grid, simulated = estimate_config(config)
    for line in report_lines(report, config, grid, simulated):
        print(line)
    print(f"Bytes per device: argument={report.argument} temp={report.temp} output={report.output} alias={report.alias} "
          f"total={report.total}", flush=True)
    capacity = config.device_memory_gib or (None if simulated else device_capacity_gib())
    if capacity is None:
        print("Pass --device_memory_gib N to check the run against a card of N GiB (and to get the changes that would make it fit).",
              flush=True)
        return 0
    usable = USABLE_FRACTION * capacity * GiB
    if report.fits(capacity):
        print(f"Fits a {capacity:g} GiB device: {_gib(report.total)} of the {_gib(usable)} a step may use.", flush=True)
        return 0
    print(f"Does not fit a {capacity:g} GiB device: {_gib(report.total)} > {_gib(usable)}. Trying the cheapest changes:", flush=True)
    chosen: dict[str, tuple[str, dict[str, Any]]] = {}  # kind -> the strongest change of it tried so far
    for name, change in candidate_changes(config):
        alone = _estimate_change(config, change, name)
        if alone is not None and alone.fits(capacity):
            print(f"It fits with {name}.", flush=True)
            return 0
        chosen[name.split()[0]] = (name, change)  # a larger --space_parallel replaces a smaller one
        if len(chosen) > 1:
            flags = " ".join(n for n, _ in chosen.values())
            combined = {k: v for _, c in chosen.values() for k, v in c.items()}
            together = _estimate_change(config, combined, flags)
            if together is not None and together.fits(capacity):
                print(f"It fits with {flags}.", flush=True)
                return 0
    print(f"None of these changes fits a {capacity:g} GiB device; use more devices with --fsdp, a smaller grid or a smaller model.",
          flush=True)
    return 0


def _estimate_change(config: TrainingConfig, change: dict[str, Any], name: str) -> Any:
    """The estimate of ``config`` with ``change``, printed as one line; None where the
    change does not apply (a configuration the run would refuse)."""
    from aurora_loop.config import validate

    changed = dataclasses.replace(config, **change)
    try:
        validate(changed)
        report, _, _ = estimate_config(changed, breakdown=False)
    except UsageError as err:
        print(f"  {name}: not possible here ({err})", flush=True)
        return None
    print(f"  {name}: {_gib(report.total)} (temporaries {_gib(report.temp)})", flush=True)
    return report


def forward(argv: list[str]) -> int:
    """``aurora-loop memory``: ``aurora-train``'s flags, with ``--estimate_memory`` implied."""
    from aurora_loop.cli.train import main as train_main

    return train_main(argv if "--estimate_memory" in argv else ["--estimate_memory", *argv], prog="aurora-loop memory")
