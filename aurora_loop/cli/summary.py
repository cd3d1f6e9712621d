"""The closing summary of an ``aurora-train`` run: printed, and written to
``output_dir/summary.json``.

It names the best checkpoint (with ``--monitor``; else the newest), the final validation's
headline scores, where the wall-clock time went (start-up, compilation, training, validation,
checkpointing, waiting for data), the training speed, and the commands to view the logs and to
export the checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from aurora_loop.callbacks.val_table import headline
from aurora_loop.timing import PHASES

# summary.json keys of the clock's phases.
TIME_KEYS = {"start-up": "start_up", "compilation": "compilation", "training": "training", "validation": "validation",
             "checkpointing": "checkpointing", "data": "data_waiting"}


def duration(seconds: float) -> str:
    """``42.1 s``, ``3 min 05 s`` or ``2 h 07 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _checkpoints(checkpoint: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the best checkpoint by the monitored score, the newest checkpoint), each ``None`` when
    there is none; read from the directory (what is on disk) and the callback's scores."""
    from aurora_loop.inference.runs import checkpoint_steps

    if checkpoint is None:
        return None, None
    steps = checkpoint_steps(checkpoint.directory)
    if not steps:
        return None, None
    latest = {"path": os.path.join(checkpoint.directory, str(steps[-1])), "step": steps[-1]}
    scored = {s: v for s, v in checkpoint.scores.items() if s in steps}
    if checkpoint.monitor is None or not scored:
        return None, latest
    pick = min if checkpoint.mode == "min" else max
    step = pick(scored, key=scored.__getitem__)
    return {"path": os.path.join(checkpoint.directory, str(step)), "step": step, "monitor": checkpoint.monitor,
            "score": scored[step]}, latest


def build_summary(trainer: Any, config: Any, checkpoint: Any, output_dir: str, started: float,
                  stopped_by: str | None = None) -> dict[str, Any]:
    """The summary as a JSON-able dict.

    Args:
      trainer: the Trainer after ``fit``.
      config: the run's TrainingConfig (batch size, accumulation).
      checkpoint: the run's ModelCheckpoint, or ``None``.
      output_dir: the run directory.
      started: ``time.time()`` when the process started (the wall time counts from there).
      stopped_by: why the run ended early (e.g. ``--max_time 00:10:00``), or ``None``.
    """
    phases = trainer.clock.seconds()
    total = max(time.time() - started, sum(phases.values()))
    # Before fit (imports, opening the data, building the task) counts as start-up too.
    phases["start-up"] = total - sum(v for k, v in phases.items() if k != "start-up")
    steps_run = trainer.global_step - (trainer.resumed_from or 0)
    stepping = phases["training"] + phases["data"]
    steps_per_sec = steps_run / stepping if steps_run and stepping > 0 else None
    examples = config.batch_size * config.accumulate_grad_batches
    best, latest = _checkpoints(checkpoint)
    scores = trainer.last_val_metrics
    tensorboard = os.path.join(output_dir, "tensorboard")
    chosen = best or latest
    export = None
    if chosen is not None:
        export = f"aurora-loop export-checkpoint {output_dir} --step {'best' if best else chosen['step']} --out {output_dir}/export"
    return {
        "step": trainer.global_step,
        "total_steps": trainer.total_steps,
        "stopped_by": stopped_by or trainer.stop_reason,
        "best_checkpoint": best,
        "latest_checkpoint": latest,
        "final_validation": None if not scores else {
            "step": trainer.last_validated_step,
            "loss": scores.get("loss"),
            "headline_rmse": headline(scores, "rmse"),
            "scores": dict(scores),
        },
        "time_s": {"total": total, **{TIME_KEYS[name]: phases[name] for name in PHASES}},
        "compilations": [{"what": c.what, "step": c.step, "seconds": c.seconds, "from_cache": c.from_cache}
                         for c in trainer.compiles],
        "steps_per_sec": steps_per_sec,
        "samples_per_sec": None if steps_per_sec is None else steps_per_sec * examples,
        "commands": {"tensorboard": f"tensorboard --logdir {tensorboard}", "export": export},
    }


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as the console prints it (after the line saying how the run ended)."""
    lines = []
    best, latest = summary["best_checkpoint"], summary["latest_checkpoint"]
    if best:
        lines.append(f"Best checkpoint: {best['path']} (step {best['step']}, {best['monitor']} {best['score']:.5g})")
    elif latest:
        lines.append(f"Latest checkpoint: {latest['path']} (step {latest['step']}; --monitor val/loss would keep the best)")
    final = summary["final_validation"]
    if final:
        scores = "   ".join(f"{name} {value:.4g}" for name, value in final["headline_rmse"].items())
        loss = f"loss {final['loss']:.4f}" if final["loss"] is not None else ""
        lines.append(f"Final validation (step {final['step']}): {loss}" + (f"   RMSE {scores}" if scores else ""))
    times = summary["time_s"]
    split = ", ".join(f"{name.replace('_', ' ').replace('start up', 'start-up')} {duration(times[name])}"
                      for name in TIME_KEYS.values())
    lines.append(f"Time: {duration(times['total'])} = {split}")
    if summary["steps_per_sec"]:
        lines.append(f"Speed: {summary['steps_per_sec']:.3g} steps/s, {summary['samples_per_sec']:.3g} samples/s "
                     "(training and data waiting; compilation, validation and checkpoints excluded)")
    lines.append(f"View the logs: {summary['commands']['tensorboard']}")
    if summary["commands"]["export"]:
        which = "best" if best else "latest"
        lines.append(f"Export the {which} checkpoint: {summary['commands']['export']}")
    return lines


def write_summary(path: str, summary: dict[str, Any]) -> None:
    """Write ``summary`` as JSON to ``path`` atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)  # in the order built: the headline keeps its order
    os.replace(tmp, path)
