"""``aurora-loop export-checkpoint RUN_DIR [--step N|latest|best] --out DIR``: hand weights on.

Reads the training checkpoint ``RUN_DIR/checkpoints/<step>/`` (written by ModelCheckpoint)
and writes the parameters alone in the seed's layout:

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

Nothing is overwritten: an existing non-empty ``DIR`` is refused unless ``--force``; the
export is written to a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from aurora_loop.checkpoint_weights import WEIGHT_CHOICES, WEIGHTS_HELP
from aurora_loop.errors import UsageError

PARTS = ("encoder", "backbone", "decoder")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run's --output_dir (holding checkpoints/)")
    parser.add_argument("--step", default="latest", help="checkpoint step to export: a number, 'latest' (default) or 'best' (ModelCheckpoint's monitored best)")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write (must not exist or be empty, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing DIR")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto", help=WEIGHTS_HELP)


def checkpoint_steps(checkpoint_dir: str) -> list[int]:
    """Steps of the complete checkpoints under ``checkpoint_dir``, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    steps = []
    for name in os.listdir(checkpoint_dir):
        path = os.path.join(checkpoint_dir, name)
        if name.isdigit() and os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta")):
            steps.append(int(name))
    return sorted(steps)


def read_meta(step_dir: str) -> dict[str, Any]:
    """The ``meta`` item (trainer meta state) of a checkpoint step directory."""
    with open(os.path.join(step_dir, "meta", "metadata"), encoding="utf-8") as fh:
        return json.load(fh)


def best_step(checkpoint_dir: str, steps: list[int]) -> int | None:
    """The kept step with the best ModelCheckpoint score, from the newest checkpoint's meta."""
    meta = read_meta(os.path.join(checkpoint_dir, str(steps[-1])))
    for state in meta.get("callbacks", {}).values():
        if isinstance(state, Mapping) and "scores" in state and state.get("monitor"):
            scores = {int(k): float(v) for k, v in state["scores"].items() if int(k) in steps}
            if scores:
                pick = min if state.get("mode", "min") == "min" else max
                return pick(scores, key=scores.__getitem__)
    return None


def choose_step(checkpoint_dir: str, wanted: str) -> int:
    steps = checkpoint_steps(checkpoint_dir)
    if not steps:
        raise UsageError(f"no checkpoints in {checkpoint_dir}; pass the --output_dir of a run that saved some")
    if wanted == "latest":
        return steps[-1]
    if wanted == "best":
        step = best_step(checkpoint_dir, steps)
        if step is None:
            raise UsageError(f"no monitored scores in {checkpoint_dir} (ModelCheckpoint ran without monitor); pass --step N or latest")
        return step
    if not wanted.isdigit():
        raise UsageError(f"--step {wanted!r} is not a step number, 'latest' or 'best'")
    if int(wanted) not in steps:
        raise UsageError(f"no checkpoint for step {wanted} in {checkpoint_dir}; available: {', '.join(map(str, steps))}")
    return int(wanted)


def read_params(state_dir: str, weights: str = "auto") -> Any:
    """The weights of a saved TrainState as numpy arrays (any device count): its moving
    average when it kept one, unless ``weights`` is ``raw`` (:mod:`aurora_loop.checkpoint_weights`)."""
    from aurora_loop.checkpoint_weights import restore_state_weights

    return restore_state_weights(state_dir, weights)[0]


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


def export(run_dir: str, out: str, step: str = "latest", force: bool = False, weights: str = "auto") -> dict[str, Any]:
    """Write the export (see the module docstring); returns what ``export.json`` records."""
    import orbax.checkpoint as ocp

    run_dir, out = os.path.abspath(run_dir), os.path.abspath(out)
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(run_dir):
        raise UsageError(f"RUN_DIR {run_dir} does not exist; pass a training run's --output_dir")
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)) and not force:
        raise UsageError(f"--out {out} exists and is not empty; choose a new directory or pass --force to replace it")
    chosen = choose_step(checkpoint_dir, step)
    step_dir = os.path.join(checkpoint_dir, str(chosen))
    from aurora_loop.checkpoint_weights import restore_state_weights

    params, weights_read = restore_state_weights(os.path.join(step_dir, "state"), weights)
    parts, split = split_params(params)

    training_config = None
    config_path = os.path.join(run_dir, "config.json")
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as fh:
            training_config = json.load(fh)

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


def run(args: argparse.Namespace) -> int:
    record = export(args.run_dir, args.out, step=str(args.step), force=args.force, weights=args.weights)
    out = os.path.abspath(args.out)
    if record["layout"] == "model":
        print(f"Exported step {record['step']} to {out}/model: the parameters have no encoder/backbone/decoder parts "
              f"(not an Aurora model), so they were written whole")
    else:
        print(f"Exported step {record['step']} to {out}: {', '.join(record['parts'])}")
    if record["weights"] == "ema":
        print("The exported weights are the run's moving average (--ema_decay); pass --weights raw for the trained ones")
    if record["config"] == "training":
        print(f"{out}/config.json is the run's training config (the task exposes no model config)")
    return 0
