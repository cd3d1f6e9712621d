"""What a person sees: the console of one short aurora-train run, read line by line.

The run fine-tunes the tiny Aurora from imported reference weights (tests/fixtures/
aurora_tiny.npz through ``aurora-loop import-checkpoint``) with LoRA adapters added, so the
header has something to say about what was loaded and what starts fresh.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "aurora_tiny.npz"
FIXTURE_PARAMETERS = 871_152  # what import-checkpoint reports for it


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from aurora_loop.cli.tools import main as aurora_loop
    from aurora_loop.datasets.sample_data import write_sample_store

    root = tmp_path_factory.mktemp("console")
    pretrained, store, out = root / "pretrained", root / "store.zarr", root / "run"
    assert aurora_loop(["import-checkpoint", str(FIXTURE), "--model", "tiny", "--out", str(pretrained)]) == 0
    write_sample_store(str(store), grid=(16, 32), times=24, levels=(250, 500, 850))
    command = [sys.executable, "-m", "aurora_loop.cli.train", "--dataset_path", str(store), "--checkpoint_dir", str(pretrained),
               "--model", "tiny", "--model_kwargs", '{"use_lora": true}', "--output_dir", str(out), "--max_steps", "6",
               "--val_every_n_steps", "3", "--log_every_n_steps", "2", "--num_gpus", "1", "--batch_size", "2",
               "--num_workers", "1", "--monitor", "val/loss"]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(out=out, pretrained=pretrained, lines=done.stdout.splitlines(), stdout=done.stdout, stderr=done.stderr)


def line_index(lines: list[str], pattern: str) -> int:
    return next(i for i, line in enumerate(lines) if re.fullmatch(pattern, line))


def test_the_header_says_what_was_loaded_and_what_starts_fresh(run):
    (weights,) = [line for line in run["lines"] if line.startswith("Weights:")]
    match = re.fullmatch(rf"Weights: pretrained, from {re.escape(str(run['pretrained']))} \(encoder, backbone, decoder\): "
                         r"([\d,]+) of ([\d,]+) parameters loaded, ([\d,]+) new \(LoRA adapters ([\d,]+)\)", weights)
    assert match, weights
    loaded, total, new, lora = (int(g.replace(",", "")) for g in match.groups())
    assert loaded == FIXTURE_PARAMETERS and new == lora > 0 and loaded + new == total


def test_nothing_unasked_on_the_console(run):
    """No third-party warning (orbax's sharding-info warning on the pretrained restore was the
    first thing users saw) and nothing else on stderr."""
    assert run["stderr"].strip() == ""
    assert "Warning" not in run["stdout"] and "Sharding info" not in run["stdout"]


def test_compilation_is_announced_and_the_rate_starts_after_it(run):
    lines = run["lines"]
    compiling = lines.index("Step 1: compiling the train step (or loading it from the compilation cache)")
    compiled = line_index(lines, r"Step 1: train step (compiled|loaded from the compilation cache) in \d+\.\d s")
    first_rate = line_index(lines, r"epoch 0 step 2/6  loss \d\.\d{4}  [\d.]+ (steps/s|s/step)  ETA \d:\d\d:\d\d")
    assert compiling < compiled < first_rate
    # A run of 6 steps still records its compile time (Throughput used to log it at step 50).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run["out"] / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("perf/compile_time_s")] == [1]
    assert events.Scalars("perf/compile_time_s")[0].value > 0


def test_validation_is_a_table(run):
    lines = run["lines"]
    start = line_index(lines, r"Validation at step 6: loss \d\.\d{4}   RMSE; MAE and per-lead scores in TensorBoard")
    table = lines[start + 1:start + 8]
    assert re.fullmatch(r"  surface 2t \S+   10u \S+   10v \S+   msl \S+", table[0])
    assert table[1].split() == ["hPa", "250", "500", "850"]
    assert [row.split()[0] for row in table[2:]] == ["z", "u", "v", "t", "q"]
    assert all(len(row.split()) == 4 for row in table[2:])
    assert not lines[start + 8].startswith("  ")  # the table ends there: 8 lines in all, not 20
    assert "MAE" not in "\n".join(table)


def test_the_run_ends_with_a_summary_also_written_to_summary_json(run):
    lines, out = run["lines"], run["out"]
    summary = json.loads((out / "summary.json").read_text())
    end = lines.index(next(line for line in lines if line.startswith("Training finished at step 6   val loss ")))
    best = summary["best_checkpoint"]
    assert best["step"] in (3, 6) and best["monitor"] == "val/loss" and os.path.isdir(best["path"])
    assert lines[end + 1] == f"Best checkpoint: {best['path']} (step {best['step']}, val/loss {best['score']:.5g})"
    final = summary["final_validation"]
    assert final["step"] == 6 and lines[end].endswith(f"val loss {final['loss']:.4f}")
    assert list(final["headline_rmse"]) == ["z500", "t850", "2t", "msl", "u850", "v850"]
    assert lines[end + 2].startswith(f"Final validation (step 6): loss {final['loss']:.4f}   RMSE z500 ")
    times = summary["time_s"]
    assert set(times) == {"total", "start_up", "compilation", "training", "validation", "checkpointing", "data_waiting"}
    assert sum(v for k, v in times.items() if k != "total") == pytest.approx(times["total"], rel=1e-6)
    assert times["compilation"] > 0 and times["validation"] > 0
    assert re.fullmatch(r"Time: .+ = start-up .+, compilation .+, training .+, validation .+, checkpointing .+, data waiting .+",
                        lines[end + 3])
    assert summary["samples_per_sec"] == pytest.approx(2 * summary["steps_per_sec"])
    assert lines[end + 4].startswith(f"Speed: {summary['steps_per_sec']:.3g} steps/s, {summary['samples_per_sec']:.3g} samples/s")
    assert [(c["what"], c["step"]) for c in summary["compilations"]][:2] == [("train step", 1), ("eval step", 3)]
    assert lines[end + 5] == f"View the logs: tensorboard --logdir {out / 'tensorboard'}"
    assert lines[end + 6] == f"Export the best checkpoint: aurora-loop export-checkpoint {out} --step best --out {out}/export"
    assert lines[end + 7:] == [f"Summary: {out / 'summary.json'}"]
