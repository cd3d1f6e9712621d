"""ModelCheckpoint: the whole trainer state in orbax checkpoints, saved asynchronously.

A checkpoint ``<directory>/<step>/`` holds two items:

- ``state``: the TrainState (parameters, optimizer state, step, RNG) as an orbax PyTree;
- ``meta``: JSON with the step, epoch, the training data's position and every callback's
  ``state_dict`` (keyed by ``state_key``), this one's included.

Saves happen at sync steps (``on_sync``), i.e. after that step's validation: every
``every_n_steps`` steps, and with ``every_n_minutes`` also at the first step boundary after
that much wall-clock time since the last save (or since ``fit`` started). Process 0's clock
alone decides a timed save and every process learns its decision
(:func:`aurora_loop.parallel.distributed.agree`), so all of them save the same steps. Orbax writes
to a temporary directory and renames it when complete, so a run killed mid-write leaves no
checkpoint that ``latest_step`` would pick up.

Which checkpoints stay (orbax preservation policies):

- the newest ``max_to_keep`` (what a resume needs), and
- with ``monitor``: also the ``save_top_k`` best by that validation score (``mode`` ``min`` or
  ``max``). Every validation then triggers a save so each score has its checkpoint; the
  score is stored with the checkpoint (orbax metrics) and in this callback's state.

Never saved: parameters that are not finite, and any state once a stop asked for no more
checkpoints (``trainer.stop_checkpoint is False``: :class:`~aurora_loop.callbacks.TerminateOnNaN`
after a non-finite step); the last good checkpoint stays the latest. A stop that asks for a
checkpoint now (``trainer.stop_checkpoint is True``: :class:`~aurora_loop.callbacks.Preemption`
after a signal) is always saved, even with ``save_last=False``.

Errors of a background (async) write are raised at the next sync step, the next save or at
the end of the run; they never vanish.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from aurora_loop.callbacks.base import CheckpointIO
from aurora_loop.errors import UsageError

log = logging.getLogger(__name__)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (raised in the loop, also for background writes)."""


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _agreed(trainer: Any, agreed: str, request: str) -> bool:
    """The trainer's agreed flag ``agreed``; a trainer without one (a hand-made one in a
    script) offers only its request ``request``, which is then OR-ed over the processes."""
    if hasattr(trainer, agreed):
        return bool(getattr(trainer, agreed))
    from aurora_loop.parallel.distributed import agree

    return agree(bool(getattr(trainer, request, False)))


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def metric_key(name: str) -> str:
    """A monitored name as it appears in validation metrics: ``val/loss`` -> ``loss``."""
    return name[4:] if name.startswith("val/") else name


class ModelCheckpoint(CheckpointIO):
    """Save the trainer state every ``every_n_steps`` steps and at the end; resume from it.

    Args:
      directory: where step directories go (``output_dir/checkpoints``).
      every_n_steps: save after every this many optimizer steps.
      max_to_keep: keep the newest this many checkpoints (``None``: all).
      save_last: also save when the run ends (normal end, max_steps or a stop).
      monitor: a validation score (``val/loss``, ``val/rmse/z500``; the ``val/`` prefix is
        optional) whose ``save_top_k`` best checkpoints are kept besides the newest ones.
        With a monitor every validation is followed by a save.
      mode: ``min`` (lower is better) or ``max``.
      save_top_k: how many best checkpoints to keep (with ``monitor``).
      async_save: write in a background thread; the loop only waits for the device-to-host
        copy.
      verbose: print a line per save on process 0.
      every_n_minutes: also save at the first step boundary after this many minutes of
        wall-clock time since the last save or the start of ``fit`` (``None``: never).
      clock: seconds, monotonic, for ``every_n_minutes`` and the save timings (tests pass a
        fake one).

    Attributes:
      last_save_seconds: seconds the latest save took, the background write included once it
        was seen to finish (until then its blocking part); ``None`` before the first save.
        :class:`~aurora_loop.callbacks.TimeLimit` plans the final save with it.
      last_save_blocking_seconds: seconds the loop waited in the latest save (for the previous
        background write, the device-to-host copy, and with ``async_save=False`` the write).
    """

    def __init__(
        self,
        directory: str,
        every_n_steps: int = 200,
        max_to_keep: int | None = 3,
        save_last: bool = True,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        async_save: bool = True,
        verbose: bool = True,
        every_n_minutes: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        if every_n_minutes is not None and not every_n_minutes > 0:
            raise ValueError(f"every_n_minutes must be positive (or None), got {every_n_minutes}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be at least 1 (or None for all), got {max_to_keep}")
        if save_top_k < 1:
            raise ValueError(f"save_top_k must be at least 1, got {save_top_k}")
        self.directory = os.path.abspath(directory)
        self.every_n_steps = every_n_steps
        self.max_to_keep = max_to_keep
        self.save_last = save_last
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.async_save = async_save
        self.verbose = verbose
        self.every_n_minutes = every_n_minutes
        self.clock = clock
        self._manager: ocp.CheckpointManager | None = None
        self.last_save_seconds: float | None = None
        self.last_save_blocking_seconds: float | None = None
        self._writing_since: float | None = None  # clock at the start of a save still writing in the background
        self._last_save_time: float | None = None  # clock at the last save (or fit start), for every_n_minutes
        self.saved_steps: list[int] = []
        # Monitored score of every checkpoint saved with one (step -> value); part of the state.
        self.scores: dict[int, float] = {}
        self._last_val: tuple[int, float] | None = None

    # --- the orbax manager -------------------------------------------------------------------
    def _preservation_policy(self) -> pp.PreservationPolicy:
        latest = pp.LatestN(n=self.max_to_keep)
        if self.monitor is None:
            return latest
        sign = 1.0 if self.mode == "max" else -1.0
        key = metric_key(self.monitor)
        best = pp.BestN(
            get_metric_fn=lambda metrics: sign * float(metrics[key]),
            reverse=False,  # ascending; the last n (the largest sign * value) are kept
            n=self.save_top_k,
            keep_checkpoints_without_metrics=False,
        )
        return pp.AnyPreservationPolicy([latest, best])

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    preservation_policy=self._preservation_policy(),
                    enable_async_checkpointing=self.async_save,
                    create=True,
                ),
                item_names=("state", "meta"),
            )
        return self._manager

    # --- resume ----------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        if not os.path.isdir(self.directory):
            return None
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the checkpoints on disk, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        self.manager.reload()
        return sorted(self.manager.all_steps())

    @property
    def best_step(self) -> int | None:
        """The step with the best monitored score among the checkpoints kept (or ``None``)."""
        kept = set(self.all_steps())
        candidates = {s: v for s, v in self.scores.items() if s in kept}
        if not candidates:
            return None
        pick = min if self.mode == "min" else max
        return pick(candidates, key=candidates.__getitem__)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Read checkpoint ``step`` into arrays shaped and sharded like ``abstract_state``."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["meta"])

    def restore_latest(self, trainer: Any, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        """The Trainer's resume protocol: (state, meta) of the newest checkpoint, or ``None``."""
        step = self.latest_step()
        if step is None:
            return None
        path = os.path.join(self.directory, str(step))
        try:
            state, meta = self.restore(step, abstract_state)
        except Exception as err:  # noqa: BLE001 - any failure to read is a damaged or foreign checkpoint
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise UsageError(
                f"checkpoint {path} cannot be read ({type(err).__name__}: {reason}); move it aside to resume "
                "from an earlier checkpoint, or start over with --no-resume or a new --output_dir"
            ) from err
        if self.verbose and trainer.is_main_process:
            print(f"Resuming from checkpoint {os.path.join(self.directory, str(step))} (step {step}, epoch {meta['epoch']})", flush=True)
        return state, meta

    # --- saving ----------------------------------------------------------------------------
    def _due(self, trainer: Any, step: int) -> bool:
        return step % self.every_n_steps == 0

    def _time_due(self) -> bool:
        """Process 0 only: have ``every_n_minutes`` passed since the last save (or fit start)?"""
        if self.every_n_minutes is None or self._last_save_time is None or jax.process_index() != 0:
            return False
        return self.clock() - self._last_save_time >= 60.0 * self.every_n_minutes

    def _agreed_time_due(self) -> bool:
        """``_time_due`` as process 0 sees it, on every process (one agreement, only with
        ``every_n_minutes``); each process must call it at the same points."""
        if self.every_n_minutes is None:
            return False
        from aurora_loop.parallel.distributed import agree

        return agree(self._time_due())

    def wants_sync(self, trainer: Any, step: int) -> bool:
        # The trainer ORs every process's answer, so process 0's clock alone is enough.
        return self._due(trainer, step) or self._time_due()

    def on_fit_start(self, trainer: Any) -> None:
        self._last_save_time = self.clock()

    def on_step(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        self._note_finished_write()

    def on_validate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if self.monitor is None:
            return
        key = metric_key(self.monitor)
        if key not in metrics:
            raise KeyError(f"ModelCheckpoint monitors {self.monitor!r} but validation reported only: {', '.join(sorted(metrics))}")
        self._last_val = (step, float(metrics[key]))

    def check_for_errors(self) -> None:
        """Raise ``CheckpointSaveError`` if a background write has failed."""
        if self._manager is None:
            return
        try:
            self._manager.check_for_errors()
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise CheckpointSaveError(f"an asynchronous checkpoint save under {self.directory} failed: {type(err).__name__}: {err}") from err

    def on_sync(self, trainer: Any, step: int) -> None:
        self.check_for_errors()  # an earlier background write failed: say so now
        # Every process must take the same branch (saving is collective): read the trainer's
        # agreed flags, not the requests a signal may have raised on one process only.
        stopping = _agreed(trainer, "stopping", "should_stop")
        final = stopping or (trainer.total_steps is not None and step >= trainer.total_steps)
        validated_now = self._last_val is not None and self._last_val[0] == step
        save_now = stopping and getattr(trainer, "stop_checkpoint", None) is True
        timed = self._agreed_time_due()  # always asked, so every process joins the same agreements
        if (
            self._due(trainer, step)
            or timed
            or (self.save_last and final)
            or save_now
            or (self.monitor is not None and validated_now)
        ):
            self.save(trainer, step)

    def save(self, trainer: Any, step: int) -> bool:
        """Save the state after ``step`` unless it is already saved or not trustworthy."""
        if step in self.saved_steps or self.manager.latest_step() == step:
            return False
        if getattr(trainer, "stop_checkpoint", None) is False:
            if trainer.is_main_process:
                after = getattr(trainer, "stop_reason", None) or "a stop that keeps no checkpoint"
                print(f"Step {step}: not saving a checkpoint after {after}; the last good one stays", flush=True)
            return False
        if not bool(_all_finite(trainer.state.params)):
            log.warning("step %d: parameters are not finite; checkpoint skipped, the last good one stays", step)
            if trainer.is_main_process:
                print(f"Step {step}: parameters are not finite; not saving a checkpoint", flush=True)
            return False
        self.check_for_errors()
        started = self.clock()
        metrics = None
        if self.monitor is not None and self._last_val is not None and self._last_val[0] == step and math.isfinite(self._last_val[1]):
            metrics = {metric_key(self.monitor): self._last_val[1]}
            self.scores[step] = self._last_val[1]
        meta = trainer.meta_state()  # after recording this step's score: the saved state includes it
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as err:
            bad = [key for key, value in meta.get("callbacks", {}).items() if not _json_ok(value)]
            where = f"the state_dict of {', '.join(bad)}" if bad else "the trainer's meta state"
            raise CheckpointSaveError(f"step {step}: {where} is not JSON-serialisable ({err}); return plain JSON types from state_dict()") from None
        try:
            # orbax would first wait for the previous background write (raising its error if
            # any); waiting here instead also times that write.
            self._wait_for_previous_write()
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(trainer.state), meta=ocp.args.JsonSave(meta)),
                metrics=metrics,
                force=True,
            )
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise CheckpointSaveError(f"saving checkpoint {step} under {self.directory} failed: {type(err).__name__}: {err}") from err
        self._record_save(started)
        self.saved_steps.append(step)
        if self.verbose and trainer.is_main_process:
            score = f" ({self.monitor} {metrics[metric_key(self.monitor)]:.5g})" if metrics else ""
            verb = "Saving" if self.async_save else "Saved"
            print(f"{verb} checkpoint {os.path.join(self.directory, str(step))}{score}", flush=True)
        return True

    # --- save timings --------------------------------------------------------------------------
    def _record_save(self, started: float) -> None:
        """Time a save that began at ``started``: its blocking part now; its whole length when
        the background write is seen to finish (see ``_note_finished_write``)."""
        now = self.clock()
        self.last_save_blocking_seconds = self.last_save_seconds = now - started
        self._last_save_time = started  # every_n_minutes counts between save starts
        self._writing_since = started
        self._note_finished_write(now)

    def _note_finished_write(self, now: float | None = None) -> None:
        """If the background write has finished, record the save's whole length.

        Cheap enough for every step (a flag read under a lock); the length is known to within
        the step that noticed it.
        """
        if self._writing_since is None or self._manager is None or self._manager.is_saving_in_progress():
            return
        self.last_save_seconds = (self.clock() if now is None else now) - self._writing_since
        self._writing_since = None

    def _wait_for_previous_write(self) -> None:
        """Wait for the previous background write (the next save would wait for it anyway)
        and record its whole length."""
        if self._writing_since is not None and self._manager is not None:
            self._manager.wait_until_finished()
            self._note_finished_write()

    # --- resumable state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, "scores": {str(k): v for k, v in self.scores.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("monitor") == self.monitor and state.get("mode") == self.mode:
            self.scores = {int(k): float(v) for k, v in state.get("scores", {}).items()}

    # --- shutdown --------------------------------------------------------------------------
    def on_fit_end(self, trainer: Any) -> None:
        self.close()

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        # Let complete background writes finish so the last good checkpoint is usable.
        self.close()

    def close(self) -> None:
        """Wait for background writes, raise their errors, release the manager."""
        if self._manager is not None:
            manager, self._manager = self._manager, None
            try:
                manager.wait_until_finished()
                if self._writing_since is not None:
                    self.last_save_seconds = self.clock() - self._writing_since
                    self._writing_since = None
                manager.check_for_errors()
            except Exception as err:  # noqa: BLE001 - re-raised with context
                raise CheckpointSaveError(f"an asynchronous checkpoint save under {self.directory} failed: {type(err).__name__}: {err}") from err
            finally:
                manager.close()
