"""One cell of the scenario matrix (``tests/test_scenarios.py``), run in processes of its own.

    python -m tests.scenario_cell train   CELL_JSON STORE DIR [--coordinator_address A --num_processes N --process_id I]
    python -m tests.scenario_cell analyse CELL_JSON DIR

``train`` runs the real ``aurora-train`` entry point (``aurora_loop.cli.main``, in-process)
three times, as a user would:

1. ``DIR/full``: the cell's command, uninterrupted;
2. ``DIR/resumed``: the same command, with a callback that sends this process a real
   SIGTERM at step :data:`SIGNAL_STEP` (on the last process only, so in a multi-process cell
   the other process learns of it through the trainer's agreement), which must exit with
   status 75 after saving;
3. the same command again in ``DIR/resumed``: it must resume and finish.

Each run's exit status goes to ``DIR/status-<process>.json``. ``analyse`` (one process, no
distributed runtime) then reads what the runs left on disk (TensorBoard event files with
TensorBoard's reader, orbax checkpoints), exports ``--step best`` with ``aurora-loop
export-checkpoint`` and loads the export into a fresh task, and writes ``DIR/report.json``
for the test to assert on.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import sys
from typing import Any

from aurora_loop.callbacks import Callback

MAX_STEPS = 5  # ends mid-epoch, and is not a multiple of VAL_EVERY: the final validation is the run's own
VAL_EVERY = 2
SAVE_EVERY = 2
SIGNAL_STEP = 2  # its hook runs after step 3 was dispatched: the run stops after step 3
# The pretrained model: Aurora's tiny preset made smaller still (one Swin block per stage, two
# stages), so that a cell compiles in seconds; the roll-out, LoRA, remat and bf16 paths are
# those of every size.
MICRO = {"encoder_depths": [1, 1], "encoder_num_heads": [2, 4], "decoder_depths": [1, 1],
         "decoder_num_heads": [4, 2], "embed_dim": 16, "num_heads": 2}
LORA = {"use_lora": True, "lora_mode": "all", "lora_steps": 2}


class SigtermAt(Callback):
    """Sends this process SIGTERM in the hook of ``step`` of a fresh (not resumed) run, on
    process ``process`` only (-1: the last)."""

    def __init__(self, step: int, process: int = -1) -> None:
        self.step, self.process = step, process

    @property
    def state_key(self) -> str:
        return "SigtermAt"

    def on_step(self, trainer: Any, step: int, metrics: Any) -> None:
        import jax

        target = self.process % jax.process_count()
        if step == self.step and trainer.resumed_from is None and jax.process_index() == target:
            os.kill(os.getpid(), signal.SIGTERM)


def devices_of(cell: dict[str, Any]) -> int:
    return 1 if cell["devices"] == "1" else 4


def command(cell: dict[str, Any], store: str, out: str) -> list[str]:
    """The cell's ``aurora-train`` flags: fine-tune the pretrained model ``cell["pretrained"]``
    with the default callbacks (the forecast maps among them) and a monitored best checkpoint."""
    args = ["--dataset_path", store, "--output_dir", out, "--model", "tiny", "--checkpoint_dir", cell["pretrained"],
            "--batch_size", "4", "--num_gpus", str(devices_of(cell)), "--levels", "500,850",
            "--rollout_steps", "2", "--rollout_mode", cell["mode"], "--max_steps", str(MAX_STEPS),
            "--val_every_n_steps", str(VAL_EVERY), "--save_every_n_steps", str(SAVE_EVERY),
            "--monitor", "val/loss", "--save_top_k", "1", "--log_every_n_steps", "1", "--warmup_steps", "1",
            "--learning_rate", "1e-3", "--num_workers", "1"]
    args += ["--fsdp"] * (cell["devices"] == "4fsdp")
    args += ["--model_kwargs", json.dumps(LORA), "--lora_only"] if cell["lora"] else []
    args += ["--remat"] * cell["remat"] + ["--bf16"] * cell["bf16"]
    return args + list(cell.get("extras", []))


def train(cell: dict[str, Any], store: str, directory: str, distributed: list[str]) -> int:
    from aurora_loop.cli.train import main

    status = {}
    status["full"] = main(command(cell, store, os.path.join(directory, "full")) + distributed)
    resumed = command(cell, store, os.path.join(directory, "resumed")) + distributed
    resumed += ["--callback", f"tests.scenario_cell:SigtermAt={json.dumps({'step': SIGNAL_STEP})}"]
    status["interrupted"] = main(resumed)
    status["rerun"] = main(resumed)
    process = distributed[distributed.index("--process_id") + 1] if "--process_id" in distributed else "0"
    with open(os.path.join(directory, f"status-{process}.json"), "w") as fh:
        json.dump(status, fh)
    return 0


def scalars_and_images(run: str) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """tag -> steps, for the scalars and the images of every event file of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, set[int]] = {}
    images: dict[str, set[int]] = {}
    for path in sorted(glob.glob(os.path.join(run, "tensorboard", "events.*"))):
        acc = EventAccumulator(path, size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, set()).update(e.step for e in acc.Scalars(tag))
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, set()).update(e.step for e in acc.Images(tag))
    return {k: sorted(v) for k, v in scalars.items()}, {k: sorted(v) for k, v in images.items()}


def analyse(cell: dict[str, Any], directory: str) -> dict[str, Any]:
    import jax
    import numpy as np

    from aurora_loop.cli.tools import main as tools_main
    from aurora_loop.config import config_from_mapping
    from aurora_loop.inference.runs import checkpoint_steps, read_params
    from aurora_loop.task import make_task

    full, resumed = os.path.join(directory, "full"), os.path.join(directory, "resumed")
    report: dict[str, Any] = {"status": [json.load(open(p)) for p in sorted(glob.glob(os.path.join(directory, "status-*.json")))]}
    scalars, images = scalars_and_images(full)
    report["val_steps"] = scalars.get("val/loss", [])
    report["map_steps"] = images.get("val/maps/2t", [])
    report["lead_scalar_steps"] = scalars.get("val/rmse/2t/18h", [])  # the third 6-hour lead
    report["rmse_by_lead_steps"] = images.get("val/rmse_by_lead", [])
    report["checkpoints_full"] = checkpoint_steps(os.path.join(full, "checkpoints"))
    report["checkpoints_resumed"] = checkpoint_steps(os.path.join(resumed, "checkpoints"))

    # The uninterrupted run and the interrupted-then-rerun one end with the same parameters.
    last = MAX_STEPS
    a = read_params(os.path.join(full, "checkpoints", str(last), "state"))
    b = read_params(os.path.join(resumed, "checkpoints", str(last), "state"))
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    report["same_structure"] = jax.tree.structure(a) == jax.tree.structure(b)
    report["bitwise_equal"] = all(np.array_equal(x, y) for x, y in pairs)
    report["max_rel_diff"] = max(float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) or 1.0)) for x, y in pairs)
    report["moved"] = not all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(read_params(os.path.join(full, "checkpoints", str(SAVE_EVERY), "state"))))
    )

    # Export the best checkpoint and load it into a fresh task as pretrained weights.
    export_dir = os.path.join(directory, "export")
    report["export_status"] = tools_main(["export-checkpoint", full, "--step", "best", "--out", export_dir])
    record = json.load(open(os.path.join(export_dir, "export.json")))
    report["best_step"] = record["step"]
    report["exported_weights"] = record["weights"]
    with open(os.path.join(full, "config.json")) as fh:
        training = json.load(fh)
    config = config_from_mapping({**training, "checkpoint_dir": export_dir}, source="the run's config.json")
    task = make_task(config.model, config)  # reads every part and checks it against the model
    best = read_params(os.path.join(full, "checkpoints", str(record["step"]), "state"))
    loaded = task._host_parts
    report["export_parts"] = sorted(loaded)
    report["export_matches"] = all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves({k: best[k] for k in loaded}))
    ) and sorted(loaded) == sorted(best)
    report["exported_use_lora"] = json.load(open(os.path.join(export_dir, "config.json")))["use_lora"]
    with open(os.path.join(directory, "report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    return report


if __name__ == "__main__":
    action, cell_json = sys.argv[1], sys.argv[2]
    cell = json.loads(cell_json)
    if action == "train":
        sys.exit(train(cell, sys.argv[3], sys.argv[4], sys.argv[5:]))
    analyse(cell, sys.argv[3])
