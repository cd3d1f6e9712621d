"""The Trainer's event loop: hook order, deferred metrics, stopping, callback state."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from aurora_loop.callbacks import Callback, CheckpointIO
from aurora_loop.data import ArrayLoader
from aurora_loop.model.batch import stack_samples
from aurora_loop.parallel import make_mesh
from aurora_loop.tasks.conv import ConvTask
from aurora_loop.trainer import Trainer
from tests.synthetic import make_samples


def loaders(n_train=8, n_val=4, batch_size=2, rollout_steps=1):
    samples = make_samples(n_train + n_val, rollout_steps=rollout_steps)
    train = ArrayLoader(samples[:n_train], batch_size, stack_samples, seed=0)
    val = ArrayLoader(samples[n_train:], batch_size, stack_samples, shuffle=False)
    return train, val


class Recorder(Callback):
    """Records every hook with the trainer's view at that moment."""

    def __init__(self, sync_every: int | None = None, key: str = "Recorder") -> None:
        self.events: list[tuple] = []
        self.sync_every = sync_every
        self.key = key

    @property
    def state_key(self) -> str:
        return self.key

    def wants_sync(self, trainer, step):
        return self.sync_every is not None and step % self.sync_every == 0

    def on_fit_start(self, trainer):
        self.events.append(("fit_start",))

    def on_step(self, trainer, step, metrics):
        # Which step had been dispatched when this step's hook ran.
        self.events.append(("step", step, trainer.global_step))

    def on_validate(self, trainer, step, metrics):
        self.events.append(("validate", step))

    def on_epoch_end(self, trainer, epoch, metrics):
        self.events.append(("epoch", epoch))

    def on_sync(self, trainer, step):
        self.events.append(("sync", step, int(trainer.state.step)))

    def on_fit_end(self, trainer):
        self.events.append(("fit_end",))

    def on_exception(self, trainer, exc):
        self.events.append(("exception", type(exc).__name__))


def test_hook_order_lightning_style():
    train, val = loaders(n_train=8, batch_size=2)  # 4 steps per epoch
    rec = Recorder(sync_every=3)
    Trainer([rec], optimizer=optax.adam(1e-3), max_epochs=2, mesh=make_mesh(1)).fit(ConvTask(), train, val)
    names = [e[:2] if e[0] in ("step", "validate", "epoch") else e for e in rec.events]
    expected = [
        ("fit_start",),
        ("step", 1), ("step", 2), ("step", 3), ("sync", 3, 3),
        ("step", 4), ("validate", 4), ("epoch", 0), ("sync", 4, 4),
        ("step", 5), ("step", 6), ("sync", 6, 6),
        ("step", 7), ("step", 8), ("validate", 8), ("epoch", 1), ("sync", 8, 8),
        ("fit_end",),
    ]
    assert names == expected
    # Deferred hand-over: step t's hook runs after step t+1 was dispatched, except on the
    # step before a sync (3, 6) and the last step of an epoch.
    deferred = {e[1]: e[2] for e in rec.events if e[0] == "step"}
    assert deferred == {1: 2, 2: 3, 3: 3, 4: 4, 5: 6, 6: 6, 7: 8, 8: 8}


def test_validation_every_n_steps_and_max_steps_stop():
    train, val = loaders(n_train=8, batch_size=2)
    rec = Recorder()
    trainer = Trainer([rec], optimizer=optax.adam(1e-3), max_epochs=10, max_steps=5, val_every_n_steps=2, mesh=make_mesh(1))
    state = trainer.fit(ConvTask(), train, val)
    assert int(state.step) == 5 and trainer.global_step == 5
    # Step 5 ends the run mid-epoch: its parameters are validated, the partial epoch is
    # closed, and only then saved (on_sync).
    assert [e[1] for e in rec.events if e[0] == "validate"] == [2, 4, 5]
    assert rec.events[-5:] == [("step", 5, 5), ("validate", 5), ("epoch", 1), ("sync", 5, 5), ("fit_end",)]
    assert {"loss", "mae/2t", "rmse/z500"} <= set(trainer.last_val_metrics)


def test_callback_can_stop_the_run():
    class StopAt(Callback):
        def on_step(self, trainer, step, metrics):
            if step == 3:
                trainer.should_stop = True

    train, val = loaders(n_train=12, batch_size=2)  # 6 steps per epoch
    rec = Recorder()
    trainer = Trainer([StopAt(), rec], optimizer=optax.adam(1e-3), max_epochs=5, mesh=make_mesh(1))
    trainer.fit(ConvTask(), train, val)
    # Step 3's hook runs after step 4 was dispatched, so the run ends after step 4, and ends
    # with a validation of the parameters it hands over.
    assert trainer.global_step == 4
    assert rec.events[-5:] == [("step", 4, 4), ("validate", 4), ("epoch", 0), ("sync", 4, 4), ("fit_end",)]


def test_a_sync_at_the_end_of_an_epoch_comes_after_its_validation():
    """A checkpoint due at the epoch's last step is saved once, after that step's validation
    (before: saved first, so it never carried the score; then skipped as already saved)."""
    train, val = loaders(n_train=8, batch_size=2)  # 4 steps per epoch
    rec = Recorder(sync_every=4)
    Trainer([rec], optimizer=optax.adam(1e-3), max_epochs=2, mesh=make_mesh(1)).fit(ConvTask(), train, val)
    tail = [e[:2] for e in rec.events if e[0] != "step"]
    assert tail == [("fit_start",), ("validate", 4), ("epoch", 0), ("sync", 4), ("validate", 8), ("epoch", 1),
                    ("sync", 8), ("fit_end",)]


def test_the_run_ends_with_a_validation_whatever_the_schedule():
    """val_every_n_steps that does not divide the last step: the last step is validated too."""
    train, val = loaders(n_train=8, batch_size=2)
    rec = Recorder()
    trainer = Trainer([rec], optimizer=optax.adam(1e-3), max_epochs=2, val_every_n_steps=3, mesh=make_mesh(1))
    trainer.fit(ConvTask(), train, val)
    assert [e[1] for e in rec.events if e[0] == "validate"] == [3, 6, 8]
    assert trainer.last_validated_step == 8


def test_a_one_shot_iterable_keeps_its_first_batch():
    samples = make_samples(12)
    batches = [stack_samples(samples[i : i + 2]) for i in range(0, 12, 2)]
    rec = Recorder()
    trainer = Trainer([rec], optimizer=optax.adam(1e-3), max_epochs=1, mesh=make_mesh(1))
    trainer.fit(ConvTask(), (b for b in batches))  # a generator: readable once
    assert trainer.global_step == 6


def test_exception_reaches_callbacks_and_is_reraised():
    class Boom(Callback):
        def on_step(self, trainer, step, metrics):
            if step == 2:
                raise RuntimeError("boom")

    train, _ = loaders()
    rec = Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        Trainer([Boom(), rec], optimizer=optax.adam(1e-3), mesh=make_mesh(1)).fit(ConvTask(), train)
    assert rec.events[-1] == ("exception", "RuntimeError")


class SlowTask:
    """A task whose step takes tens of milliseconds on the device: a chain of matmuls."""

    name = "slow"

    def init(self, rng, example_batch):
        return {"w": jax.random.normal(rng, (384, 384)) / 384**0.5}

    def loss(self, params, batch, rng):
        y = batch["x"]
        for _ in range(40):
            y = jax.numpy.tanh(y @ params["w"])
        return jax.numpy.mean(y**2), {}

    def evaluate(self, params, batch):
        raise NotImplementedError


def test_loop_does_not_block_on_every_step():
    """When step t's hooks run, step t+1 has been dispatched and is still computing: the host
    did not wait for the device. Nobody reads metrics here, so nothing forces a sync."""

    class ReadyProbe(Callback):
        def __init__(self):
            self.ready_at_hook = []

        def on_step(self, trainer, step, metrics):
            self.ready_at_hook.append((step, trainer.global_step, trainer.state.step.is_ready(), metrics.fetched))

    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(256, 384)).astype(np.float32)} for _ in range(12)]
    probe = ReadyProbe()
    trainer = Trainer([probe], optimizer=optax.sgd(1e-3), max_epochs=1, mesh=make_mesh(2))
    trainer.fit(SlowTask(), batches)
    deferred = [r for r in probe.ready_at_hook if r[1] == r[0] + 1]
    assert len(deferred) == 11  # every step but the last ran its hooks after the next dispatch
    assert not any(fetched for *_, fetched in probe.ready_at_hook)
    # The newest step was still in flight at (nearly) every hook: the loop ran ahead.
    assert sum(not ready for _, _, ready, _ in deferred) >= 9


def test_metrics_are_fetched_only_on_steps_a_callback_reads():
    class ReadEvery(Callback):
        def __init__(self):
            self.seen, self.fetched = [], []

        def wants_metrics(self, trainer, step):
            return step % 3 == 0

        def on_step(self, trainer, step, metrics):
            if step % 3 == 0:
                self.seen.append((step, metrics["loss"]))
            self.fetched.append(metrics.fetched)

    train, _ = loaders(n_train=12, batch_size=2)
    cb = ReadEvery()
    Trainer([cb], optimizer=optax.adam(1e-3), max_epochs=1, mesh=make_mesh(1)).fit(ConvTask(), train)
    assert [s for s, _ in cb.seen] == [3, 6]
    assert all(np.isfinite(v) for _, v in cb.seen)
    assert cb.fetched == [False, False, True, False, False, True]


def test_callback_state_is_part_of_trainer_state():
    class Counter(Callback):
        def __init__(self):
            self.count = 0

        def on_step(self, trainer, step, metrics):
            self.count += 1

        def state_dict(self):
            return {"count": self.count}

        def load_state_dict(self, state):
            self.count = state["count"]

    train, _ = loaders()
    counter = Counter()
    trainer = Trainer([counter], optimizer=optax.adam(1e-3), max_epochs=1, mesh=make_mesh(1))
    trainer.fit(ConvTask(), train)
    meta = trainer.meta_state()
    assert meta["callbacks"]["Counter"] == {"count": 4}
    assert meta["train_loader"] == {"epoch": 1, "position": 0}
    assert meta["epoch_step"] == 0 and meta["last_validated_step"] is None
    fresh = Counter()
    Trainer([fresh]).load_meta_state(meta)
    assert fresh.count == 4


def test_duplicate_state_keys_are_refused():
    with pytest.raises(ValueError, match="state_key"):
        Trainer([Recorder(), Recorder()])


def test_a_signal_during_the_stop_agreement_is_not_lost(monkeypatch):
    """SIGTERM handled while the trainer exchanges its stop flags (after it read them) must
    still stop the run at the next boundary (before: the agreed False overwrote it)."""
    import os
    import signal

    import aurora_loop.trainer as trainer_module
    from aurora_loop.callbacks import Preemption
    from aurora_loop.callbacks.preemption import was_preempted

    real_agree_any = trainer_module.agree_any
    sent = []

    def agree_any_with_a_signal(*flags):
        agreed = real_agree_any(*flags)
        if not sent and trainer.global_step == 2:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before this call returns
        return agreed

    monkeypatch.setattr(trainer_module, "agree_any", agree_any_with_a_signal)
    train, val = loaders(n_train=16, batch_size=2)
    rec = Recorder()
    trainer = Trainer([Preemption(verbose=False), rec], optimizer=optax.adam(1e-3), max_epochs=1, mesh=make_mesh(1))
    trainer.fit(ConvTask(), train, val)
    assert sent and trainer.global_step == 3
    assert was_preempted(trainer) and trainer.stop_skips_validation and trainer.stop_checkpoint is True
    # A preempted run saves promptly: no final validation, no epoch end.
    assert [e for e in rec.events if e[0] in ("validate", "epoch")] == []


class StateInMemory(CheckpointIO):
    """A CheckpointIO that resumes from a state it was handed (no files)."""

    def __init__(self, saved=None) -> None:
        self.saved = saved
        self.asked_with = None

    def restore_latest(self, trainer, abstract_state):
        self.asked_with = abstract_state
        return self.saved

    def on_fit_end(self, trainer):
        self.saved = (trainer.state, trainer.meta_state())


def test_resume_goes_through_the_one_checkpoint_io_callback():
    train, val = loaders()
    memory = StateInMemory()
    first = Trainer([memory], optimizer=optax.adam(1e-3), max_epochs=2, max_steps=3, mesh=make_mesh(1))
    first.fit(ConvTask(), train, val)
    assert first.resumed_from is None and memory.asked_with is not None  # asked, had nothing
    # The abstract state it is asked to fill carries the shardings to restore into.
    assert all(leaf.sharding is not None for leaf in jax.tree.leaves(memory.asked_with))

    train, val = loaders()
    second = Trainer([memory], optimizer=optax.adam(1e-3), max_epochs=2, max_steps=5, mesh=make_mesh(1))
    second.fit(ConvTask(), train, val)
    assert second.resumed_from == 3 and second.global_step == 5


def test_two_checkpoint_io_callbacks_are_refused():
    class Other(StateInMemory):
        state_key = "Other"

    with pytest.raises(ValueError, match=r"two callbacks hold the CheckpointIO role \(StateInMemory, Other\)"):
        Trainer([StateInMemory(), Other()])


def test_callbacks_wrap_the_train_step_in_list_order():
    calls = []

    class Wrap(Callback):
        def __init__(self, name):
            self.name = name

        @property
        def state_key(self):
            return self.name

        def wrap_train_step(self, trainer, step):
            def wrapped(state, batch):
                calls.append(self.name)
                return step(state, batch)

            return wrapped

    train, _ = loaders()
    trainer = Trainer([Wrap("inner"), Wrap("outer")], optimizer=optax.adam(1e-3), max_steps=2, mesh=make_mesh(1))
    trainer.fit(ConvTask(), train)
    assert calls == ["outer", "inner"] * 2  # the later callback wraps the earlier one's wrapper


def test_callbacks_and_scripts_written_against_the_earlier_names_still_work():
    """``on_epoch`` (the design's hook name) is still called at each epoch end, and
    ``Trainer(learning_rate=)`` still reports the learning rate, with a deprecation warning."""
    seen = []

    class Old(Callback):
        def on_epoch(self, trainer, epoch, metrics):
            seen.append(epoch)

    train, _ = loaders()
    with pytest.warns(DeprecationWarning, match="log_learning_rate"):
        trainer = Trainer([Old()], optimizer=optax.adam(1e-3), learning_rate=1e-3, max_epochs=2, mesh=make_mesh(1))
    trainer.fit(ConvTask(), train)
    assert seen == [0, 1] and trainer.learning_rate(1) == 1e-3
