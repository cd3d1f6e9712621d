"""TensorBoardLogger, LearningRateMonitor, Throughput, Profiler and ProgressBar on one real run.

The event files are read back with TensorBoard's own reader (EventAccumulator).
"""

from __future__ import annotations

import glob
import io
import os

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
    assert "perf/compile_time_s" in tp.history[0] and "perf/compile_time_s" not in tp.history[1]
    assert sorted(scalars(acc, "perf/steps_per_sec")) == [2, 4, 6, 8]
    # It timed the step through the public hook: the trainer's step is the wrapper it returned.
    assert type(run["trainer"].train_step).__name__ == "_TimedStep"


def test_profiler_traced_its_window(run):
    assert run["profiler"].traced == (3, 4) and not run["profiler"].active
    traces = glob.glob(str(run["out"] / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_progress_bar_prints_lines_or_a_bar(run):
    text = run["stream"].getvalue()
    assert "epoch 0 step 2/8  loss" in text and "epoch 1 step 8/8" in text
    assert "\r" not in text
    assert "Validation at step 8: loss" in text
    assert "      2t  MAE" in text and "z500  MAE" in text and "RMSE" in text
    tty = run["tty"].getvalue()
    assert "\r[" in tty and "#" in tty


def test_progress_lists_levels_in_ascending_order():
    from aurora_loop.callbacks.progress import _display_order

    names = ["10u", "2t", "msl", "t1000", "t250", "t50", "z1000", "z50", "z500"]
    assert _display_order(names) == ["10u", "2t", "msl", "t50", "t250", "t1000", "z50", "z500", "z1000"]


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
