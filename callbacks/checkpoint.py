"""ModelCheckpoint: the whole trainer state in orbax checkpoints, saved asynchronously.

A checkpoint ``<directory>/<step>/`` holds two items:

- ``state``: the TrainState (parameters, optimizer state, step, RNG) as an orbax PyTree;
- ``meta``: JSON with the step, epoch, the training data's position and every callback's
  ``state_dict`` (keyed by ``state_key``).

Saves happen at sync steps (``on_sync``), i.e. after that step's validation. Orbax writes
to a temporary directory and renames it when complete, so a run killed mid-write leaves no
checkpoint that ``latest_step`` would pick up. Parameters that are not finite are never
saved: the previous good checkpoint stays the latest.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from aurora_loop.callbacks.base import Callback

log = logging.getLogger(__name__)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class ModelCheckpoint(Callback):
    """Save the trainer state every ``every_n_steps`` steps and at the end; resume from it.

    Args:
      directory: where step directories go (``output_dir/checkpoints``).
      every_n_steps: save after every this many optimizer steps.
      max_to_keep: keep the newest this many checkpoints (``None``: all).
      save_last: also save when the run ends (normal end, max_steps or a stop).
      async_save: write in a background thread; the loop only waits for the device-to-host
        copy. Errors of a background write are raised at the next save or at the end.
      verbose: print a line per save on process 0.
    """

    def __init__(
        self,
        directory: str,
        every_n_steps: int = 200,
        max_to_keep: int | None = 3,
        save_last: bool = True,
        async_save: bool = True,
        verbose: bool = True,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.every_n_steps = every_n_steps
        self.max_to_keep = max_to_keep
        self.save_last = save_last
        self.async_save = async_save
        self.verbose = verbose
        self._manager: ocp.CheckpointManager | None = None
        self.saved_steps: list[int] = []

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=self.max_to_keep,
                    enable_async_checkpointing=self.async_save,
                    create=True,
                ),
                item_names=("state", "meta"),
            )
        return self._manager

    # --- resume ----------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        if not os.path.isdir(self.directory):
            return None
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Read checkpoint ``step`` into arrays shaped and sharded like ``abstract_state``."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["meta"])

    def restore_latest(self, trainer: Any, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        step = self.latest_step()
        if step is None:
            return None
        state, meta = self.restore(step, abstract_state)
        if self.verbose and trainer.is_main_process:
            print(f"Resuming from checkpoint {os.path.join(self.directory, str(step))} (step {step}, epoch {meta['epoch']})", flush=True)
        return state, meta

    # --- saving ----------------------------------------------------------------------------
    def _due(self, trainer: Any, step: int) -> bool:
        return step % self.every_n_steps == 0

    def wants_sync(self, trainer: Any, step: int) -> bool:
        return self._due(trainer, step)

    def on_sync(self, trainer: Any, step: int) -> None:
        final = trainer.should_stop or (trainer.total_steps is not None and step >= trainer.total_steps)
        if self._due(trainer, step) or (self.save_last and final):
            self.save(trainer, step)

    def save(self, trainer: Any, step: int) -> bool:
        """Save the state after ``step`` unless it is already saved or not finite."""
        if step in self.saved_steps or self.manager.latest_step() == step:
            return False
        if not bool(_all_finite(trainer.state.params)):
            log.warning("step %d: parameters are not finite; checkpoint skipped, the last good one stays", step)
            if trainer.is_main_process:
                print(f"Step {step}: parameters are not finite; not saving a checkpoint", flush=True)
            return False
        self.manager.check_for_errors()
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(trainer.state), meta=ocp.args.JsonSave(trainer.meta_state())),
            force=True,
        )
        self.saved_steps.append(step)
        if self.verbose and trainer.is_main_process:
            print(f"Saved checkpoint {os.path.join(self.directory, str(step))}", flush=True)
        return True

    def on_fit_end(self, trainer: Any) -> None:
        self.close()

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        # Let complete background writes finish so the last good checkpoint is usable.
        self.close()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
            self._manager.close()
            self._manager = None
