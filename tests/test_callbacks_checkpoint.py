"""ModelCheckpoint, Preemption, TerminateOnNaN and EarlyStopping: what they saved and decided."""

from __future__ import annotations

import json
import os
import signal
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from aurora_loop.callbacks import (
    PREEMPTED_EXIT_CODE,
    Callback,
    EarlyStopping,
    ModelCheckpoint,
    Preemption,
    TerminateOnNaN,
)
from aurora_loop.callbacks.checkpoint import CheckpointSaveError
from aurora_loop.callbacks.preemption import was_preempted
from aurora_loop.data import ArrayLoader
from aurora_loop.model.batch import Sample, stack_samples
from aurora_loop.parallel import make_mesh
from aurora_loop.step import TrainState
from aurora_loop.tasks.conv import ConvTask
from aurora_loop.trainer import Trainer
from tests.synthetic import make_samples

SAMPLES = make_samples(12, grid=(8, 16))


def loaders(n_train: int = 8, batch_size: int = 2):
    train = ArrayLoader(SAMPLES[:n_train], batch_size, stack_samples, seed=0)
    val = ArrayLoader(SAMPLES[8:12], 2, stack_samples, shuffle=False)
    return train, val


def task() -> ConvTask:
    return ConvTask(features=8, depth=2)


class Losses(Callback):
    """Reads every step's loss; records validations."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.validated: list[int] = []

    def wants_metrics(self, trainer, step):
        return True

    def on_step(self, trainer, step, metrics):
        self.losses[step] = metrics["loss"]

    def on_validate(self, trainer, step, metrics):
        self.validated.append(step)


class SignalAt(Callback):
    """Sends ``signum`` to this process from the hook of ``step`` (like a cluster would)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_step(self, trainer, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), self.signum)


def saved_params(directory: str, step: int):
    path = os.path.join(directory, str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))["params"]


def saved_meta(directory: str, step: int) -> dict:
    with open(os.path.join(directory, str(step), "meta", "metadata")) as fh:
        return json.load(fh)


def test_preempted_run_saves_and_resumes_with_the_same_losses(tmp_path):
    """SIGTERM mid-epoch: the run stops at the next step boundary with a checkpoint; rerunning
    continues from it and its losses equal those of a run that was never interrupted."""
    train, val = loaders()
    full = Losses()
    Trainer([full], optimizer=optax.adam(1e-3), max_epochs=2, mesh=make_mesh(1)).fit(task(), train, val)
    assert sorted(full.losses) == list(range(1, 9))

    ckpt_dir = str(tmp_path / "checkpoints")
    before = signal.getsignal(signal.SIGTERM)
    first = Losses()
    train, val = loaders()
    trainer = Trainer([first, SignalAt(3), Preemption(), ModelCheckpoint(ckpt_dir, every_n_steps=100, save_last=False, verbose=False)],
                      optimizer=optax.adam(1e-3), max_epochs=2, mesh=make_mesh(1))
    trainer.fit(task(), train, val)
    # Step 3's hook runs after step 4 was dispatched: the loop stops after step 4 and saves it,
    # although neither the schedule (every 100) nor save_last asked for it.
    assert was_preempted(trainer) and trainer.stopping and trainer.stop_checkpoint is True
    assert trainer.global_step == 4
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    checkpoint = ModelCheckpoint(ckpt_dir)
    assert checkpoint.all_steps() == [4]
    assert saved_meta(ckpt_dir, 4)["train_loader"] == {"epoch": 0, "position": 4}
    assert PREEMPTED_EXIT_CODE == 75

    resumed = Losses()
    train, val = loaders()
    trainer = Trainer([resumed, Preemption(), checkpoint], optimizer=optax.adam(1e-3), max_epochs=2, mesh=make_mesh(1))
    trainer.fit(task(), train, val)
    assert trainer.resumed_from == 4 and not was_preempted(trainer)
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    np.testing.assert_allclose([resumed.losses[s] for s in range(5, 9)], [full.losses[s] for s in range(5, 9)], rtol=1e-6)
    np.testing.assert_allclose([first.losses[s] for s in range(1, 5)], [full.losses[s] for s in range(1, 5)], rtol=1e-6)
    assert checkpoint.all_steps()[-1] == 8  # save_last on the normal end


class SignalDuringIteration:
    """A validation loader that sends SIGINT while yielding its second batch."""

    def __init__(self, loader, signum=signal.SIGINT) -> None:
        self.loader, self.signum, self.sent = loader, signum, False

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == 1 and not self.sent:
                self.sent = True
                os.kill(os.getpid(), self.signum)
            yield batch

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def test_preemption_inside_validation_abandons_it_and_saves(tmp_path):
    train, val = loaders()
    rec = Losses()
    ckpt_dir = str(tmp_path / "ckpt")
    # Python's default handler, or SIG_IGN when the test process was started in the background
    handler_before = signal.getsignal(signal.SIGINT)
    trainer = Trainer([rec, Preemption(), ModelCheckpoint(ckpt_dir, every_n_steps=100, verbose=False)],
                      optimizer=optax.adam(1e-3), max_epochs=3, val_every_n_steps=2, mesh=make_mesh(1))
    trainer.fit(task(), train, SignalDuringIteration(val))
    assert was_preempted(trainer) and trainer.stop_skips_validation
    assert trainer.global_step == 2
    assert rec.validated == []  # the interrupted validation emitted nothing
    assert ModelCheckpoint(ckpt_dir).all_steps() == [2]
    assert signal.getsignal(signal.SIGINT) is handler_before  # restored


def test_best_n_by_monitor_and_latest_are_kept(tmp_path):
    """Validation every step; keep the newest 1 and the best 2 by val/loss. With mode "max"
    (larger is better) the best are the earliest steps of a run whose loss falls, so the
    kept set differs from the newest steps."""
    train, val = loaders()

    class Scores(Callback):
        def __init__(self):
            self.scores = {}

        def on_validate(self, trainer, step, metrics):
            self.scores[step] = metrics["loss"]

    scores = Scores()
    ckpt_dir = str(tmp_path / "ckpt")
    checkpoint = ModelCheckpoint(ckpt_dir, every_n_steps=1000, max_to_keep=1, monitor="val/loss", mode="max", save_top_k=2, verbose=False)
    trainer = Trainer([scores, checkpoint], optimizer=optax.adam(3e-3), max_epochs=2, max_steps=6, val_every_n_steps=1, mesh=make_mesh(1))
    trainer.fit(task(), train, val)
    assert sorted(scores.scores) == [1, 2, 3, 4, 5, 6]
    finite = {s: v for s, v in scores.scores.items() if np.isfinite(v)}
    best_two = sorted(finite, key=finite.__getitem__, reverse=True)[:2]
    assert 6 not in best_two  # the loss fell; otherwise this test would not tell best from newest
    kept = ModelCheckpoint(ckpt_dir).all_steps()
    assert kept == sorted(set(best_two) | {6})
    assert checkpoint.best_step == best_two[0]
    # The scores are part of the checkpoint (state survives resume) and of orbax's metrics.
    meta = saved_meta(ckpt_dir, 6)
    assert {int(k): v for k, v in meta["callbacks"]["ModelCheckpoint"]["scores"].items()} == pytest.approx(finite)
    assert checkpoint.state_dict()["monitor"] == "val/loss"


def test_terminate_on_nan_keeps_the_last_good_checkpoint(tmp_path):
    train, _ = loaders()
    batches = [stack_samples(SAMPLES[2 * i : 2 * i + 2]) for i in range(4)] * 2
    bad = batches[4]
    batches[4] = Sample(bad.inputs.replace(surf_vars={k: np.full_like(v, np.nan) for k, v in bad.inputs.surf_vars.items()}), bad.targets)
    guard = TerminateOnNaN()
    ckpt_dir = str(tmp_path / "ckpt")
    trainer = Trainer([guard, ModelCheckpoint(ckpt_dir, every_n_steps=2, max_to_keep=5, verbose=False)],
                      optimizer=optax.adam(1e-3), max_epochs=1, mesh=make_mesh(1))
    trainer.fit(task(), batches)
    assert guard.nonfinite_step == 5 and trainer.stop_checkpoint is False and trainer.stop_reason == "the non-finite step 5"
    assert trainer.global_step == 6  # step 5's hook ran after step 6 was dispatched
    assert ModelCheckpoint(ckpt_dir).all_steps() == [2, 4]
    params = saved_params(ckpt_dir, 4)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(trainer.state.params))


def _fake_trainer(params, meta=None, step=1):
    state = TrainState(step=jnp.asarray(step), params=params, opt_state=(), rng=jnp.zeros(2, jnp.uint32))
    return types.SimpleNamespace(state=state, is_main_process=True, should_stop=False, total_steps=100,
                                 meta_state=lambda: meta if meta is not None else {"step": step, "epoch": 0, "callbacks": {}})


def test_non_finite_parameters_are_never_saved(tmp_path):
    checkpoint = ModelCheckpoint(str(tmp_path / "ckpt"), every_n_steps=1, verbose=False)
    assert checkpoint.save(_fake_trainer({"w": jnp.ones(3)}), 1)
    assert not checkpoint.save(_fake_trainer({"w": jnp.array([1.0, jnp.nan, 2.0])}), 2)
    assert not checkpoint.save(_fake_trainer({"w": jnp.array([jnp.inf])}), 3)
    checkpoint.close()
    assert checkpoint.all_steps() == [1]


def test_async_save_errors_surface(tmp_path, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    async def broken(self, x, directory):
        raise OSError("No space left on device")

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", broken)
    checkpoint = ModelCheckpoint(str(tmp_path / "ckpt"), every_n_steps=1, verbose=False)
    trainer = _fake_trainer({"w": jnp.ones(3)})
    assert checkpoint.save(trainer, 1)  # dispatched; the write fails in the background
    with pytest.raises(CheckpointSaveError, match="No space left on device"):
        checkpoint.on_sync(trainer, 2)
    checkpoint.close()
    assert checkpoint.all_steps() == []


def test_state_that_is_not_json_is_refused_with_the_callback_named(tmp_path):
    checkpoint = ModelCheckpoint(str(tmp_path / "ckpt"), every_n_steps=1, verbose=False)
    trainer = _fake_trainer({"w": jnp.ones(3)}, meta={"step": 1, "epoch": 0, "callbacks": {"Mine": {"seen": {1, 2}}}})
    with pytest.raises(CheckpointSaveError, match="state_dict of Mine"):
        checkpoint.save(trainer, 1)
    checkpoint.close()


def test_early_stopping_counts_across_a_resume(tmp_path):
    """patience 2 with a min_delta nothing meets: the first validation sets the best, the
    next two run out the patience. Interrupted after two validations, the resumed run
    stops at its first validation because the counter was restored."""
    ckpt_dir = str(tmp_path / "ckpt")
    train, val = loaders()
    stopper = EarlyStopping(monitor="val/loss", min_delta=10.0, patience=2, verbose=False)
    trainer = Trainer([stopper, ModelCheckpoint(ckpt_dir, every_n_steps=1, verbose=False)],
                      optimizer=optax.adam(1e-3), max_epochs=5, max_steps=2, val_every_n_steps=1, mesh=make_mesh(1))
    trainer.fit(task(), train, val)
    assert stopper.wait == 1 and stopper.stopped_step is None and stopper.best is not None
    assert saved_meta(ckpt_dir, 2)["callbacks"]["EarlyStopping"] == {"best": stopper.best, "wait": 1, "stopped_step": None}

    train, val = loaders()
    resumed = EarlyStopping(monitor="val/loss", min_delta=10.0, patience=2, verbose=False)
    trainer = Trainer([resumed, ModelCheckpoint(ckpt_dir, every_n_steps=1, verbose=False)],
                      optimizer=optax.adam(1e-3), max_epochs=5, max_steps=10, val_every_n_steps=1, mesh=make_mesh(1))
    trainer.fit(task(), train, val)
    assert resumed.stopped_step == 3 and trainer.global_step == 3 and trainer.should_stop
    assert resumed.best == stopper.best


def test_early_stopping_decisions():
    trainer = types.SimpleNamespace(should_stop=False, is_main_process=True)
    stopper = EarlyStopping(monitor="rmse/z500", mode="max", patience=2, min_delta=0.5, verbose=False)
    for step, value in enumerate([1.0, 2.0, 2.4, 2.45], start=1):
        stopper.on_validate(trainer, step, {"rmse/z500": value})
    assert stopper.best == 2.0 and stopper.wait == 2 and stopper.stopped_step == 4 and trainer.should_stop
    trainer.should_stop = False
    nan_stopper = EarlyStopping(verbose=False)
    nan_stopper.on_validate(trainer, 1, {"loss": float("nan")})
    assert trainer.should_stop and nan_stopper.stopped_step == 1
    with pytest.raises(KeyError, match="val/loss"):
        EarlyStopping(verbose=False).on_validate(trainer, 1, {"mae/2t": 1.0})


def test_second_signal_falls_back_to_the_previous_handler():
    seen = []

    def previous(signum, frame):
        seen.append(signum)

    original = signal.signal(signal.SIGTERM, previous)
    try:
        trainer = Trainer([])
        guard = Preemption(signals=(signal.SIGTERM,), verbose=False)
        guard.on_fit_start(trainer)
        assert signal.getsignal(signal.SIGTERM) == guard._handle
        os.kill(os.getpid(), signal.SIGTERM)
        assert trainer.should_stop and guard.preempted and guard.received == signal.SIGTERM and seen == []
        os.kill(os.getpid(), signal.SIGTERM)  # impatient: hand over to whoever was there before
        assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is previous
        guard.on_fit_end(trainer)
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)


PREEMPT_ONE_PROCESS = '''
import os, signal, sys
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import optax
from aurora_loop.callbacks import Callback, ModelCheckpoint, Preemption
from aurora_loop.callbacks.preemption import was_preempted
from aurora_loop.data import ArrayLoader
from aurora_loop.model.batch import stack_samples
from aurora_loop.parallel import make_mesh
from aurora_loop.tasks.conv import ConvTask
from aurora_loop.trainer import Trainer
from tests.synthetic import make_samples


class SignalOnProcessOne(Callback):
    def on_step(self, trainer, step, metrics):
        if step == 3 and jax.process_index() == 1:
            os.kill(os.getpid(), signal.SIGTERM)


samples = make_samples(12, grid=(8, 16))
checkpoint = ModelCheckpoint(out, every_n_steps=100, save_last=False, verbose=False)
trainer = Trainer([SignalOnProcessOne(), Preemption(verbose=False), checkpoint], optimizer=optax.adam(1e-3),
                  max_epochs=3, mesh=make_mesh())
trainer.fit(ConvTask(features=8, depth=2), ArrayLoader(samples[:8], 2, stack_samples, seed=0))
print(f"RESULT {pid} {trainer.global_step} {was_preempted(trainer)} {checkpoint.saved_steps}", flush=True)
'''


@pytest.mark.slow
def test_signal_on_one_process_stops_and_saves_on_all(tmp_path):
    """Two processes (1 CPU device each): SIGTERM reaches process 1 only. Both stop at the
    same step, write one checkpoint together (an orbax save is collective) and report
    preemption, instead of one process waiting forever in the other's save."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "preempt_one.py"
    script.write_text(PREEMPT_ONE_PROCESS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR"))}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""))
    out = str(tmp_path / "ckpt")
    procs = [subprocess.Popen([sys.executable, str(script), str(p), str(port), out], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in (0, 1)]
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    results = sorted(line for text in outputs for line in text.splitlines() if line.startswith("RESULT"))
    assert results == ["RESULT 0 4 True [4]", "RESULT 1 4 True [4]"], "\n".join(o[-2000:] for o in outputs)
    assert [proc.returncode for proc in procs] == [0, 0]
    assert ModelCheckpoint(out).all_steps() == [4]
