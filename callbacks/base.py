"""The Callback base class: every hook a no-op, overridden as needed.

Hook order in a run (Lightning-style)::

    wrap_train_step(step)                            # once per fit: may wrap the compiled step
    on_fit_start
    for each step:   on_step(step, metrics)          # step t's hooks run after step t+1
                                                     # was dispatched, unless t is a sync step
      [validation]   on_validate(step, metrics)    # also at the run's last step
      [epoch end]    on_epoch_end(epoch, metrics)      # also for an epoch the run ends early
      [sync step]    on_sync(step)                   # trainer.state is the state after `step`
    on_fit_end                                       # or on_exception(exc) on failure

``step`` counts optimizer steps taken (the first step is 1). ``metrics`` in ``on_step`` is a
lazy mapping: reading it fetches that step's scalars from the device (a sync), so a
callback that only logs every N steps should read it only then, and say so through
``wants_metrics`` so the trainer starts the copy early.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from aurora_loop.trainer import Trainer


class Callback:
    """Base class of every callback; subclass and override the hooks you need."""

    @property
    def state_key(self) -> str:
        """Key of this callback's ``state_dict`` inside the trainer's checkpoint.

        Defaults to the class name; give two instances of one class distinct keys.
        """
        return type(self).__name__

    # --- scheduling questions the trainer asks after dispatching step `step` -------------
    def wants_metrics(self, trainer: Trainer, step: int) -> bool:
        """Will ``on_step`` read ``metrics`` at ``step``? (lets the trainer prefetch them)."""
        return False

    def wants_sync(self, trainer: Trainer, step: int) -> bool:
        """Must ``step`` be a sync step (e.g. to save a checkpoint of the state after it)?"""
        return False

    def wrap_train_step(self, trainer: Trainer, step: Any) -> Any:
        """Called once per ``fit``, before the first step, with the compiled train step
        ``step(state, batch) -> (state, metrics)`` (a ``jax.jit`` function, or what an earlier
        callback returned); return it, or a callable with the same signature that wraps it
        (e.g. to time or trace it). Callbacks wrap in list order. Default: unchanged."""
        return step

    # --- hooks ---------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step (after the state was built or restored)."""

    def on_step(self, trainer: Trainer, step: int, metrics: Mapping[str, float]) -> None:
        """After optimizer step ``step``; ``metrics`` lazily holds its ``train`` scalars."""

    def on_validate(self, trainer: Trainer, step: int, metrics: Mapping[str, float]) -> None:
        """After a validation pass at ``step``; ``metrics``: the validation scores (floats)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: Mapping[str, float]) -> None:
        """At the end of epoch ``epoch`` (0-based); ``metrics``: the last validation scores, if any.

        Also when the run ends mid-epoch (``max_steps``, a callback's stop), after the final
        validation; then ``trainer.epoch_step < trainer.steps_per_epoch``. Not after a stop
        by a signal or a non-finite step: that epoch stays open for the resumed run.

        By default it calls :meth:`on_epoch`, the hook's earlier name, so callbacks written
        against either name work.
        """
        self.on_epoch(trainer, epoch, metrics)

    def on_epoch(self, trainer: Trainer, epoch: int, metrics: Mapping[str, float]) -> None:
        """The earlier name of :meth:`on_epoch_end` (the design's hook contract); override either."""

    def on_sync(self, trainer: Trainer, step: int) -> None:
        """At a step boundary where ``trainer.state`` is exactly the state after ``step``.

        Emitted after the step's ``on_step`` / ``on_validate`` / ``on_epoch_end`` hooks when a
        callback asked for it (``wants_sync``), after each validation, at each epoch end and
        when the run stops. Checkpoints are written here.
        """

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last step (normal end, ``max_steps``, or a callback's stop)."""

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        """The run failed with ``exc`` (re-raised afterwards): release resources here."""

    # --- resumable state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state saved in every checkpoint under ``state_key``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class CheckpointIO(Callback):
    """The role of the one callback that resumes runs: the Trainer asks it, and only it, for
    the state to start from. At most one callback of a Trainer may hold the role
    (:class:`~aurora_loop.callbacks.ModelCheckpoint` does)."""

    def restore_latest(self, trainer: Trainer, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        """``(state, meta)`` of the checkpoint to resume from, or ``None`` to start fresh.

        ``abstract_state``: the TrainState as ``jax.ShapeDtypeStruct`` leaves carrying their
        shardings (restore into exactly those). ``meta``: what ``trainer.meta_state()``
        returned when it was saved (step, epoch, data position, every callback's state).
        """
        raise NotImplementedError
