"""``aurora-loop export-checkpoint RUN_DIR [--step N|latest|best] [--format F] --out PATH``: hand weights on.

Reads the training checkpoint ``RUN_DIR/checkpoints/<step>/`` (written by ModelCheckpoint;
``RUN_DIR`` may also be its ``checkpoints/`` dir or one step dir) and writes the parameters
alone: only the ``params`` or ``ema_params`` of the saved state are read, never the optimizer
state (:mod:`aurora_loop.inference.runs`). ``--format orbax`` (the default) writes the seed's layout
to the directory ``PATH``:

- ``DIR/encoder``, ``DIR/backbone``, ``DIR/decoder``: orbax PyTree checkpoints of the
  parameters' top-level parts of those names (Aurora's layout; what
  ``aurora_loop.model.checkpoint.load_params`` and ``aurora-train --checkpoint_dir`` read).
  Parameters wrapped in a Flax ``{"params": ...}`` collection are unwrapped first. Other
  top-level parts (e.g. LoRA adapters) are written next to them as ``DIR/<part>``.
- ``DIR/model``: the whole parameter tree, for a model without those parts (e.g. ``conv``);
  the command says so.
- ``DIR/config.json``: the model's configuration when the run's task exposes one
  (``task.model_config`` with ``to_json()``, e.g. an AuroraConfig), else the run's training
  config; ``DIR/training_config.json``: the run's ``config.json``; ``DIR/export.json``:
  where the weights came from (run, step, parts).

``--format torch|safetensors|npz`` (Aurora runs only: tasks with a ``model_config``) write
the PyTorch reference's name-based ``state_dict()`` (float32;
:func:`aurora_loop.model.reference_export.params_to_state_dict`) to the file ``PATH``
(``.ckpt``/``.pt``/``.pth``, ``.safetensors``, ``.npz`` respectively) and the reference's
constructor keyword arguments to ``PATH.json`` (e.g. ``model.ckpt`` and ``model.ckpt.json``):

    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in json.load(open("model.ckpt.json")).items()}
    if "timestep" in kwargs:  # present only when not the default 6 h; in hours
        kwargs["timestep"] = datetime.timedelta(hours=kwargs["timestep"])
    model = aurora.Aurora(**kwargs)
    model.load_checkpoint_local("model.ckpt")

The lists must become tuples: the reference's encoder extends ``surf_vars`` in place
(``surf_vars += static_vars``), so a list argument silently gives the decoder heads for the
static variables too, and the strict load fails.

``torch`` is ``torch.save`` of a plain dict name -> tensor (needs the optional ``torch``
extra); ``safetensors`` is written here without the ``safetensors`` package; all three are
read back by ``aurora-loop import-checkpoint``.

Nothing is overwritten: an existing non-empty ``DIR`` (or an existing file ``PATH`` or
``PATH.json``) is refused unless ``--force``; the export is written to a temporary sibling
and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from aurora_loop.errors import UsageError
from aurora_loop.inference.runs import (
    PARTS,
    WEIGHT_CHOICES,
    WEIGHTS_HELP,
    resolve_run,
)

FORMATS = ("orbax", "torch", "safetensors", "npz")
# The file name endings each state-dict format writes (what import-checkpoint reads).
EXTENSIONS = {"torch": (".ckpt", ".pt", ".pth"), "safetensors": (".safetensors",), "npz": (".npz",)}


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a training run's --output_dir (holding checkpoints/), its checkpoints/ dir or one checkpoints/<step> dir",
    )
    parser.add_argument(
        "--step",
        default="latest",
        help="checkpoint step to export: a number, latest or best (ModelCheckpoint's monitored best)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="orbax",
        help="orbax: encoder/, backbone/, decoder/ in the directory PATH, as import-checkpoint writes; "
        "torch, safetensors, npz: the PyTorch reference's state_dict in the file PATH (.ckpt, .safetensors, .npz) "
        "with its aurora.Aurora keyword arguments in PATH.json (Aurora runs only; torch needs pip install 'aurora_loop[torch]')",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="directory (orbax; must not exist or be empty) or file (the other formats; must not exist) to write, unless --force",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing PATH (and PATH.json)")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto", help=WEIGHTS_HELP)


def split_params(params: Any) -> tuple[dict[str, Any], bool]:
    """(parts to write, split by encoder/backbone/decoder?)."""
    if isinstance(params, Mapping) and set(params) == {"params"} and isinstance(params["params"], Mapping):
        inner = params["params"]
        if all(p in inner for p in PARTS):
            params = inner
    if isinstance(params, Mapping) and all(p in params for p in PARTS):
        return {k: params[k] for k in params}, True
    return {"model": params}, False


def _model_config_json(training_config: Mapping[str, Any] | None) -> str | None:
    """The task's model configuration (``task.model_config.to_json()``), if it exposes one."""
    if not training_config or "model" not in training_config:
        return None
    try:
        from aurora_loop.config import config_from_mapping
        from aurora_loop.task import make_task

        task = make_task(training_config["model"], config_from_mapping(dict(training_config), source="run config"))
    except Exception:  # noqa: BLE001 - an unknown or unbuildable task: fall back to the training config
        return None
    model_config = getattr(task, "model_config", None)
    return model_config.to_json() if hasattr(model_config, "to_json") else None


def export(
    run_dir: str, out: str, step: str = "latest", force: bool = False, weights: str = "auto", format: str = "orbax"
) -> dict[str, Any]:
    """Write the export (see the module docstring); returns what ``export.json`` records
    (for the state-dict formats: the same record, which is not written)."""
    if format != "orbax":
        return export_state_dict(run_dir, out, format, step=step, force=force, weights=weights)
    import orbax.checkpoint as ocp

    checkpoint = resolve_run(run_dir, step)
    run_dir, chosen, out = checkpoint.run_dir, checkpoint.step, os.path.abspath(out)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)) and not force:
        raise UsageError(f"--out {out} exists and is not empty; choose a new directory or pass --force to replace it")
    params, weights_read = checkpoint.read_weights(weights)
    parts, split = split_params(params)
    training_config = checkpoint.config_values

    parent = os.path.dirname(out) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        checkpointer = ocp.PyTreeCheckpointer()
        for name, tree in parts.items():
            checkpointer.save(os.path.join(tmp, name), tree, force=True)
        model_json = _model_config_json(training_config)
        config_text = model_json if model_json is not None else json.dumps(training_config or {}, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            fh.write(config_text.rstrip() + "\n")
        if training_config is not None:
            with open(os.path.join(tmp, "training_config.json"), "w", encoding="utf-8") as fh:
                json.dump(training_config, fh, indent=2, sort_keys=True)
        record = {
            "run_dir": run_dir,
            "step": chosen,
            "layout": "encoder/backbone/decoder" if split else "model",
            "parts": sorted(parts),
            "config": "model" if model_json is not None else "training",
            "weights": "ema" if weights_read == "ema_params" else "raw",
        }
        with open(os.path.join(tmp, "export.json"), "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2, sort_keys=True)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


# --- the reference's state dict: torch / safetensors / npz ------------------------------------


def _require_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise UsageError(
            "--format torch needs PyTorch: pip install 'aurora_loop[torch]', or use --format safetensors "
            "(or npz), which need no torch"
        ) from None
    return torch


def write_safetensors(path: str, state: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``state`` (name -> array, stored as little-endian float32 ``F32``) as a
    ``.safetensors`` file: an 8-byte little-endian header length, the JSON header (dtype,
    shape, data_offsets; padded with spaces to 8 bytes), then the tensors' raw bytes."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, offset = [], 0
    for name, value in state.items():
        raw = np.ascontiguousarray(value, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": [int(n) for n in np.shape(value)], "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for raw in blobs:
            fh.write(raw)


def _write_state(path: str, fmt: str, state: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    if fmt == "torch":
        torch = _require_torch()
        torch.save({name: torch.from_numpy(np.ascontiguousarray(value, np.float32)) for name, value in state.items()}, path)
    elif fmt == "safetensors":
        write_safetensors(path, state, metadata)
    else:
        with open(path, "wb") as fh:  # a file object: numpy adds no ".npz" of its own
            np.savez(fh, **state)


def _check_out_file(out: str, fmt: str, force: bool) -> str:
    """``PATH.json`` for the state-dict file ``out``, after refusing an unusable ``out``."""
    if not out.lower().endswith(EXTENSIONS[fmt]):
        raise UsageError(
            f"--out {out}: --format {fmt} writes a {' / '.join(EXTENSIONS[fmt])} file; "
            f"name it so (e.g. model{EXTENSIONS[fmt][0]}), as import-checkpoint tells formats by their ending"
        )
    kwargs_path = out + ".json"
    for path in (out, kwargs_path):
        if os.path.isdir(path):
            raise UsageError(f"--out {out}: {path} is a directory; --format {fmt} writes a file, give a file name")
        if os.path.exists(path) and not force:
            raise UsageError(f"{path} exists; choose another --out or pass --force to replace it")
    return kwargs_path


def export_state_dict(
    run_dir: str, out: str, fmt: str, step: str = "latest", force: bool = False, weights: str = "auto"
) -> dict[str, Any]:
    """Write the reference's state dict of a run's checkpoint to ``out`` in ``fmt`` (torch,
    safetensors or npz) and its ``aurora.Aurora`` keyword arguments to ``out + ".json"``."""
    from aurora_loop.model.checkpoint import CheckpointError
    from aurora_loop.model.config import AuroraConfig
    from aurora_loop.model.reference_export import (
        atmos_stats_overrides,
        params_to_state_dict,
        reference_class,
        reference_kwargs_json,
    )

    if fmt not in EXTENSIONS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    checkpoint = resolve_run(run_dir, step)
    run_dir, chosen, out = checkpoint.run_dir, checkpoint.step, os.path.abspath(out)
    if fmt == "torch":
        _require_torch()
    kwargs_path = _check_out_file(out, fmt, force)

    training_config = checkpoint.config_values
    config_path = os.path.join(run_dir, "config.json")
    model_json = _model_config_json(training_config)
    if model_json is None:
        task = (training_config or {}).get("model", "unknown")
        raise UsageError(
            f"--format {fmt} writes the Aurora reference's state dict, but the run's model ({task}) is not an Aurora "
            f"model (or its task cannot be rebuilt from {config_path}: it gives no model_config); use --format orbax"
        )
    config = AuroraConfig.from_json(model_json)

    params, weights_read = checkpoint.read_weights(weights)
    try:
        state = params_to_state_dict(config, params)
    except CheckpointError as err:
        raise UsageError(f"step {chosen} of {run_dir} does not fit the run's Aurora config: {err}") from err
    record = {
        "run_dir": run_dir,
        "step": chosen,
        "format": fmt,
        "layout": "reference state_dict",
        "tensors": len(state),
        "parameters": int(sum(v.size for v in state.values())),
        "kwargs": kwargs_path,
        "weights": "ema" if weights_read == "ema_params" else "raw",
        "atmos_stats": atmos_stats_overrides(config),
        "reference_class": reference_class(config),
    }

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    temps = []
    try:
        for target in (kwargs_path, out):
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
            os.close(fd)
            temps.append(tmp)
        with open(temps[0], "w", encoding="utf-8") as fh:
            json.dump(reference_kwargs_json(config), fh, indent=2)
            fh.write("\n")
        _write_state(
            temps[1],
            fmt,
            state,
            {"format": "pt", "producer": "aurora_loop export-checkpoint", "step": str(chosen), "weights": record["weights"]},
        )
        os.replace(temps[0], kwargs_path)
        os.replace(temps[1], out)  # the weights last: a weights file always has its kwargs beside it
    except BaseException:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    return record


def run(args: argparse.Namespace) -> int:
    fmt = getattr(args, "format", "orbax")
    record = export(args.run_dir, args.out, step=str(args.step), force=args.force, weights=args.weights, format=fmt)
    out = os.path.abspath(args.out)
    if fmt != "orbax":
        print(
            f"Exported step {record['step']} to {out}: the reference's state_dict ({fmt}, {record['tensors']} tensors, "
            f"{record['parameters']:,} parameters); its aurora.{record['reference_class']} keyword arguments are in {record['kwargs']} "
            f"(turn their lists into tuples before calling aurora.{record['reference_class']})"
        )
        if record["weights"] == "ema":
            print("The exported weights are the run's moving average (--ema_decay); pass --weights raw for the trained ones")
        if record["atmos_stats"]:
            stats = ", ".join(f"{k}={tuple(v)}" for k, v in sorted(record["atmos_stats"].items()))
            print(
                f"The run overrides atmospheric normalisation statistics, which aurora.Aurora takes no argument for: "
                f"set aurora.normalisation.locations[key], scales[key] = (location, scale) for {stats}"
            )
        return 0
    if record["layout"] == "model":
        print(
            f"Exported step {record['step']} to {out}/model: the parameters have no encoder/backbone/decoder parts "
            f"(not an Aurora model), so they were written whole"
        )
    else:
        print(f"Exported step {record['step']} to {out}: {', '.join(record['parts'])}")
    if record["weights"] == "ema":
        print("The exported weights are the run's moving average (--ema_decay); pass --weights raw for the trained ones")
    if record["config"] == "training":
        print(f"{out}/config.json is the run's training config (the task exposes no model config)")
    return 0
