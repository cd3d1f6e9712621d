"""Multi-process training on JAX's distributed runtime, for real: 2 processes x 2 CPU devices
on 127.0.0.1 (gloo collectives) against 1 process x 4 CPU devices.

Every run is a subprocess of ``aurora-train`` (``python -m aurora_loop.cli.train``); losses come
from the TensorBoard event files and parameters from the orbax checkpoints the runs write.
Also here: the flag checks of ``aurora_loop.parallel.distributed`` (no JAX start-up needed), a stop
requested on one process only (the trainer's agreement keeps both in step), and a process
killed mid-run (the survivor must exit non-zero within a bounded time, not hang).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aurora_loop.errors import UsageError
from aurora_loop.parallel.distributed import (
    HEARTBEAT_TIMEOUT_ENV,
    INIT_TIMEOUT_ENV,
    _tasks_on_node,
    agree_any,
    detect_cluster,
    distributed_arguments,
)
from tests.xla_flags import FAST_COMPILE

RUN_TIMEOUT_S = 240  # a hung run fails the test instead of blocking CI
TRAIN = ["--model", "conv", "--batch_size", "4", "--levels", "500,850", "--num_workers", "1",
         "--log_every_n_steps", "1", "--save_every_n_steps", "2", "--val_every_n_steps", "4",
         "--warmup_steps", "1", "--learning_rate", "1e-3", "--epochs", "3"]
LAUNCHER_VARS = ("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE_IDS", "AURORA_LOOP_")


# --- helpers -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(devices: int, **extra: str) -> dict[str, str]:
    """The environment of one training process: ``devices`` CPU devices, no launcher variables
    (so a test run inside a SLURM job does not auto-detect that job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), PYTHONUNBUFFERED="1",
               XLA_FLAGS=FAST_COMPILE, **extra)
    return env


def train_command(store: str, out: Path, max_steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aurora_loop.cli.train", "--dataset_path", store, "--output_dir", str(out),
            "--max_steps", str(max_steps), *TRAIN, *extra]


def run_single(store: str, out: Path, max_steps: int) -> str:
    """One process x 4 devices; returns its stdout."""
    done = subprocess.run(train_command(store, out, max_steps), env=child_env(4), capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def start_processes(command: list[str], log_dir: Path, env_extra: dict[str, str] | None = None,
                    num_processes: int = 2) -> list[tuple[subprocess.Popen, Path, Path]]:
    """Start ``num_processes`` processes x 2 devices of ``command`` on a fresh local port."""
    address = f"127.0.0.1:{free_port()}"
    started = []
    for i in range(num_processes):
        stdout, stderr = log_dir / f"p{i}.out", log_dir / f"p{i}.err"
        flags = ["--coordinator_address", address, "--num_processes", str(num_processes), "--process_id", str(i)]
        with open(stdout, "w") as out_fh, open(stderr, "w") as err_fh:
            proc = subprocess.Popen(command + flags, env=child_env(2, **(env_extra or {})), stdout=out_fh, stderr=err_fh)
        started.append((proc, stdout, stderr))
    return started


def wait_all(started: list[tuple[subprocess.Popen, Path, Path]], timeout: float = RUN_TIMEOUT_S) -> list[str]:
    """Wait for every process; kill all of them on a timeout. Returns each one's stdout."""
    deadline = time.monotonic() + timeout
    try:
        for proc, _, _ in started:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        for proc, _, _ in started:
            proc.kill()
        pytest.fail("multi-process run hung: " + "".join(err.read_text()[-1500:] for _, _, err in started))
    for i, (proc, _, err) in enumerate(started):
        assert proc.returncode == 0, f"process {i} exited with {proc.returncode}: {err.read_text()[-3000:]}"
    return [out.read_text() for _, out, _ in started]


def run_multi(store: str, out: Path, max_steps: int) -> list[str]:
    """Two processes x 2 devices; returns each one's stdout."""
    log_dir = out.parent / f"{out.name}-logs-{max_steps}"
    log_dir.mkdir(parents=True, exist_ok=True)
    return wait_all(start_processes(train_command(store, out, max_steps), log_dir))


def scalars(run: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every event file of a run (a resume adds a file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(str(run / "tensorboard" / "events.*"))):
        acc = EventAccumulator(path)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                values.setdefault(tag, {})[event.step] = event.value
    return values


def checkpoint_state(run: Path, step: int) -> Any:
    """The TrainState pytree of ``checkpoints/<step>`` as numpy arrays (any writer topology)."""
    import jax
    import orbax.checkpoint as ocp

    path = (run / "checkpoints" / str(step) / "state").resolve()
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, restore_args=args)


def assert_same_state(actual: Any, expected: Any) -> None:
    """Every leaf (parameters, Adam moments, step, RNG) equal up to float reordering."""
    import jax

    flat_expected = jax.tree_util.tree_leaves_with_path(expected)
    flat_actual = jax.tree.leaves(actual)
    assert len(flat_actual) == len(flat_expected)
    for (path, want), got in zip(flat_expected, flat_actual):
        want, got = np.asarray(want), np.asarray(got)
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def assert_same_losses(actual: dict[int, float], expected: dict[int, float], steps: list[int]) -> None:
    assert sorted(actual) == steps and sorted(expected) == steps
    np.testing.assert_allclose([actual[s] for s in steps], [expected[s] for s in steps], rtol=1e-5)


# --- the runs the comparisons share ------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from aurora_loop.datasets.sample_data import write_sample_store

    path = tmp_path_factory.mktemp("mp-data") / "sample.zarr"
    write_sample_store(str(path), grid=(16, 32), times=24, levels=(500, 850))
    return str(path)


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory) -> dict[str, Any]:
    """1 process x 4 devices and 2 processes x 2 devices: 2 steps, then rerun to 4 (resume).

    Also keeps a copy of the single-process run after its first 2 steps (for the
    cross-topology resume) and what the first leg left behind.
    """
    root = tmp_path_factory.mktemp("mp-runs")
    single, multi = root / "single", root / "multi"
    result: dict[str, Any] = {"single": single, "multi": multi}
    result["single_first"] = run_single(store, single, 2)
    shutil.copytree(single, root / "single-after-2")
    result["single_after_2"] = root / "single-after-2"
    result["multi_first"] = run_multi(store, multi, 2)
    result["multi_event_files_after_2"] = sorted(os.listdir(multi / "tensorboard"))
    result["single_second"] = run_single(store, single, 4)
    result["multi_second"] = run_multi(store, multi, 4)
    return result


# --- equivalence -------------------------------------------------------------------------------
def test_two_processes_train_like_one_process(runs):
    single, multi = runs["single"], runs["multi"]
    p0, p1 = runs["multi_first"]
    assert "Devices: 4 x cpu (2 process(es))" in p0
    assert "Devices: 4 x cpu (1 process(es))" in runs["single_first"]
    # Console, TensorBoard and the run config come from process 0 only.
    assert "loss" in p0 and "Training finished at step 2" in p0
    assert "loss" not in p1 and "Saved checkpoint" not in p1
    assert len(runs["multi_event_files_after_2"]) == 1
    assert (multi / "config.json").is_file()

    want, got = scalars(single), scalars(multi)
    assert_same_losses(got["train/loss"], want["train/loss"], [1, 2, 3, 4])
    # The first run (max_steps 2) ends with a validation of its own last step.
    assert_same_losses(got["val/loss"], want["val/loss"], [2, 4])
    assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]
    assert_same_state(checkpoint_state(multi, 2), checkpoint_state(single, 2))


def test_two_processes_resume_like_one_process(runs):
    single, multi = runs["single"], runs["multi"]
    p0, p1 = runs["multi_second"]
    assert "Resuming from checkpoint" in p0 and "(step 2" in p0
    assert "Training finished at step 4" in p0
    assert "Resuming" not in p1
    assert "Resuming from checkpoint" in runs["single_second"]
    final = checkpoint_state(multi, 4)
    assert_same_state(final, checkpoint_state(single, 4))
    assert int(final["step"]) == 4
    # The resumed steps really trained: parameters moved after step 2.
    before = checkpoint_state(multi, 2)["params"]["params"]["Dense_0"]["kernel"]
    assert not np.allclose(final["params"]["params"]["Dense_0"]["kernel"], before)


@pytest.mark.slow
def test_checkpoint_of_one_process_resumes_on_two(runs, store, tmp_path):
    """orbax restores a 1-process x 4-device checkpoint onto 2 processes x 2 devices."""
    run = tmp_path / "switched"
    shutil.copytree(runs["single_after_2"], run)
    p0, _ = run_multi(store, run, 4)
    assert "Resuming from checkpoint" in p0 and "(step 2" in p0
    assert_same_state(checkpoint_state(run, 4), checkpoint_state(runs["single"], 4))
    assert_same_losses(scalars(run)["train/loss"], scalars(runs["single"])["train/loss"], [1, 2, 3, 4])


# --- agreement on a decision taken by one process ----------------------------------------------
STOP_ON_PROCESS_1 = textwrap.dedent(
    """
    import os
    import sys
    from aurora_loop.cli.train import resolve_config
    from aurora_loop.parallel.distributed import initialize_distributed

    config, _ = resolve_config(sys.argv[1:])
    initialize_distributed(config)
    import jax
    from aurora_loop.callbacks.base import Callback
    from aurora_loop.callbacks import ModelCheckpoint
    from aurora_loop.datasets import build_loaders
    from aurora_loop.task import make_task
    from aurora_loop.trainer import Trainer

    class StopOnProcess1(Callback):
        def on_step(self, trainer, step, metrics):
            if step == 3 and jax.process_index() == 1:
                if os.environ.get("ACTION") == "raise":
                    raise RuntimeError("boom on process 1")
                trainer.should_stop = True

    train, _ = build_loaders(config)
    checkpoints = ModelCheckpoint(config.output_dir + "/checkpoints", every_n_steps=100, verbose=False)
    trainer = Trainer(callbacks=[StopOnProcess1(), checkpoints], max_epochs=5, seed=0)
    trainer.fit(make_task(config.model, config), train)
    print("STOPPED_AT", trainer.global_step, flush=True)
    """
)


def test_stop_requested_on_one_process_stops_all(store, tmp_path):
    """A stop set on process 1 alone ends both processes at the same step, with one final
    checkpoint, instead of deadlocking in the next collective."""
    script = tmp_path / "stop_on_one.py"
    script.write_text(STOP_ON_PROCESS_1)
    out = tmp_path / "run"
    command = [sys.executable, str(script), "--dataset_path", store, "--output_dir", str(out), *TRAIN]
    outputs = wait_all(start_processes(command, tmp_path))
    # on_step(3) runs after step 4 was dispatched, so both stop after step 4.
    assert [line for text in outputs for line in text.splitlines() if line.startswith("STOPPED_AT")] == ["STOPPED_AT 4"] * 2
    assert sorted(os.listdir(out / "checkpoints")) == ["4"]


TIME_ON_PROCESS_0 = textwrap.dedent(
    """
    import sys
    from aurora_loop.cli.train import resolve_config
    from aurora_loop.parallel.distributed import initialize_distributed

    config, _ = resolve_config(sys.argv[1:])
    initialize_distributed(config)
    import jax
    from aurora_loop.callbacks import Callback, ModelCheckpoint, TimeLimit
    from aurora_loop.datasets import build_loaders
    from aurora_loop.task import make_task
    from aurora_loop.trainer import Trainer

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    # Fake seconds per step: 10 on process 0; 1000 on process 1, whose clock must not count
    # (it would save at every boundary and stop at once).
    clock, per_step = Clock(), 10.0 if jax.process_index() == 0 else 1000.0

    class Tick(Callback):
        def on_step(self, trainer, step, metrics):
            clock.now += per_step

    train, _ = build_loaders(config)
    checkpoints = ModelCheckpoint(config.output_dir + "/checkpoints", every_n_steps=100, max_to_keep=None,
                                  save_last=False, verbose=False, every_n_minutes=0.5, clock=clock)
    limit = TimeLimit(95, clock=clock, margin_seconds=0, margin_fraction=0, verbose=False)
    trainer = Trainer(callbacks=[Tick(), limit, checkpoints], max_epochs=50, seed=0)
    trainer.fit(make_task(config.model, config), train)
    print("RESULT", trainer.global_step, checkpoints.saved_steps, flush=True)
    """
)


def test_wall_clock_decisions_follow_process_0(store, tmp_path):
    """TimeLimit and ModelCheckpoint(every_n_minutes) decide by process 0's clock only: both
    processes stop at the same step and save the same steps (saving is collective).

    Process 0's fake clock reads 10 s x hooks run: a save is due 30 s after the last, so step 4
    (hook of step 3 at 30 s) and step 8 (at 70 s, 30 s after the save at 40 s) are saved; at step
    8's hook (80 s) two more steps (20 s) would pass the 95 s limit, so the run stops at 8."""
    script = tmp_path / "time_on_0.py"
    script.write_text(TIME_ON_PROCESS_0)
    out = tmp_path / "run"
    command = [sys.executable, str(script), "--dataset_path", store, "--output_dir", str(out), *TRAIN]
    outputs = wait_all(start_processes(command, tmp_path))
    assert [line for text in outputs for line in text.splitlines() if line.startswith("RESULT")] == ["RESULT 8 [4, 8]"] * 2
    assert sorted(os.listdir(out / "checkpoints")) == ["4", "8"]


# --- a dead process ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("death", ["killed", "exception"])
def test_dead_process_ends_the_job_with_an_error(death, store, tmp_path):
    """Process 1 dies mid-run (SIGKILL, or an uncaught exception): process 0 must exit
    non-zero, saying a task died, within a bounded time (JAX's heartbeat timeout, 10 s
    here) instead of hanging in its next collective."""
    env = {HEARTBEAT_TIMEOUT_ENV: "10"}
    if death == "killed":
        command = train_command(store, tmp_path / "run", 10_000)
    else:
        script = tmp_path / "raise_on_one.py"
        script.write_text(STOP_ON_PROCESS_1)
        command = [sys.executable, str(script), "--dataset_path", store, "--output_dir", str(tmp_path / "run"), *TRAIN]
        env["ACTION"] = "raise"
    started = start_processes(command, tmp_path, env_extra=env)
    (p0, out0, err0), (p1, _, err1) = started
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (p1.poll() is None) if death == "exception" else ("step 3/" not in out0.read_text()):
            assert p0.poll() is None and (death == "exception" or p1.poll() is None), err0.read_text()[-2000:]
            assert time.monotonic() < deadline, "the run never reached step 3"
            time.sleep(0.5)
        if death == "killed":
            p1.send_signal(signal.SIGKILL)
            p1.wait()
        died_at = time.monotonic()
        try:
            p0.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("process 0 still runs 120 s after process 1 died")
        elapsed = time.monotonic() - died_at
    finally:
        for proc, _, _ in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert p0.returncode != 0
    message = err0.read_text()
    reasons = ["another task died", "stopped sending heartbeats"]
    if death == "killed":
        # A peer killed mid-collective can leave a torn message on the gloo transport; the
        # survivor's gloo then aborts on it, which ends the job just as promptly.
        reasons.append("gloo")
    assert any(reason in message for reason in reasons), message[-2000:]
    if death == "exception":
        assert p1.returncode == 1
        assert "boom on process 1" in err1.read_text() and "ending it now" in err1.read_text()
    print(f"{death}: process 0 exited with {p0.returncode} {elapsed:.0f} s after process 1 ended")


LEAVE_ON_PROCESS_1 = textwrap.dedent(
    """
    import sys
    from aurora_loop.cli.train import resolve_config
    from aurora_loop.parallel.distributed import agree, initialize_distributed, leave_job

    config, _ = resolve_config(sys.argv[1:])
    initialize_distributed(config)
    import jax

    if jax.process_index() == 1:
        sys.exit(leave_job(2))  # e.g. a UsageError only this process hit
    agree(False)  # process 0 waits for a process that is gone
    print("process 0 was never told", flush=True)
    """
)


@pytest.mark.slow
def test_leave_job_after_a_one_sided_error_ends_the_others(tmp_path):
    """``leave_job(status)`` skips JAX's 300 s shutdown barrier, so process 0, waiting for
    process 1 at a decision point, learns of its end from the heartbeats."""
    script = tmp_path / "leave_on_one.py"
    script.write_text(LEAVE_ON_PROCESS_1)
    started = start_processes([sys.executable, str(script)], tmp_path, env_extra={HEARTBEAT_TIMEOUT_ENV: "10"})
    (p0, out0, err0), (p1, _, _) = started
    try:
        assert p1.wait(timeout=RUN_TIMEOUT_S) == 2
        p0.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a process still runs: " + err0.read_text()[-2000:])
    finally:
        for proc, _, _ in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert p0.returncode != 0 and "never told" not in out0.read_text()
    assert "another task died" in err0.read_text() or "stopped sending heartbeats" in err0.read_text()


def test_leave_job_is_a_plain_return_in_one_process():
    from aurora_loop.parallel.distributed import leave_job

    assert leave_job(2) == 2 and leave_job(0) == 0


# --- flags and launcher detection (no JAX start-up) --------------------------------------------
class Flags:
    """A stand-in for TrainingConfig's multi-process fields."""

    def __init__(self, coordinator_address: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None) -> None:
        self.coordinator_address = coordinator_address
        self.num_processes = num_processes
        self.process_id = process_id


SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "8",
              "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}


@pytest.fixture
def no_timeouts(monkeypatch):
    monkeypatch.delenv(INIT_TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(HEARTBEAT_TIMEOUT_ENV, raising=False)


def test_flags_pass_through(no_timeouts):
    assert distributed_arguments(Flags(), environ={}) is None
    assert distributed_arguments(Flags("10.0.0.1:1234", 2, 1), environ={}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (Flags("10.0.0.1:1234", None, 0), "--num_processes"),
        (Flags("10.0.0.1:1234", 2, None), "--process_id"),
        (Flags(None, 2, 0), "--coordinator_address"),
        (Flags(None, None, 1), "--coordinator_address"),
        (Flags("10.0.0.1:1234", 2, 2), "out of range"),
        (Flags("10.0.0.1:1234", 0, 0), "at least 1"),
        (Flags("10.0.0.1", 2, 0), "HOST:PORT"),
        (Flags("10.0.0.1:99999", 2, 0), "HOST:PORT"),
    ],
)
def test_inconsistent_flags_are_usage_errors(flags, words, no_timeouts):
    with pytest.raises(UsageError, match=words):
        distributed_arguments(flags, environ={})


def test_slurm_step_is_detected(no_timeouts):
    cluster = detect_cluster(SLURM_STEP)
    assert (cluster.name, cluster.num_processes, cluster.process_id, cluster.local_process_count) == ("slurm", 8, 5, 4)
    assert distributed_arguments(Flags(), environ=SLURM_STEP) == {}  # JAX's own detection does the rest
    # One task per node: use all of the node's devices, not only the one numbered SLURM_LOCALID.
    one_per_node = dict(SLURM_STEP, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_STEP_TASKS_PER_NODE="1(x2)")
    assert distributed_arguments(Flags(), environ=one_per_node) == {"local_device_ids": []}
    with pytest.raises(UsageError, match="disagrees"):
        distributed_arguments(Flags(num_processes=4), environ=SLURM_STEP)


def test_no_multi_process_without_a_multi_task_launch(no_timeouts):
    batch_script = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}  # sbatch, no srun
    assert detect_cluster(batch_script) is None
    assert distributed_arguments(Flags(), environ=dict(SLURM_STEP, SLURM_NTASKS="1")) is None
    assert distributed_arguments(Flags(num_processes=1), environ=SLURM_STEP) is None  # explicit opt-out


def test_open_mpi(no_timeouts):
    mpi4 = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5"}
    assert distributed_arguments(Flags(), environ=mpi4) == {}
    mpi5 = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}
    with pytest.raises(UsageError, match="--coordinator_address"):
        distributed_arguments(Flags(), environ=mpi5)
    assert distributed_arguments(Flags("host0:1234"), environ=mpi5) == {
        "coordinator_address": "host0:1234", "num_processes": 4, "process_id": 3}


def test_timeouts_from_the_environment(monkeypatch):
    monkeypatch.setenv(INIT_TIMEOUT_ENV, "60")
    monkeypatch.setenv(HEARTBEAT_TIMEOUT_ENV, "15")
    assert distributed_arguments(Flags("h:1", 2, 0), environ={}) == {
        "coordinator_address": "h:1", "num_processes": 2, "process_id": 0,
        "initialization_timeout": 60, "heartbeat_timeout_seconds": 15}
    monkeypatch.setenv(HEARTBEAT_TIMEOUT_ENV, "soon")
    with pytest.raises(UsageError, match=HEARTBEAT_TIMEOUT_ENV):
        distributed_arguments(Flags("h:1", 2, 0), environ={})


def test_tasks_per_node_parser():
    assert _tasks_on_node("2(x3),1", 2) == 2
    assert _tasks_on_node("2(x3),1", 3) == 1
    assert _tasks_on_node("2(x3),1", 4) is None
    assert _tasks_on_node("garbage", 0) is None


def test_agreement_is_free_with_one_process(monkeypatch):
    from jax.experimental import multihost_utils

    def collective(*_: Any, **__: Any) -> None:
        raise AssertionError("no collective with one process")

    monkeypatch.setattr(multihost_utils, "process_allgather", collective)
    assert agree_any(True, False) == (True, False)


def test_cli_reports_bad_flags_in_one_line(tmp_path, capsys):
    from aurora_loop.cli.train import main

    status = main(["--output_dir", str(tmp_path / "run"), "--num_processes", "2", "--process_id", "0"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "--coordinator_address" in err
    assert not (tmp_path / "run" / "config.json").exists()
