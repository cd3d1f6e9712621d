"""TensorBoardLogger, LearningRateMonitor, Throughput, Profiler and ProgressBar on one real run.

The event files are read back with TensorBoard's own reader (EventAccumulator).
"""

from __future__ import annotations

import glob
import io
import os
import re

import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from aurora_loop.callbacks import LearningRateMonitor, Profiler, ProgressBar, TensorBoardLogger, Throughput
from aurora_loop.data import ArrayLoader
from aurora_loop.model.batch import stack_samples
from aurora_loop.parallel import make_mesh
from aurora_loop.tasks.conv import ConvTask
from aurora_loop.trainer import Trainer
from tests.synthetic import make_samples

PEAK = 1e12
BATCH = 2


class TTYBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """8 steps (2 epochs of 4) on 2 devices, validating at each epoch end (steps 4 and 8)."""
    out = tmp_path_factory.mktemp("run")
    samples = make_samples(12, grid=(8, 16))
    train = ArrayLoader(samples[:8], BATCH, stack_samples, seed=0)
    val = ArrayLoader(samples[8:], 2, stack_samples, shuffle=False)
    schedule = optax.linear_schedule(1e-3, 1e-4, 8)
    stream, tty = io.StringIO(), TTYBuffer()
    callbacks = dict(
        progress=ProgressBar(every_n_steps=2, stream=stream),
        progress_tty=type("TTYProgress", (ProgressBar,), {})(every_n_steps=2, stream=tty),
        tensorboard=TensorBoardLogger(str(out / "tensorboard"), log_every_n_steps=2,
                                      hparams={"learning_rate": 1e-3, "levels": (500, 850), "max_steps": None, "model": "conv"}),
        lr=LearningRateMonitor(every_n_steps=2),
        throughput=Throughput(every_n_steps=2, peak_flops_per_device=PEAK),
        profiler=Profiler(str(out / "profile"), start_step=2, num_steps=2),
    )
    trainer = Trainer(list(callbacks.values()), optimizer=optax.adam(schedule), log_learning_rate=schedule, max_epochs=2, mesh=make_mesh(2))
    trainer.fit(ConvTask(features=8, depth=2), train, val)
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={event_accumulator.IMAGES: 0, event_accumulator.SCALARS: 0})
    acc.Reload()
    return dict(out=out, trainer=trainer, schedule=schedule, acc=acc, stream=stream, tty=tty, **callbacks)


def scalars(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_tensorboard_scalars_have_the_design_tags(run):
    acc, trainer = run["acc"], run["trainer"]
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "train/learning_rate", "val/loss", "val/mae/2t", "val/rmse/z500", "val/rmse/t850"} <= tags
    assert sorted(scalars(acc, "train/loss")) == [2, 4, 6, 8]
    assert sorted(scalars(acc, "val/loss")) == [4, 8]
    assert scalars(acc, "val/rmse/z500")[8] == pytest.approx(trainer.last_val_metrics["rmse/z500"], rel=1e-6)
    assert scalars(acc, "val/mae/2t")[8] == pytest.approx(trainer.last_val_metrics["mae/2t"], rel=1e-6)


def test_learning_rate_monitor_logs_the_schedule_at_each_step(run):
    logged = scalars(run["acc"], "train/learning_rate")
    assert sorted(logged) == [2, 4, 6, 8]  # once per step: TensorBoardLogger left the tag to the monitor
    for step, value in logged.items():
        assert value == pytest.approx(float(run["schedule"](step - 1)), rel=1e-6)
    assert run["lr"].history == [(s, pytest.approx(float(run["schedule"](s - 1)))) for s in (2, 4, 6, 8)]


def test_validation_maps_are_images_with_three_panels(run):
    acc = run["acc"]
    assert set(acc.Tags()["images"]) == {"val/maps/2t", "val/maps/z500"}
    events = acc.Images("val/maps/z500")
    assert [e.step for e in events] == [4, 8]
    import matplotlib.image

    image = matplotlib.image.imread(io.BytesIO(events[-1].encoded_image_string), format="png")
    assert image.shape[0] == events[-1].height and image.shape[1] == events[-1].width and image.shape[1] > 2 * image.shape[0]
    # Three maps with colour bars: many distinct colours, not a blank canvas.
    colours = np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 200


def test_hparams_are_in_the_run_itself(run):
    acc = run["acc"]
    content = acc.PluginTagToContent("hparams")
    assert set(content) >= {"_hparams_/experiment", "_hparams_/session_start_info"}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["learning_rate"].number_value == pytest.approx(1e-3)
    assert start.hparams["levels"].string_value == "500,850"
    assert start.hparams["max_steps"].string_value == "None"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"val/loss", "train/loss"}
    # One run: everything lives in the log directory itself, no per-session sub-directories.
    assert [d for d in os.listdir(run["out"] / "tensorboard") if os.path.isdir(run["out"] / "tensorboard" / d)] == []


def test_throughput_reports_rates_compile_time_and_mfu(run):
    tp, acc = run["throughput"], run["acc"]
    # The clock starts at step 1's hook, which runs once step 1 (compiled on its dispatch) and
    # step 2 were dispatched, so compilation is outside every window.
    assert [int(h["step"]) for h in tp.history] == [2, 4, 6, 8]
    assert tp.compile_time is not None and tp.compile_time > 0
    assert tp.flops is not None and tp.flops > 0
    for report in tp.history:
        assert report["perf/steps_per_sec"] > 0
        assert report["perf/samples_per_sec"] == pytest.approx(report["perf/steps_per_sec"] * BATCH)
        assert report["perf/mfu"] == pytest.approx(tp.flops * report["perf/steps_per_sec"] / PEAK)
    assert not any("perf/compile_time_s" in report for report in tp.history)
    # The compile time is logged as soon as it is known: at the first step, not with the first rate.
    assert scalars(acc, "perf/compile_time_s") == {1: pytest.approx(tp.compile_time, rel=1e-6)}
    assert sorted(scalars(acc, "perf/steps_per_sec")) == [2, 4, 6, 8]
    # It timed the step through the public hook: the trainer's step is the wrapper it returned.
    assert type(run["trainer"].train_step).__name__ == "_TimedStep"


def test_profiler_traced_its_window(run):
    assert run["profiler"].traced == (3, 4) and not run["profiler"].active
    traces = glob.glob(str(run["out"] / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_progress_bar_prints_lines_or_a_bar(run):
    text = run["stream"].getvalue()
    lines = text.splitlines()
    assert lines[0] == "Step 1: compiling the train step (or loading it from the compilation cache)"
    assert re.fullmatch(r"Step 1: train step (compiled|loaded from the compilation cache) in \d+\.\d s", lines[1])
    # The first progress line's rate counts the steps after the compiled one: 1 -> 2.
    assert re.fullmatch(r"epoch 0 step 2/8  loss \d\.\d{4}  \d+\.\d\d (steps/s|s/step)  ETA \d:\d\d:\d\d", lines[2])
    assert "epoch 1 step 8/8" in text and "\r" not in text
    # The validation table: surface variables on one line, levels as columns, a row per variable.
    start = lines.index(next(line for line in lines if line.startswith("Validation at step 8: loss")))
    assert lines[start].endswith("RMSE; MAE and per-lead scores in TensorBoard")
    assert re.fullmatch(r"  surface 2t \S+   msl \S+", lines[start + 1])
    assert lines[start + 2].split() == ["hPa", "500", "850"]
    assert [line.split()[0] for line in lines[start + 3:start + 5]] == ["z", "t"]
    assert "MAE" not in "\n".join(lines[start + 1:start + 5])
    tty = run["tty"].getvalue()
    assert "\r[" in tty and "#" in tty


def test_validation_table_fits_the_terminal_and_names_what_it_leaves_out():
    from aurora_loop.callbacks.val_table import headline, split_fields, validation_lines

    levels = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)  # WeatherBench2's 13
    metrics = {"loss": 0.5, **{f"{kind}/{v}": 1.5 for kind in ("mae", "rmse") for v in ("msl", "10u", "2t", "10v")}}
    metrics |= {f"{kind}/{v}{lv}": 2.5e-3 if v == "q" else 1234.5 for kind in ("mae", "rmse") for v in "tqzuv" for lv in levels}
    metrics["rmse/z500/6h"] = 9.0  # per-lead scores stay in the loggers
    compact = validation_lines(3, metrics)
    assert compact[0] == "Validation at step 3: loss 0.5000   RMSE; all levels, MAE and per-lead scores in TensorBoard"
    assert compact[1].split()[:5] == ["surface", "2t", "1.5", "10u", "1.5"]  # Aurora's order
    assert compact[2].split() == ["hPa", "500", "700", "850"]  # WeatherBench2's headline levels
    assert [line.split()[0] for line in compact[3:]] == ["z", "u", "v", "t", "q"]
    assert compact[-1].split() == ["q", "0.0025", "0.0025", "0.0025"]
    assert len(compact) == 8 and max(map(len, compact[1:])) <= 80
    full = validation_lines(3, metrics, "full")
    assert [line.strip() for line in full if line.strip() in ("RMSE", "MAE")] == ["RMSE", "MAE"]
    assert full[3].split() == ["hPa", *map(str, levels)]
    assert validation_lines(3, metrics, "none") == ["Validation at step 3: loss 0.5000"]
    ensemble = {**{k: v for k, v in metrics.items() if k.startswith("rmse")}, "loss": 0.5,
                **{f"crps/{k[5:]}": 0.7 for k in metrics if k.startswith("rmse/")},
                **{f"spread_skill/{k[5:]}": 0.9 for k in metrics if k.startswith("rmse/")}}
    blocks = [line.strip() for line in validation_lines(3, ensemble) if line.strip() in ("RMSE", "CRPS", "spread/skill")]
    assert blocks == ["RMSE", "CRPS", "spread/skill"]
    # Levels as rows of a variable; a surface name ending in digits is not taken for a level when named.
    assert split_fields(["swvl1", "2t", "t850", "t50"], surface=["swvl1"]) == (["2t", "swvl1"], {"t": {50.0: "t50", 850.0: "t850"}})
    assert list(headline(metrics)) == ["z500", "t850", "q700", "2t", "msl", "u850"]


def test_peak_flops_table_matches_device_kinds():
    import types

    from aurora_loop.callbacks.throughput import peak_flops

    assert peak_flops(types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops(types.SimpleNamespace(device_kind="NVIDIA A100-SXM4-40GB")) == 312e12
    assert peak_flops(types.SimpleNamespace(device_kind="TPU v4")) == 275e12
    assert peak_flops(types.SimpleNamespace(device_kind="cpu")) is None


def test_learning_rate_from_an_inject_hyperparams_optimizer():
    """Without a schedule handed to the Trainer, the monitor reports the rate each step used,
    read from the step's own metrics (before: the state one step later, with a sync)."""
    from aurora_loop.step import injected_hyperparam

    schedule = optax.linear_schedule(0.05, 0.01, transition_steps=6)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adam)(learning_rate=schedule))
    assert injected_hyperparam(optimizer.init({"w": np.ones(3)}), "learning_rate") is not None
    assert injected_hyperparam(optax.adam(0.1).init({"w": np.ones(3)}), "learning_rate") is None
    monitor = LearningRateMonitor(every_n_steps=2)
    train = ArrayLoader(make_samples(12), 2, stack_samples, seed=0)
    Trainer([monitor], optimizer=optimizer, max_epochs=1, mesh=make_mesh(1)).fit(ConvTask(), train)
    assert [s for s, _ in monitor.history] == [2, 4, 6]
    for step, lr in monitor.history:
        assert lr == pytest.approx(float(schedule(step - 1)), rel=1e-6), step
