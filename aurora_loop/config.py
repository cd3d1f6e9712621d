"""TrainingConfig: every knob of a training run, one dataclass field each.

Every field is also an ``aurora-train`` flag of the same name; ``--config FILE`` (JSON or
YAML) sets fields and flags override it. The resolved config is written to
``output_dir/config.json`` next to the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from aurora_loop.errors import UsageError


def _field(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """A training run. Field docs double as ``--help`` text."""

    # Data.
    dataset_path: str | None = _field(None, "WeatherBench2-layout Zarr store (or tfds:NAME[:SPLIT]); none: write the synthetic sample to output_dir/sample_data.zarr and train on it")
    static_path: str | None = _field(None, "separate Zarr store holding the static fields; none: the --dataset_path store")
    surf_vars: tuple[str, ...] = _field(("2t", "10u", "10v", "msl"), "surface variables (Aurora names, comma list; empty: none)")
    static_vars: tuple[str, ...] = _field(("lsm", "z", "slt"), "static variables (comma list; empty: none)")
    atmos_vars: tuple[str, ...] = _field(("z", "u", "v", "t", "q"), "atmospheric variables (comma list; empty: none)")
    levels: tuple[int, ...] = _field((), "pressure levels in hPa (comma list; empty: all levels in the store)")
    history: int = _field(2, "input time steps per sample (Aurora's max_history_size)")
    train_start: str | None = _field(None, "first time of the training split (ISO 8601); all split bounds unset: the last ~20%% of times validate")
    train_end: str | None = _field(None, "last time of the training split (ISO 8601)")
    val_start: str | None = _field(None, "first time of the validation split (ISO 8601)")
    val_end: str | None = _field(None, "last time of the validation split (ISO 8601)")
    num_workers: int = _field(4, "data-loading threads per process")
    prefetch: int | None = _field(None, "batches read ahead per process (none: 2 x num_workers)")
    cache_mb: float = _field(256.0, "read a store whose selected fields fit in this many MiB into memory once (0: never)")
    nan_policy: str = _field("error", "a sample holding NaNs: error (stop with a message) or skip (replace it by the next clean one)")
    variable_map: dict[str, str] | None = _field(None, "store variable name -> Aurora name overrides, e.g. t2m=2t,sp=msl (or a JSON object)")
    tfds_data_dir: str | None = _field(None, "data_dir of a TensorFlow Datasets source (--dataset_path tfds:NAME[:SPLIT])")
    storage_options: dict[str, Any] | None = _field(None, "object-storage settings (obstore's keys), e.g. '{\"region\": \"eu-west-1\"}'; none: credentials from the environment, else anonymous")
    cache_dir: str | None = _field(None, "keep a remote store's chunks in this local directory (a node's processes may share it)")
    cache_gb: float = _field(50.0, "the most GB --cache_dir holds")

    # Model.
    model: str = _field("tiny", "registered task: Aurora as tiny (the CPU demo size), small or aurora; Aurora 1.5 as v1p5, v1p5_tiny, v1p5_ensemble or v1p5_ensemble_tiny; or conv (a small CNN baseline)")
    checkpoint_dir: str | None = _field(None, "directory with pretrained encoder/, backbone/, decoder/ checkpoints to start from")
    checkpoint_encoder: str | None = _field(None, "pretrained encoder checkpoint (overrides checkpoint_dir/encoder)")
    checkpoint_backbone: str | None = _field(None, "pretrained backbone checkpoint (overrides checkpoint_dir/backbone)")
    checkpoint_decoder: str | None = _field(None, "pretrained decoder checkpoint (overrides checkpoint_dir/decoder)")
    timestep_hours: float | None = _field(None, "the model's step in hours (Aurora's lead time per roll-out step); none: the data's time step")
    lead_times: tuple[float, ...] = _field((), "hours (comma list, e.g. 1,3,6) to draw each training example's last lead time from (Aurora 1.5's sub-6-hour steps; docs/finetuning.md); empty: every step is the data's step")
    ensemble_members: int = _field(1, "members per example for the ensemble models (v1p5_ensemble*: at least 2, trained with the fair CRPS); other models take 1")
    bf16: bool = _field(False, "same as --precision bf16-mixed (kept for existing scripts)")
    precision: str = _field("fp32", "fp32, bf16-mixed (float32 parameters, bfloat16 compute) or bf16-params (bfloat16 parameters and compute, float32 master weights in the optimizer)")
    remat: bool = _field(False, "rematerialise activations per block to save memory")
    remat_policy: str = _field("inputs", "with --remat, what a block keeps for the backward pass: inputs (the least memory) or dots (also its linear layers' outputs: faster, more memory)")
    lora_only: bool = _field(False, "train only the LoRA weights (names containing 'lora'); the base weights stay frozen (no updates, no Adam state)")
    fsdp: bool = _field(False, "shard parameters and optimizer state over the devices (FSDP / ZeRO-3)")
    model_kwargs: dict[str, Any] | None = _field(None, "JSON object of the reference Aurora constructor's keyword arguments, over the preset (or --checkpoint_dir's config.json), e.g. '{\"use_lora\": true}'")
    new_weights_init: str = _field("zero", "with --checkpoint_dir, what new variables' slices start from: zero (the pretrained variables' forecasts stay as they were) or default (a fresh initialisation)")
    stats: str | None = _field(None, "JSON of normalisation statistics from `aurora-loop stats`, for the variables and levels without built-in ones")

    # Optimisation.
    batch_size: int = _field(2, "global batch size, split over all devices of the mesh")
    learning_rate: float = _field(5e-5, "peak learning rate (AdamW), reached after warmup_steps")
    warmup_steps: int = _field(100, "linear warm-up steps; then cosine decay to learning_rate / 10 at the last step")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    grad_clip_norm: float | None = _field(None, "clip gradients to this global norm (none: no clipping)")
    accumulate_grad_batches: int = _field(1, "micro-batches of --batch_size averaged into each optimizer step (effective batch: batch_size x N); steps and logs count optimizer steps")
    freeze: tuple[str, ...] = _field((), "regular expressions (comma list) over parameter paths (see --print_param_groups) whose parameters stay fixed, e.g. 'encoder\\..*'")
    lr_multipliers: dict[str, float] | None = _field(None, "PATTERN=FACTOR pairs (comma list): parameters whose path matches PATTERN learn at FACTOR x the learning rate, e.g. encoder.surf_token_embeds=20")
    ema_decay: float | None = _field(None, "keep a moving average of the weights with this decay per step, e.g. 0.999; validation, maps, export and forecast use it (see --eval_weights)")
    eval_weights: str = _field("ema", "with --ema_decay: validate and draw maps with the ema weights or the raw ones")
    epochs: int = _field(20, "passes over the training split (may change on resume; the learning-rate schedule does not)")
    max_steps: int | None = _field(None, "stop after this many optimizer steps; none: --epochs decides (may change on resume)")
    lr_schedule_steps: int | None = _field(None, "length of the learning-rate schedule in steps (warm-up, cosine decay, then the final rate); none: the run's length when it starts (a resume keeps it)")
    rollout_steps: int = _field(1, "autoregressive steps per sample, each with its own target")
    loss_surf_weights: dict[str, float] | None = _field(None, "Aurora loss: surface variable weights over the paper's (2t 3.0, 10u 0.77, 10v 0.66, msl 1.5; others 1), e.g. 2t=1,msl=2")
    loss_atmos_weights: dict[str, float] | None = _field(None, "Aurora loss: atmospheric variable weights over the paper's (z 2.8, q 0.78, t 1.7, u 0.87, v 0.6; others 1), e.g. z=3.5")
    loss_gamma: float = _field(1.0, "Aurora loss: the dataset weight gamma (the paper: 2.0 for ERA5; with one dataset it only rescales the loss)")
    latitude_weighted_loss: bool = _field(False, "Aurora loss: weight each grid row by its area (WeatherBench2's latitude weights, mean 1); the paper's loss is unweighted")
    average_rollout_loss: bool = _field(True, "average the loss over roll-out steps (else: the last step's loss)")
    rollout_mode: str = _field("full", "full (back-propagate through every step), pushforward (gradients through the last step only) or replay (the paper's buffer of the model's own forecasts)")
    replay_buffer_size: int = _field(4, "replay mode: slots in the replay buffer, each one global batch of roll-out states")
    replay_refresh_every: int = _field(2, "replay mode: a fresh dataset batch enters the buffer every this many steps (1..rollout_steps)")
    seed: int = _field(0, "seed for parameters, shuffling and any stochastic layers")

    compile_cache: str | None = _field("~/.cache/aurora_loop/xla", "directory of JAX's persistent compilation cache, so a rerun loads the compiled steps ($XDG_CACHE_HOME honoured; JAX_COMPILATION_CACHE_DIR wins); none: off")

    # Devices.
    num_gpus: int | None = _field(None, "devices in the mesh over all processes (CPU devices on a CPU-only machine); none: all visible")
    space_parallel: int = _field(1, "devices sharing each example in latitude bands (divides --num_gpus; the batch splits over num_gpus / N)")

    # Memory estimate (aurora-loop memory takes the same flags).
    estimate_memory: bool = _field(False, "compile the step on abstract parameters, print each device's memory, exit; writes nothing")
    estimate_grid: str | None = _field(None, "with --estimate_memory: this LATxLON grid (e.g. 721x1440) instead of the store's")
    device_memory_gib: float | None = _field(None, "with --estimate_memory: a device's GiB to fit (none: this accelerator's); names changes that fit")

    # Multi-process (JAX's distributed runtime). Unset: auto-detected under SLURM / Open MPI,
    # else a single process.
    coordinator_address: str | None = _field(None, "address of process 0 for jax.distributed.initialize; none: auto-detect under SLURM/Open MPI, else one process")
    num_processes: int | None = _field(None, "number of processes in the job (with --coordinator_address)")
    process_id: int | None = _field(None, "this process's index, 0-based (with --coordinator_address)")

    # Output.
    output_dir: str = _field("outputs", "run directory: config.json, checkpoints/, tensorboard/, summary.json")
    save_every_n_steps: int = _field(200, "checkpoint every this many steps (and at the end)")
    max_to_keep: int | None = _field(3, "keep at most this many step checkpoints (none: all)")
    val_every_n_steps: int | None = _field(None, "validate every this many steps (none: at the end of each epoch)")
    val_rollout_steps: int | None = _field(None, "roll-out steps of each validation sample (Aurora also logs per-lead scores, val/rmse/<var>/<lead>h); none: --rollout_steps")
    max_time: str | None = _field(None, "stop cleanly (checkpoint, exit 0) before this much wall-clock time since the start, e.g. 02:30:00")
    save_every_n_minutes: float | None = _field(None, "also checkpoint when this many minutes have passed since the last save (process 0's clock)")
    log_every_n_steps: int = _field(10, "write training scalars every this many steps")
    val_table: str = _field("compact", "validation scores on the console: compact (RMSE; the levels that fit 80 columns), full (MAE and RMSE, every level) or none (the loss)")
    verbose: bool = _field(False, "also show third-party warnings and log messages (JAX, orbax, absl) on the console")
    monitor: str | None = _field(None, "validation score that picks the best checkpoints, e.g. val/loss (none: keep only the newest)")
    mode: str = _field("min", "min or max: which way --monitor improves")
    save_top_k: int = _field(1, "with --monitor, keep this many best checkpoints besides the newest")
    early_stopping_patience: int | None = _field(None, "stop after this many validations without improvement of --monitor (val/loss when unset); none: never")
    early_stopping_min_delta: float = _field(0.0, "smallest change of the monitored score, in its units, that counts as an improvement")
    profile_steps: str | None = _field(None, "trace N steps after step START with jax.profiler into output_dir/tensorboard")
    use_wandb: bool = _field(False, "also log to Weights & Biases (extra 'wandb')")
    wandb_project: str | None = _field(None, "Weights & Biases project name; none: W&B's default")

    def replace(self, **changes: Any) -> TrainingConfig:
        return dataclasses.replace(self, **changes)

    def to_json_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v, tuple) else v) for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    @property
    def compute_bf16(self) -> bool:
        """Whether the model computes in bfloat16 (``--precision bf16-*`` or ``--bf16``)."""
        return self.bf16 or self.precision != "fp32"

    @property
    def max_time_seconds(self) -> float | None:
        """``max_time`` in seconds (``None``: no limit)."""
        return None if self.max_time is None else parse_duration(self.max_time)

    @property
    def pretrained_paths(self) -> dict[str, str]:
        """Pretrained part checkpoints to load, by part name (encoder/backbone/decoder)."""
        paths = {}
        for part in ("encoder", "backbone", "decoder"):
            explicit = getattr(self, f"checkpoint_{part}")
            if explicit:
                paths[part] = explicit
            elif self.checkpoint_dir:
                paths[part] = os.path.join(self.checkpoint_dir, part)
        return paths


# Fields compared when rerunning into an existing output dir: changing any of these makes a
# different run. The rest (epochs, max_steps, logging cadence, workers) may change on resume.
RESUME_INSENSITIVE = frozenset(
    {"epochs", "max_steps", "num_workers", "prefetch", "cache_mb", "coordinator_address", "num_processes", "process_id", "log_every_n_steps", "save_every_n_steps", "max_to_keep",
     "val_every_n_steps", "use_wandb", "wandb_project", "output_dir", "monitor", "mode", "save_top_k",
     "early_stopping_patience", "early_stopping_min_delta", "profile_steps", "val_rollout_steps", "max_time", "compile_cache",
     "save_every_n_minutes", "eval_weights", "estimate_memory", "estimate_grid", "device_memory_gib", "val_table", "verbose",
     "storage_options", "cache_dir", "cache_gb",
     # the mesh: a checkpoint written on one resumes on another (restored into the new shardings)
     "num_gpus", "space_parallel", "fsdp"}
)

# aurora-train --help groups, in the order of the docs, each with the page that tells more.
HELP_GROUPS = {
    "data": "docs/data.md",
    "model": "docs/model.md",
    "optimisation": "docs/finetuning.md",
    "roll-outs": "docs/finetuning.md",
    "parallelism and processes": "docs/cluster.md",
    "checkpoints and resuming": "docs/cluster.md",
    "logging and callbacks": "docs/callbacks.md",
}
# Every field's --help group: one line per field, so a new field is one line here
# (tests/test_help.py refuses a field without a group).
FIELD_GROUPS = {
    "dataset_path": "data",
    "static_path": "data",
    "surf_vars": "data",
    "static_vars": "data",
    "atmos_vars": "data",
    "levels": "data",
    "history": "data",
    "train_start": "data",
    "train_end": "data",
    "val_start": "data",
    "val_end": "data",
    "num_workers": "data",
    "prefetch": "data",
    "cache_mb": "data",
    "nan_policy": "data",
    "variable_map": "data",
    "tfds_data_dir": "data",
    "storage_options": "data",
    "cache_dir": "data",
    "cache_gb": "data",
    "model": "model",
    "checkpoint_dir": "model",
    "checkpoint_encoder": "model",
    "checkpoint_backbone": "model",
    "checkpoint_decoder": "model",
    "timestep_hours": "model",
    "ensemble_members": "model",
    "bf16": "model",
    "precision": "model",
    "remat": "model",
    "remat_policy": "model",
    "model_kwargs": "model",
    "new_weights_init": "model",
    "stats": "model",
    "batch_size": "optimisation",
    "learning_rate": "optimisation",
    "warmup_steps": "optimisation",
    "weight_decay": "optimisation",
    "grad_clip_norm": "optimisation",
    "accumulate_grad_batches": "optimisation",
    "freeze": "optimisation",
    "lr_multipliers": "optimisation",
    "lora_only": "optimisation",
    "ema_decay": "optimisation",
    "eval_weights": "optimisation",
    "epochs": "optimisation",
    "max_steps": "optimisation",
    "lr_schedule_steps": "optimisation",
    "loss_surf_weights": "optimisation",
    "loss_atmos_weights": "optimisation",
    "loss_gamma": "optimisation",
    "latitude_weighted_loss": "optimisation",
    "seed": "optimisation",
    "rollout_steps": "roll-outs",
    "average_rollout_loss": "roll-outs",
    "rollout_mode": "roll-outs",
    "replay_buffer_size": "roll-outs",
    "replay_refresh_every": "roll-outs",
    "lead_times": "roll-outs",
    "val_rollout_steps": "roll-outs",
    "num_gpus": "parallelism and processes",
    "space_parallel": "parallelism and processes",
    "fsdp": "parallelism and processes",
    "coordinator_address": "parallelism and processes",
    "num_processes": "parallelism and processes",
    "process_id": "parallelism and processes",
    "estimate_memory": "parallelism and processes",
    "estimate_grid": "parallelism and processes",
    "device_memory_gib": "parallelism and processes",
    "output_dir": "checkpoints and resuming",
    "save_every_n_steps": "checkpoints and resuming",
    "save_every_n_minutes": "checkpoints and resuming",
    "max_to_keep": "checkpoints and resuming",
    "monitor": "checkpoints and resuming",
    "mode": "checkpoints and resuming",
    "save_top_k": "checkpoints and resuming",
    "max_time": "checkpoints and resuming",
    "compile_cache": "checkpoints and resuming",
    "log_every_n_steps": "logging and callbacks",
    "val_every_n_steps": "logging and callbacks",
    "val_table": "logging and callbacks",
    "verbose": "logging and callbacks",
    "early_stopping_patience": "logging and callbacks",
    "early_stopping_min_delta": "logging and callbacks",
    "profile_steps": "logging and callbacks",
    "use_wandb": "logging and callbacks",
    "wandb_project": "logging and callbacks",
}


PRECISIONS = ("fp32", "bf16-mixed", "bf16-params")


def parse_duration(text: str) -> float:
    """Seconds in ``[DD:]HH:MM:SS`` (Lightning's ``max_time`` format), or raise UsageError."""
    parts = str(text).strip().split(":")
    try:
        if len(parts) not in (3, 4) or not all(p.strip().isdigit() for p in parts):
            raise ValueError
        *days, hours, minutes, seconds = (int(p) for p in parts)
        if minutes >= 60 or seconds >= 60:
            raise ValueError
    except ValueError:
        raise UsageError(f"max_time must be [DD:]HH:MM:SS, got {text!r}; e.g. --max_time 02:30:00") from None
    total = ((days[0] if days else 0) * 24 + hours) * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise UsageError(f"max_time must be longer than zero, got {text!r}; e.g. --max_time 02:30:00")
    return float(total)


def field_type(field: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional) of a config field, from its annotation."""
    hint = typing.get_type_hints(TrainingConfig)[field.name]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        return tuple[typing.get_args(hint)[0], ...], optional
    if typing.get_origin(hint) is dict:
        return hint, optional
    return hint, optional


def _float_mapping(value: Any, name: str, source: str) -> dict[str, float]:
    """A name -> non-negative number mapping (loss weights), or raise UsageError."""
    try:
        if not isinstance(value, Mapping):
            raise ValueError
        out = {str(k): float(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise UsageError(f"{source}: {name} must map variable names to numbers, e.g. 2t=3.0,msl=1.5; got {value!r}") from None
    negative = [k for k, v in out.items() if not v >= 0]
    if negative:
        raise UsageError(f"{source}: {name} gives {negative[0]} a weight of {out[negative[0]]}; weights must be numbers >= 0")
    return out


def _json_object(value: Any, name: str, source: str) -> dict[str, Any]:
    """A JSON object given as text (a flag) or as a mapping (a config file), or raise UsageError."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise UsageError(f"{source}: {name} is not valid JSON ({err.msg} at column {err.colno}); "
                             f"write e.g. --{name} '{{\"use_lora\": true}}'") from None
    if not isinstance(value, Mapping):
        raise UsageError(f"{source}: {name} must be a JSON object of keyword arguments, got {value!r}")
    return {str(k): v for k, v in value.items()}


def coerce(field: dataclasses.Field, value: Any, source: str) -> Any:
    """Convert a value from a flag string or a config file to the field's type, or raise UsageError."""
    base, optional = field_type(field)
    name = field.name
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise UsageError(f"{source}: {name} cannot be empty; give a value ({field.metadata['help']})")
    if typing.get_origin(base) is dict and typing.get_args(base)[1] is Any:
        return _json_object(value, name, source)
    if typing.get_origin(base) is dict:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                try:
                    value = json.loads(text)
                except ValueError:
                    raise UsageError(f"{source}: {name} is not a valid JSON object: {value!r}") from None
            else:
                pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
                if any(len(p) != 2 for p in pairs):
                    example = "2t=3.0,msl=1.5" if typing.get_args(base)[1] is float else "t2m=2t,sp=msl"
                    raise UsageError(f"{source}: {name} must be NAME=VALUE pairs separated by commas, e.g. {example}")
                value = {k.strip(): v.strip() for k, v in pairs}
        if typing.get_args(base)[1] is float:
            return _float_mapping(value, name, source)
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise UsageError(f"{source}: {name} must map names to names, got {value!r}")
        return dict(value)
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{source}: {name} must be a list, got {value!r}; write e.g. {name}: [a, b] or --{name} a,b")
        try:
            return tuple(item(v) for v in value)
        except (TypeError, ValueError):
            raise UsageError(f"{source}: {name} must be a list of {item.__name__}, got {value!r}") from None
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UsageError(f"{source}: {name} must be true or false, got {value!r}")
    if base in (int, float):
        if isinstance(value, bool) or (base is int and isinstance(value, float) and not value.is_integer()):
            raise UsageError(f"{source}: {name} must be {'an integer' if base is int else 'a number'}, got {value!r}")
        try:
            return base(value)
        except (TypeError, ValueError):
            raise UsageError(f"{source}: {name} must be {'an integer' if base is int else 'a number'}, got {value!r}") from None
    if not isinstance(value, str):
        raise UsageError(f"{source}: {name} must be a string, got {value!r}")
    return value


def config_from_mapping(values: Mapping[str, Any], source: str, base: TrainingConfig | None = None) -> TrainingConfig:
    """Overlay ``values`` (from a file or flags) on ``base``; unknown keys and wrong types are UsageErrors."""
    fields = {f.name: f for f in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UsageError(f"{source}: unknown setting {unknown[0]!r}; known settings are the aurora-train flags (see aurora-train --help)")
    changes = {name: coerce(fields[name], value, source) for name, value in values.items()}
    return dataclasses.replace(base or TrainingConfig(), **changes)


def load_config_file(path: str) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict, or raise UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"config file {path} does not exist; check the --config path")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 - any parse error is the user's file
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"config file {path} cannot be parsed ({first_line}); fix its syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def replay_settings_problem(buffer_size: int, refresh_every: int, rollout_steps: int) -> str | None:
    """What is wrong with replay mode's settings (one line), or ``None``: the buffer must always
    hold a state to train on."""
    if buffer_size < 1:
        return f"replay_buffer_size must be at least 1, got {buffer_size}"
    if not 1 <= refresh_every <= rollout_steps:
        return (f"replay_refresh_every ({refresh_every}) must be between 1 and rollout_steps ({rollout_steps}): "
                "a buffered sample is used up after rollout_steps steps; raise --rollout_steps or lower --replay_refresh_every")
    return None


def parse_grid(text: str) -> tuple[int, int]:
    """``"721x1440"`` -> (721, 1440), or a UsageError naming the form."""
    try:
        h, w = (int(v) for v in str(text).lower().replace(" ", "").split("x"))
    except ValueError:
        raise UsageError(f"estimate_grid {text!r} is not HxW; give latitudes x longitudes, e.g. --estimate_grid 721x1440") from None
    if h < 2 or w < 2:
        raise UsageError(f"estimate_grid {text!r} needs at least 2 latitudes and 2 longitudes, e.g. --estimate_grid 721x1440")
    return h, w


def validate(config: TrainingConfig) -> None:
    """Check value ranges that types alone cannot; raise UsageError naming the fix."""
    positive = {"batch_size": "--batch_size 2", "epochs": "--epochs 20", "rollout_steps": "--rollout_steps 1",
                "history": "--history 2", "save_every_n_steps": "--save_every_n_steps 200",
                "log_every_n_steps": "--log_every_n_steps 10"}
    for name, example in positive.items():
        if getattr(config, name) < 1:
            raise UsageError(f"{name} must be at least 1, got {getattr(config, name)}; e.g. {example}")
    if not config.learning_rate > 0:
        raise UsageError(f"learning_rate must be positive, got {config.learning_rate}; e.g. --learning_rate 5e-5")
    for name in ("max_steps", "val_every_n_steps", "num_gpus", "max_to_keep", "lr_schedule_steps"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1 (or none), got {value}")
    if config.warmup_steps < 0 or config.num_workers < 0:
        raise UsageError("warmup_steps and num_workers must not be negative")
    if config.weight_decay < 0:
        raise UsageError(f"weight_decay must not be negative, got {config.weight_decay}")
    if config.grad_clip_norm is not None and config.grad_clip_norm <= 0:
        raise UsageError(f"grad_clip_norm must be positive (or none), got {config.grad_clip_norm}")
    if config.mode not in ("min", "max"):
        raise UsageError(f"mode must be min or max, got {config.mode!r}")
    if config.save_top_k < 1 or (config.early_stopping_patience is not None and config.early_stopping_patience < 1):
        raise UsageError("save_top_k and early_stopping_patience must be at least 1")
    if config.profile_steps is not None:
        start, sep, count = config.profile_steps.partition(":")
        if not (sep and start.isdigit() and count.isdigit() and int(count) > 0):
            raise UsageError(f"profile_steps must be START:N with whole numbers, got {config.profile_steps!r}; e.g. --profile_steps 10:5")
    if config.accumulate_grad_batches < 1:
        raise UsageError(f"accumulate_grad_batches must be at least 1, got {config.accumulate_grad_batches}; e.g. --accumulate_grad_batches 4")
    if config.accumulate_grad_batches > 1 and config.rollout_mode == "replay":
        raise UsageError("--accumulate_grad_batches does not combine with --rollout_mode replay (each replay step is its own batch); "
                         "use --rollout_mode full or pushforward, or drop --accumulate_grad_batches")
    if config.precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    if config.bf16 and config.precision != "bf16-mixed" and config.precision != "fp32":
        raise UsageError(f"--bf16 means --precision bf16-mixed and contradicts --precision {config.precision}; drop --bf16")
    if config.ema_decay is not None and not 0 < config.ema_decay < 1:
        raise UsageError(f"ema_decay must lie between 0 and 1, got {config.ema_decay}; e.g. --ema_decay 0.999")
    if config.eval_weights not in ("ema", "raw"):
        raise UsageError(f"eval_weights must be ema or raw, got {config.eval_weights!r}")
    for pattern in config.freeze + tuple(config.lr_multipliers or {}):
        try:
            re.compile(pattern)
        except re.error as err:
            raise UsageError(f"{pattern!r} is not a regular expression ({err}); patterns match parameter paths such as encoder.surf_token_embeds") from None
    bad = {k: v for k, v in (config.lr_multipliers or {}).items() if not v > 0}
    if bad:
        name = next(iter(bad))
        raise UsageError(f"lr_multipliers gives {name} a factor of {bad[name]}; factors must be positive (freeze with --freeze instead)")
    if config.val_rollout_steps is not None and config.val_rollout_steps < 1:
        raise UsageError(f"val_rollout_steps must be at least 1 (or none), got {config.val_rollout_steps}")
    if config.max_time is not None:
        parse_duration(config.max_time)
    if config.save_every_n_minutes is not None and not config.save_every_n_minutes > 0:
        raise UsageError(f"save_every_n_minutes must be positive (or none), got {config.save_every_n_minutes}")
    if config.timestep_hours is not None and not config.timestep_hours > 0:
        raise UsageError(f"timestep_hours must be positive, got {config.timestep_hours}")
    bad_leads = [v for v in config.lead_times if not v > 0]
    if bad_leads:
        raise UsageError(f"lead_times must be positive hours, got {bad_leads[0]:g}; e.g. --lead_times 1,3,6")
    if config.ensemble_members < 1:
        raise UsageError(f"ensemble_members must be at least 1, got {config.ensemble_members}; e.g. --ensemble_members 4")
    loss_settings = [n for n in ("loss_surf_weights", "loss_atmos_weights") if getattr(config, n)]
    loss_settings += ["loss_gamma"] * (config.loss_gamma != 1.0) + ["latitude_weighted_loss"] * config.latitude_weighted_loss
    if config.model == "conv" and config.stats:
        raise UsageError("--stats gives Aurora's normalisation statistics; the conv model normalises its inputs itself: "
                         "use --model tiny, small or aurora, or drop --stats")
    if config.model == "conv" and loss_settings:
        raise UsageError(f"--{loss_settings[0]} sets the Aurora loss; the conv model has its own: use --model tiny, small or aurora, or drop it")
    if not config.loss_gamma > 0:
        raise UsageError(f"loss_gamma must be positive, got {config.loss_gamma}")
    for name, variables in (("loss_surf_weights", config.surf_vars), ("loss_atmos_weights", config.atmos_vars)):
        unknown = sorted(set(getattr(config, name) or {}) - set(variables))
        if unknown:
            raise UsageError(f"{name} names {unknown[0]}, which is not among the variables trained ({', '.join(variables) or 'none'})")
    if config.model == "conv" and config.model_kwargs:
        raise UsageError("--model_kwargs sets Aurora's constructor arguments; the conv model takes none: use --model tiny, small or aurora, or drop it")
    if config.rollout_mode not in ("full", "pushforward", "replay"):
        raise UsageError(f"rollout_mode must be full, pushforward or replay, got {config.rollout_mode!r}")
    if config.rollout_mode == "replay":
        problem = replay_settings_problem(config.replay_buffer_size, config.replay_refresh_every, config.rollout_steps)
        if problem:
            raise UsageError(problem)
    if config.remat_policy not in ("inputs", "dots"):
        raise UsageError(f"remat_policy must be inputs or dots, got {config.remat_policy!r}")
    if config.remat_policy != "inputs" and not config.remat:
        raise UsageError(f"--remat_policy {config.remat_policy} chooses what --remat keeps; add --remat")
    for name in ("estimate_grid", "device_memory_gib"):
        if getattr(config, name) is not None and not config.estimate_memory:
            raise UsageError(f"--{name} belongs to the memory estimate; add --estimate_memory (or run aurora-loop memory)")
    if config.estimate_grid is not None:
        parse_grid(config.estimate_grid)
    if config.device_memory_gib is not None and not config.device_memory_gib > 0:
        raise UsageError(f"device_memory_gib must be positive, got {config.device_memory_gib}; e.g. --device_memory_gib 80")
    if config.space_parallel < 1:
        raise UsageError(f"space_parallel must be at least 1, got {config.space_parallel}; e.g. --space_parallel 4")
    if config.space_parallel > 1 and config.model == "conv":
        raise UsageError("--space_parallel splits an Aurora model's grid over devices; the conv baseline cannot be split: "
                         "drop --space_parallel or use --model tiny, small or aurora")
    if config.nan_policy not in ("error", "skip"):
        raise UsageError(f"nan_policy must be error or skip, got {config.nan_policy!r}")
    if config.cache_mb < 0 or (config.prefetch is not None and config.prefetch < 1):
        raise UsageError("cache_mb must not be negative and prefetch must be at least 1 (or none)")
    if not (config.surf_vars or config.atmos_vars):
        raise UsageError("no variables to forecast: give --surf_vars and/or --atmos_vars")
