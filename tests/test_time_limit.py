"""Time limits: TimeLimit stops before the wall-clock limit with a checkpoint that resumes
exactly; ModelCheckpoint(every_n_minutes) saves by wall-clock time; aurora-train --max_time.

Every decision here runs on a fake clock (advanced by the hooks), so no assertion depends on
how fast this machine is, except the end-to-end run's "finished within the limit".
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import types

import jax
import numpy as np
import optax
import pytest

from aurora_loop.callbacks import Callback, ModelCheckpoint, TimeLimit
from aurora_loop.callbacks.time_limit import format_duration, format_limit, process_age_seconds
from aurora_loop.data import ArrayLoader
from aurora_loop.model.batch import stack_samples
from aurora_loop.parallel import make_mesh
from aurora_loop.tasks.conv import ConvTask
from aurora_loop.trainer import Trainer
from tests.synthetic import make_samples

SAMPLES = make_samples(16, grid=(8, 16))
EPOCHS = 2  # 6 steps each: 12 steps in all


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Tick(Callback):
    """Advances a fake clock: ``step_seconds(step)`` in each step's hook, ``val_seconds`` in each
    validation's. Put it first so the callbacks after it see the time pass."""

    def __init__(self, clock: FakeClock, step_seconds=lambda step: 1.0, val_seconds: float = 0.0) -> None:
        self.clock, self.step_seconds, self.val_seconds = clock, step_seconds, val_seconds

    def on_step(self, trainer, step, metrics):
        self.clock.advance(self.step_seconds(step))

    def on_validate(self, trainer, step, metrics):
        self.clock.advance(self.val_seconds)


def loaders():
    train = ArrayLoader(SAMPLES[:12], 2, stack_samples, seed=0)  # 6 steps per epoch
    val = ArrayLoader(SAMPLES[12:], 2, stack_samples, shuffle=False)
    return train, val


def task() -> ConvTask:
    return ConvTask(features=8, depth=2)


def fit(callbacks, with_val: bool = True):
    train, val = loaders()
    trainer = Trainer(callbacks, optimizer=optax.adam(1e-3), max_epochs=EPOCHS, mesh=make_mesh(1))
    state = trainer.fit(task(), train, val if with_val else None)
    return trainer, state


def assert_same_params(actual, expected) -> None:
    jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6, atol=1e-7), actual, expected)


@pytest.fixture(scope="module")
def uninterrupted():
    """The parameters after all 12 steps of a run that was never stopped."""
    _, state = fit([])
    return jax.device_get(state.params)


# --- the decision, on a fake trainer --------------------------------------------------------------
def drive(limit: TimeLimit, trainer, saver, clock: FakeClock, sync_steps: set[int]) -> int:
    """The trainer loop's hook order (trainer.py ``_run``), with time passing on ``clock``:
    each dispatch takes 2 s (the first 6 s: compiling), a validation 3 s, a save blocks 1 s and
    writes for 4 s. Step t's hook runs after step t+1 was dispatched, unless t is a sync step.
    Returns the step the run stops at."""
    pending = None
    limit.on_fit_start(trainer)
    for step in range(1, 100):
        clock.advance(6.0 if step == 1 else 2.0)  # dispatch
        trainer.global_step = step
        if pending is not None:
            limit.on_step(trainer, pending, {})
        pending = step
        if not (trainer.should_stop or step in sync_steps):
            continue
        limit.on_step(trainer, step, {})
        pending = None
        if step in sync_steps:
            clock.advance(3.0)
            limit.on_validate(trainer, step, {})
            clock.advance(1.0)
            saver.saved_steps.append(step)
            saver.last_save_blocking_seconds, saver.last_save_seconds = 1.0, 4.0
        if trainer.should_stop:
            return step
    raise AssertionError("never stopped")


def fake_trainer(main: bool = True):
    saver = types.SimpleNamespace(last_save_seconds=None, last_save_blocking_seconds=None, saved_steps=[])
    trainer = types.SimpleNamespace(is_main_process=main, should_stop=False, global_step=0, val_data=object(),
                                    val_every_n_steps=5, callbacks=[saver])
    return trainer, saver


def test_stops_at_the_first_step_whose_estimate_passes_the_limit(capsys):
    """Worked by hand (start-up took 10 s; margin 5 s): after the validation and save at step 5
    the estimate is 2 steps x 2 s + validation 3 s + save 4 s + 5 s = 16 s. Step 7's hook sees
    34 + 16 = 50 s, not past the 50 s limit; step 8's sees 36 + 16 = 52 s: stop. Step 8's hook
    ran after step 9 was dispatched, so the run ends after step 9."""
    clock = FakeClock(10.0)
    limit = TimeLimit(50, start_time=0.0, clock=clock, margin_seconds=5, margin_fraction=0)
    trainer, saver = fake_trainer()
    assert drive(limit, trainer, saver, clock, sync_steps={5}) == 9
    assert limit.stopped_step == 9 and trainer.should_stop
    line = ("Stopping at step 9: the time limit 00:00:50 would be reached within the next step, validation and save "
            "(elapsed 0:36, estimated 0:16 more)")
    assert limit.reason == line
    assert capsys.readouterr().out == line + "\n"  # one line, once


def test_only_process_0_decides(capsys):
    clock = FakeClock(10.0)
    limit = TimeLimit(50, start_time=0.0, clock=clock)
    trainer, saver = fake_trainer(main=False)
    trainer.val_every_n_steps = None
    pending = None
    for step in range(1, 60):  # far past the limit: process 0 decides for everyone (Trainer._agree)
        clock.advance(2.0)
        trainer.global_step = step
        if pending is not None:
            limit.on_step(trainer, pending, {})
        pending = step
    assert not trainer.should_stop and limit.reason is None and capsys.readouterr().out == ""


def test_formats():
    assert format_limit(9000) == "02:30:00" and format_limit(90061) == "01:01:01:01"
    assert format_duration(8861) == "2:27:41" and format_duration(64.2) == "1:05"
    assert 0.0 <= process_age_seconds() < 24 * 3600
    with pytest.raises(ValueError):
        TimeLimit(0)


# --- a real Trainer and ModelCheckpoint on a fake clock --------------------------------------------
def test_stops_before_the_limit_and_resumes_exactly(tmp_path, uninterrupted, capsys):
    clock = FakeClock()
    ckpt_dir = str(tmp_path / "checkpoints")
    limit = TimeLimit(13, clock=clock, margin_seconds=1, margin_fraction=0)
    checkpoint = ModelCheckpoint(ckpt_dir, every_n_steps=100, verbose=False, clock=clock)
    trainer, _ = fit([Tick(clock, val_seconds=2.0), limit, checkpoint])
    stopped = trainer.global_step
    assert 1 < stopped < 6 * EPOCHS and limit.stopped_step == stopped
    assert clock() <= 13  # the final validation and save still fit in
    assert re.fullmatch(rf"Stopping at step {stopped}: the time limit 00:00:13 would be reached within the next step, "
                        r"validation and save \(elapsed 0:\d\d, estimated 0:\d\d more\)", limit.reason)
    assert limit.reason in capsys.readouterr().out
    assert ModelCheckpoint(ckpt_dir).all_steps() == [stopped]
    assert checkpoint.last_save_seconds is not None and limit.state_dict() == {}

    # Rerunning continues from the checkpoint (with a fresh limit) to the same parameters.
    resumed, state = fit([TimeLimit(1e6), ModelCheckpoint(ckpt_dir, every_n_steps=100, verbose=False)])
    assert resumed.resumed_from == stopped and resumed.global_step == 6 * EPOCHS
    assert_same_params(jax.device_get(state.params), uninterrupted)


def test_every_n_minutes_saves_by_wall_clock_and_resumes_exactly(tmp_path, uninterrupted):
    """Steps take 10 s in the first epoch and 40 s in the second; a save is due 60 s after the
    last one (or the start). A step boundary where one is due becomes a sync step (``wants_sync``),
    so the save lands on the first boundary past 60 s, wherever that falls in an epoch: step 6
    (60 s), then step 9 (140 s at step 8's hook: sync at 9), then step 12."""
    clock = FakeClock()
    ckpt_dir = str(tmp_path / "checkpoints")
    checkpoint = ModelCheckpoint(ckpt_dir, every_n_steps=100, save_last=False, max_to_keep=None, verbose=False,
                                 every_n_minutes=1, clock=clock)
    fit([Tick(clock, step_seconds=lambda step: 10.0 if step <= 6 else 40.0), checkpoint], with_val=False)
    assert checkpoint.saved_steps == [6, 9, 12]

    # The timed save mid-epoch (step 9) carries the data position: resuming from it is exact.
    ModelCheckpoint(ckpt_dir).manager.delete(12)
    resumed, state = fit([ModelCheckpoint(ckpt_dir, every_n_steps=100, verbose=False)])
    assert resumed.resumed_from == 9
    assert_same_params(jax.device_get(state.params), uninterrupted)


def test_aurora_train_wires_both_settings(tmp_path):
    from aurora_loop.cli.train import default_callbacks
    from aurora_loop.config import TrainingConfig

    config = TrainingConfig(output_dir=str(tmp_path), max_time="01:00:00", save_every_n_minutes=30.0)
    callbacks = default_callbacks(config, str(tmp_path), str(tmp_path / "checkpoints"), str(tmp_path / "tb"), [])
    kinds = [type(cb).__name__ for cb in callbacks]
    assert kinds.index("TimeLimit") < kinds.index("ModelCheckpoint")
    limit = callbacks[kinds.index("TimeLimit")]
    assert limit.max_seconds == 3600 and limit.label == "--max_time 01:00:00"
    assert limit.start_time <= time.monotonic() and limit.elapsed >= 0  # from the process's start
    assert callbacks[kinds.index("ModelCheckpoint")].every_n_minutes == 30.0
    assert "TimeLimit" not in [type(cb).__name__ for cb in default_callbacks(TrainingConfig(output_dir=str(tmp_path)), str(tmp_path), "c", "t", [])]


# --- end to end --------------------------------------------------------------------------------
def test_aurora_train_max_time(tmp_path):
    """A run of 1000 epochs under --max_time 00:00:30 (start-up and compiling alone take about
    10 s here) stops by itself, saves its last step and exits 0 within the limit."""
    from aurora_loop.datasets.sample_data import write_sample_store

    store = str(tmp_path / "sample.zarr")
    write_sample_store(store, grid=(16, 32), times=40, levels=(500, 850))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "aurora_loop.cli.train", "--dataset_path", store, "--output_dir", str(out), "--model", "conv",
               "--batch_size", "2", "--num_gpus", "1", "--levels", "500,850", "--log_every_n_steps", "50",
               "--epochs", "1000", "--max_time", "00:00:30", "--save_every_n_minutes", "10"]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"), timeout=300)
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    stops = re.findall(r"^Stopping at step (\d+): --max_time 00:00:30 would be reached within the next step, validation "
                       r"and save \(elapsed \d+:\d\d, estimated \d+:\d\d more\)$", done.stdout, re.MULTILINE)
    assert len(stops) == 1, done.stdout[-3000:]
    final = int(stops[0])
    assert final < 15 * 1000  # 15 steps per epoch: the limit ended it, not the epochs
    assert ModelCheckpoint(str(out / "checkpoints")).latest_step() == final
    assert wall < 30, f"took {wall:.1f} s"
