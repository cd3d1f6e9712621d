"""``aurora-train``: the classic training entry point.

    aurora-train --dataset_path era5.zarr --output_dir runs/a --num_gpus 4 --batch_size 8 \
        --learning_rate 5e-5 --epochs 20 --rollout_steps 1

Every TrainingConfig field is a flag; ``--config FILE`` (JSON/YAML) sets defaults that flags
override. Without ``--dataset_path`` a small synthetic WeatherBench2-layout store is written
under the output dir and used. Rerunning the same command resumes from the newest checkpoint.
Bad input: one line on stderr, exit status 2, nothing overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any

from aurora_loop.callbacks.base import Callback
from aurora_loop.cli.console import quiet_third_party, weights_line
from aurora_loop.cli.help import HelpFormatter, Switch, field_metavar, shown_default
from aurora_loop.config import (
    FIELD_GROUPS,
    HELP_GROUPS,
    RESUME_INSENSITIVE,
    TrainingConfig,
    config_from_mapping,
    field_type,
    load_config_file,
    validate,
)
from aurora_loop.errors import UsageError, report_usage_error
from aurora_loop.parallel.distributed import barrier, leave_job

PROG = "aurora-train"


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line (no usage dump) and exits with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see {self.prog} --help")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The flags: every TrainingConfig field (in its ``FIELD_GROUPS`` group) and the options
    of this command alone (--config, --resume, --overwrite, --callback, --print_param_groups)."""
    parser = _OneLineParser(
        prog=prog,
        usage=f"{prog} [--config FILE] [--FLAG VALUE ...]",
        description="Train Aurora (or the conv baseline) with the aurora_loop Trainer. Every flag sets the "
                    "TrainingConfig field of its name; --config FILE sets several (flags override it).",
        argument_default=argparse.SUPPRESS,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="JSON or YAML file of settings; flags override it")
    groups = {name: parser.add_argument_group(f"{name} ({page})") for name, page in HELP_GROUPS.items()}
    other = None
    order = list(FIELD_GROUPS)  # within a group, the order of FIELD_GROUPS
    fields = sorted(dataclasses.fields(TrainingConfig), key=lambda f: order.index(f.name) if f.name in order else len(order))
    for field in fields:
        base, _ = field_type(field)
        group = FIELD_GROUPS.get(field.name)
        if group is None:  # a field not yet given a group (tests/test_help.py fails on it)
            other = other or parser.add_argument_group("other settings")
        target = groups[group] if group else other
        names = [f"--{field.name}"] + (["--num_devices"] if field.name == "num_gpus" else [])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = f"{field.metadata['help']} (default: {shown_default(default).replace('%', '%%')})"
        if base is bool:
            target.add_argument(*names, dest=field.name, action=Switch, help=help_text)
        else:
            target.add_argument(*names, dest=field.name, metavar=field_metavar(field, base), help=help_text)
    groups["optimisation"].add_argument("--print_param_groups", action="store_true", default=False,
                                        help="list every parameter with its group (frozen, base, lr_x<FACTOR>), shape and "
                                             "size, then exit without training")
    resuming = groups["checkpoints and resuming"]
    resuming.add_argument("--resume", action=Switch, default=True,
                          help="continue from the newest checkpoint in output_dir (default: on)")
    resuming.add_argument("--overwrite", action="store_true", default=False,
                          help="start afresh in an output_dir that holds a different run (deletes its checkpoints and logs)")
    groups["logging and callbacks"].add_argument(
        "--callback", action="append", default=[], metavar="SPEC",
        help="add a callback: module:Class, module:Class={json kwargs} or an entry-point name of the group "
             "aurora_loop.callbacks (repeatable)")
    return parser


def resolve_config(argv: list[str], prog: str = PROG) -> tuple[TrainingConfig, argparse.Namespace]:
    """Defaults <- --config file <- flags; validated."""
    args = build_parser(prog).parse_args(argv)
    values = vars(args).copy()
    config_path = values.pop("config", None)
    for key in ("resume", "overwrite", "callback", "print_param_groups"):
        values.pop(key, None)
    config = TrainingConfig()
    if config_path:
        config = config_from_mapping(load_config_file(config_path), source=f"config file {config_path}")
    config = config_from_mapping(values, source="flag", base=config)
    config = model_default_variables(config)
    validate(config)
    return config, args


def model_default_variables(config: TrainingConfig) -> TrainingConfig:
    """A model with its own variable set (Aurora 1.5's presets) reads that set unless the
    variable flags say otherwise: every variable flag left at its default takes the model's
    (surface variables output-only ones included: the data holds them as targets)."""
    from aurora_loop.model.config import PRESETS

    preset = PRESETS.get(config.model, {})
    if "output_only_surf_vars" not in preset:
        return config
    default = TrainingConfig()
    changes = {name: tuple(preset[name]) for name in ("surf_vars", "static_vars", "atmos_vars")
               if name in preset and getattr(config, name) == getattr(default, name)}
    return config.replace(**changes) if changes else config


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    # An unset lr_schedule_steps is resolved when the run starts: it matches any recorded value.
    unset = {"lr_schedule_steps"} if new.get("lr_schedule_steps") is None else set()
    # A setting newer than the recorded run is compared with its default (what that run used).
    defaults = TrainingConfig().to_json_dict()
    return sorted(k for k in new if k not in RESUME_INSENSITIVE | unset and old.get(k, defaults.get(k)) != new[k])


def check_output_dir(config: TrainingConfig, overwrite: bool) -> bool:
    """Make sure output_dir is usable for this config; True when an older run must be cleared.

    A directory holding another run's config is refused unless ``overwrite``. Nothing in
    it is changed here (config.json is written once the run has started).
    """
    out = os.path.abspath(config.output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output_dir {config.output_dir} is a file; pass a directory path")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create --output_dir {config.output_dir} ({err.strerror}); choose a writable location") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {config.output_dir} is not writable; choose a writable location or fix its permissions")
    config_path = os.path.join(out, "config.json")
    new = config.to_json_dict()
    if os.path.exists(config_path):
        try:
            with open(config_path, encoding="utf-8") as fh:
                old = json.load(fh)
        except (OSError, ValueError):
            old = None
        changed = _differences(old, new) if isinstance(old, dict) else ["config.json (unreadable)"]
        if changed:
            if not overwrite:
                raise UsageError(
                    f"--output_dir {config.output_dir} holds a different run ({changed[0]} differs); "
                    "use a new --output_dir, rerun with the same settings to resume, or pass --overwrite to start afresh"
                )
            return True
    return False


def inherit_schedule(config: TrainingConfig, resume: bool) -> TrainingConfig:
    """On a resume, the learning-rate schedule of the run being resumed.

    Without ``--lr_schedule_steps``, a run that has checkpoints in ``output_dir`` keeps the
    schedule length its ``config.json`` recorded, so changing ``--epochs`` / ``--max_steps``
    to extend or shorten it never bends the schedule mid-run.
    """
    if config.lr_schedule_steps is not None or not resume:
        return config
    out = os.path.abspath(config.output_dir)
    from aurora_loop.inference.runs import checkpoint_steps

    if not checkpoint_steps(os.path.join(out, "checkpoints")):
        return config
    try:
        with open(os.path.join(out, "config.json"), encoding="utf-8") as fh:
            recorded = json.load(fh).get("lr_schedule_steps")
    except (OSError, ValueError, AttributeError):
        return config
    return config.replace(lr_schedule_steps=int(recorded)) if isinstance(recorded, int) else config


def untrainable_lora_warning(config: TrainingConfig, task: Any) -> str | None:
    """A warning for ``--lora_only`` on an Aurora with LoRA but without pretrained weights: its
    adaptive layer norms start at zero, so a fresh backbone's blocks (and their adapters) get
    no gradient. (Without LoRA weights at all, the optimizer refuses the run.)"""
    has_lora = bool(getattr(getattr(task, "model_config", None), "use_lora", False))
    if config.lora_only and has_lora and not config.pretrained_paths:
        return ("--lora_only on freshly initialised weights: the backbone's modulations start at zero, so the LoRA "
                "adapters get no gradient and nothing trains; pass --checkpoint_dir with pretrained weights")
    return None


def clear_previous_run(output_dir: str) -> None:
    """Delete an overwritten run's checkpoints and logs (``--overwrite``)."""
    for part in ("checkpoints", "tensorboard"):
        shutil.rmtree(os.path.join(os.path.abspath(output_dir), part), ignore_errors=True)


def write_run_config(config: TrainingConfig) -> None:
    """Write output_dir/config.json atomically."""
    config_path = os.path.join(os.path.abspath(config.output_dir), "config.json")
    tmp = config_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(config.to_json_dict(), fh, indent=2, sort_keys=True)
    os.replace(tmp, config_path)


class RunConfigWriter(Callback):
    """Writes config.json once the run has started (state built or restored), so a run that
    fails before that leaves the output dir as it was."""

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config

    def on_fit_start(self, trainer: Any) -> None:
        if trainer.is_main_process:
            write_run_config(self.config)


def _use_cpu_devices(config: TrainingConfig) -> None:
    # On a CPU-only machine, --num_gpus N means N CPU devices; this must happen before JAX
    # initialises its backends and does not affect accelerator backends.
    if config.num_gpus and "JAX_NUM_CPU_DEVICES" not in os.environ and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", max(config.num_gpus, 1))
        except (AttributeError, RuntimeError):
            pass


def default_callbacks(config: TrainingConfig, out: str, checkpoint_dir: str, tensorboard_dir: str,
                      user_callbacks: list[Any]) -> list[Any]:
    """The callbacks of an ``aurora-train`` run, in hook order.

    ModelCheckpoint comes last so the callback states it saves already hold that step's
    decisions (EarlyStopping counters, ...). TimeLimit (``--max_time``) counts from the start
    of this process, so the limit covers start-up, opening the data and compilation too.
    """
    from aurora_loop.callbacks import (
        EarlyStopping,
        LearningRateMonitor,
        ModelCheckpoint,
        Preemption,
        Profiler,
        ProgressBar,
        TensorBoardLogger,
        TerminateOnNaN,
        Throughput,
        TimeLimit,
        WandbLogger,
    )
    from aurora_loop.callbacks.time_limit import process_start_time

    every = config.log_every_n_steps
    callbacks = [
        Preemption(),
        TerminateOnNaN(),
        ProgressBar(every_n_steps=every, val_table=config.val_table),
        LearningRateMonitor(every_n_steps=every),
        Throughput(every_n_steps=max(every, 50)),
        TensorBoardLogger(tensorboard_dir, log_every_n_steps=every, hparams=config.to_json_dict()),
    ]
    if config.use_wandb:
        callbacks.append(WandbLogger(project=config.wandb_project, save_dir=out, config=config.to_json_dict(), log_every_n_steps=every))
    if config.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor=config.monitor or "val/loss", patience=config.early_stopping_patience,
                                       min_delta=config.early_stopping_min_delta, mode=config.mode))
    if config.profile_steps is not None:
        start, _, count = config.profile_steps.partition(":")
        callbacks.append(Profiler(tensorboard_dir, start_step=int(start), num_steps=int(count)))
    callbacks += user_callbacks
    if config.max_time is not None:
        callbacks.append(TimeLimit(config.max_time_seconds, start_time=process_start_time(), label=f"--max_time {config.max_time}"))
    callbacks.append(ModelCheckpoint(checkpoint_dir, every_n_steps=config.save_every_n_steps, max_to_keep=config.max_to_keep,
                                     monitor=config.monitor, mode=config.mode, save_top_k=config.save_top_k,
                                     every_n_minutes=config.save_every_n_minutes))
    return callbacks


def _print_param_groups(task: Any, train_loader: Any, groups: Any) -> int:
    """``--print_param_groups``: the parameter table of ``task`` on the data's shapes."""
    import jax

    from aurora_loop.data import example_batch
    from aurora_loop.optim import format_group_table, group_table

    example = example_batch(train_loader)
    if callable(getattr(task, "setup", None)):
        task.setup(example)
    shapes = jax.eval_shape(task.init, jax.random.PRNGKey(0), example)
    groups.check(shapes)
    # Parameters that are new next to the pretrained weights (new variables, history slots).
    notes = task.new_parameters() if callable(getattr(task, "new_parameters", None)) else {}
    if jax.process_index() == 0:
        print(format_group_table(group_table(shapes, groups), notes=notes), flush=True)
    return 0


def optimizer_for(config: TrainingConfig, schedule_steps: int) -> tuple[Any, Any, Any]:
    """(learning-rate schedule, parameter groups, optax optimizer) of a run whose schedule
    lasts ``schedule_steps`` steps."""
    from aurora_loop.optim import ParamGroups, is_lora_param, learning_rate_schedule, make_optimizer

    schedule = learning_rate_schedule(config.learning_rate, schedule_steps, config.warmup_steps)
    groups = ParamGroups(freeze=config.freeze, lr_multipliers=dict(config.lr_multipliers or {}),
                         trainable=is_lora_param if config.lora_only else None)
    return schedule, groups, make_optimizer(schedule, config.weight_decay, config.grad_clip_norm, groups=groups)


def step_settings(config: TrainingConfig, optimizer: Any, groups: Any) -> dict[str, Any]:
    """The Trainer arguments that shape the compiled train step (what ``--estimate_memory``
    must compile exactly as the run would)."""
    return dict(
        optimizer=optimizer,
        seed=config.seed,
        fsdp=config.fsdp,
        trainable=None if groups.trivial else groups.is_trainable,
        accumulate_grad_batches=config.accumulate_grad_batches,
        ema_decay=config.ema_decay,
        precision="bf16-mixed" if config.bf16 and config.precision == "fp32" else config.precision,
    )


def run(config: TrainingConfig, resume: bool = True, clear_previous: bool = False,
        callback_specs: tuple[str, ...] = (), print_param_groups: bool = False, started: float | None = None) -> int:
    """Train according to ``config``; returns the exit status.

    Everything that can be checked (devices, model, data) is checked before config.json is
    written or anything in output_dir changes. ``started``: ``time.time()`` when the command
    started (the summary's wall time counts from there; default: now).
    """
    started = time.time() if started is None else started
    requested = config
    _use_cpu_devices(config)
    from aurora_loop.parallel.distributed import initialize_distributed

    initialize_distributed(config)  # before anything touches devices
    from aurora_loop.compile_cache import enable_compile_cache

    enable_compile_cache(config.compile_cache)  # before anything compiles
    import jax
    import numpy as np

    from aurora_loop.callbacks.preemption import PREEMPTED_EXIT_CODE, was_preempted
    from aurora_loop.parallel import check_batch_divisible, make_mesh
    from aurora_loop.plugins import load_callbacks
    from aurora_loop.task import available_tasks, make_task
    from aurora_loop.trainer import Trainer

    out = os.path.abspath(config.output_dir)
    user_callbacks = load_callbacks(list(callback_specs))
    mesh = make_mesh(config.num_gpus, config.space_parallel)
    check_batch_divisible(config.batch_size, mesh)
    if config.model not in available_tasks():
        raise UsageError(f"--model {config.model} is not a known model; choose one of: {', '.join(available_tasks())}")

    if config.dataset_path is None:
        from aurora_loop.datasets.sample_data import write_sample_store

        sample_path = os.path.join(out, "sample_data.zarr")
        if jax.process_index() == 0 and not os.path.exists(sample_path):
            print(f"No --dataset_path given: writing a synthetic WeatherBench2-layout sample to {sample_path}", flush=True)
            v1p5 = "v1p5" in config.model
            write_sample_store(sample_path, levels=config.levels or (50, 250, 500, 850, 1000),
                               variables="v1p5" if v1p5 else "standard", step_hours=1 if config.lead_times else 6,
                               times=720 if config.lead_times else 120)
        barrier("sample_data")  # the other processes read it next
        config = config.replace(dataset_path=sample_path)

    from aurora_loop.datasets import build_loaders

    train_loader, val_loader = build_loaders(config)
    if config.timestep_hours is None and getattr(train_loader, "time_step", None) is not None:
        # The model steps as far as the data does (Aurora's default is 6 h; ERA5 samples may be 12 h).
        config = config.replace(timestep_hours=float(train_loader.time_step / np.timedelta64(1, "h")))
    task = make_task(config.model, config)
    # The task may take several steps per batch (replay); accumulation several batches per step.
    steps_per_epoch = len(task.train_loader(train_loader) if hasattr(task, "train_loader") else train_loader) // config.accumulate_grad_batches
    if steps_per_epoch < 1:
        raise UsageError(f"an epoch of {len(train_loader)} batches is shorter than --accumulate_grad_batches "
                         f"{config.accumulate_grad_batches}; accumulate fewer batches or use more training data")
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    # The schedule is fixed when a run starts (config.json records it; a resume inherits it).
    schedule_steps = config.lr_schedule_steps or total_steps
    requested = requested.replace(lr_schedule_steps=schedule_steps)
    schedule, groups, optimizer = optimizer_for(config, schedule_steps)
    if print_param_groups:
        return _print_param_groups(task, train_loader, groups)

    checkpoint_dir = os.path.join(out, "checkpoints")
    tensorboard_dir = os.path.join(out, "tensorboard")
    callbacks = [RunConfigWriter(requested), *default_callbacks(config, out, checkpoint_dir, tensorboard_dir, user_callbacks)]
    trainer = Trainer(
        callbacks=callbacks,
        log_learning_rate=schedule,
        max_epochs=config.epochs,
        max_steps=config.max_steps,
        val_every_n_steps=config.val_every_n_steps,
        mesh=mesh,
        eval_weights=config.eval_weights,
        **step_settings(config, optimizer, groups),
    )
    main = jax.process_index() == 0
    warning = untrainable_lora_warning(config, task)
    if main and warning:
        print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True)
    if main:
        devices = mesh.devices.reshape(-1)
        split = f", every example split over {config.space_parallel} of them" if config.space_parallel > 1 else ""
        print(f"Devices: {mesh.size} x {devices[0].platform} ({jax.process_count()} process(es){split})")
        accumulation = (f", {config.accumulate_grad_batches} micro-batches per step: {config.batch_size * config.accumulate_grad_batches} "
                        "examples per update") if config.accumulate_grad_batches > 1 else ""
        per = "device" if config.space_parallel == 1 else f"group of {config.space_parallel} devices"
        print(f"Model: {config.model}   batch size: {config.batch_size} ({config.batch_size // (mesh.size // config.space_parallel)} per {per}{accumulation})")
        print(f"Epochs: {config.epochs} ({steps_per_epoch} steps each, {total_steps} steps in all)   "
              f"learning rate: {config.learning_rate:g} (schedule: {schedule_steps} steps)   rollout steps: {config.rollout_steps}")
        print(f"Data: {config.dataset_path}   Output: {out}", flush=True)
        from aurora_loop.inference.runs import checkpoint_steps

        if clear_previous or not resume or not checkpoint_steps(checkpoint_dir):  # a resume names its checkpoint itself
            print(weights_line(config, task), flush=True)
    if main and clear_previous:
        clear_previous_run(out)
    barrier("clear_previous")  # an --overwrite cleared old checkpoints before anyone looks for one
    trainer.fit(task, train_loader, val_loader, resume=resume)
    if trainer.data_error is not None:
        if main:
            print(f"{PROG}: stopped at step {trainer.global_step} after saving: {trainer.data_error}; "
                  "rerun the same command to resume once the store answers again", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT_CODE
    if was_preempted(trainer):
        if main:
            print(f"Stopped by a signal at step {trainer.global_step} after saving; rerun the same command to resume", flush=True)
        return PREEMPTED_EXIT_CODE
    if main:
        scores = trainer.last_val_metrics
        loss = f"   val loss {scores['loss']:.4f}" if "loss" in scores else ""
        from aurora_loop.callbacks import ModelCheckpoint
        from aurora_loop.callbacks.time_limit import TimeLimit
        from aurora_loop.cli.summary import build_summary, summary_lines, write_summary

        stopped_by = None
        if any(isinstance(cb, TimeLimit) and cb.reason for cb in callbacks):
            stopped_by = f"--max_time {config.max_time}"
            print(f"Stopped by --max_time {config.max_time} at step {trainer.global_step} after saving{loss}; "
                  "rerun the same command to continue")
        else:
            print(f"Training finished at step {trainer.global_step}{loss}")
        checkpoint = next((cb for cb in callbacks if isinstance(cb, ModelCheckpoint)), None)
        summary = build_summary(trainer, config, checkpoint, out, started, stopped_by)
        summary_path = os.path.join(out, "summary.json")
        write_summary(summary_path, summary)
        print("\n".join(summary_lines(summary)))
        print(f"Summary: {summary_path}", flush=True)
    return 0


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command; ``prog``: the name it is called by (``aurora-loop memory`` forwards here)."""
    started = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config, args = resolve_config(argv, prog)
        with quiet_third_party(config.verbose):
            if config.estimate_memory:  # compiles and prints; writes nothing, not even the output dir
                from aurora_loop.cli.memory import estimate_run

                return estimate_run(config)
            clear_previous = check_output_dir(config, overwrite=args.overwrite)
            if not clear_previous:  # a run that continues keeps its learning-rate schedule
                config = inherit_schedule(config, resume=args.resume)
            return run(config, resume=args.resume, clear_previous=clear_previous, callback_specs=tuple(args.callback),
                       print_param_groups=args.print_param_groups, started=started)
    except UsageError as err:
        return leave_job(report_usage_error(err, prog))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return leave_job(130)


if __name__ == "__main__":
    sys.exit(main())
