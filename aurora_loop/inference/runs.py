"""Reading a trained run's weights: which checkpoint, which weights, the parameters alone.

A training run (``aurora-train --output_dir RUN``) holds

- ``RUN/config.json``: its TrainingConfig;
- ``RUN/checkpoints/<step>/state``: the TrainState written by ModelCheckpoint, an orbax
  PyTree with ``step``, ``params``, ``opt_state`` (Adam's two moments: twice the size of the
  parameters), ``rng``, ``task_state`` and, with ``--ema_decay``, ``ema_params`` (the
  moving average of the weights);
- ``RUN/checkpoints/<step>/meta/metadata``: JSON with the step, epoch, the data position
  and every callback's state (ModelCheckpoint's monitored scores: what ``best`` picks by).

An export (``aurora-loop export-checkpoint``, ``import-checkpoint``) holds the parameters
alone: ``encoder/ backbone/ decoder/`` (plus e.g. LoRA adapters) or ``model/``, with
``training_config.json`` or ``config.json`` and ``export.json``.

:func:`resolve_run` turns a run dir, its ``checkpoints/`` dir or one step dir, and a step
(``latest``, ``best`` or a number), into a :class:`Checkpoint` (its directory, step, the
run's config.json and the step's meta); with ``exports=True`` (``aurora-loop forecast``)
an export dir as well. :func:`read_weights` reads the parameters alone: of a TrainState only
the ``params`` or ``ema_params`` subtree that ``--weights`` names (``auto``: the average
when the run kept one), by an orbax partial restore, so the optimizer state's arrays are
never read (orbax's metadata step reads the few-hundred-byte shape/dtype record of every
leaf, the moments' included, but no array data). The arrays come back as numpy, in their
saved dtype and shape, or, given ``shardings``, as ``jax.Array`` values restored straight into
those shardings (each process reads only its shards).

Resuming training (:meth:`aurora_loop.callbacks.ModelCheckpoint.restore_latest`) reads the
whole state, moments included; that is not done here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from aurora_loop.errors import UsageError

WEIGHT_CHOICES = ("auto", "ema", "raw")
WEIGHTS_HELP = (
    "which weights of a run that kept a moving average (--ema_decay) to use: auto (the average when there is one, "
    "else the trained weights), ema (the average; an error without one) or raw (the trained weights)"
)

#: The top-level parts of an Aurora model's parameters, each its own tree in an export.
PARTS = ("encoder", "backbone", "decoder")

#: Layouts of a :class:`Checkpoint`: a TrainState step dir, an export's ``model/`` tree, an
#: export's encoder/backbone/decoder trees.
LAYOUTS = ("state", "model", "parts")


# --- finding the checkpoint ------------------------------------------------------------------


def is_step_dir(path: str) -> bool:
    """Whether ``path`` is a complete ModelCheckpoint step dir (``state/`` and ``meta/``)."""
    return os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta"))


def checkpoint_steps(checkpoint_dir: str) -> list[int]:
    """Steps of the complete checkpoints under ``checkpoint_dir``, oldest first ([] when the
    dir does not exist)."""
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(
        int(name) for name in os.listdir(checkpoint_dir) if name.isdigit() and is_step_dir(os.path.join(checkpoint_dir, name))
    )


def read_meta(step_dir: str) -> dict[str, Any]:
    """The ``meta`` item (trainer meta state) of a checkpoint step directory."""
    with open(os.path.join(step_dir, "meta", "metadata"), encoding="utf-8") as fh:
        return json.load(fh)


def best_step(checkpoint_dir: str, steps: list[int]) -> int | None:
    """The kept step (of ``steps``) with the best ModelCheckpoint score, from the newest
    checkpoint's meta; None when no monitored scores were saved."""
    meta = read_meta(os.path.join(checkpoint_dir, str(steps[-1])))
    for state in meta.get("callbacks", {}).values():
        if isinstance(state, Mapping) and "scores" in state and state.get("monitor"):
            scores = {int(k): float(v) for k, v in state["scores"].items() if int(k) in steps}
            if scores:
                pick = min if state.get("mode", "min") == "min" else max
                return pick(scores, key=scores.__getitem__)
    return None


def choose_step(checkpoint_dir: str, wanted: str | int = "latest") -> int:
    """The step ``wanted`` names among the complete checkpoints of ``checkpoint_dir``:
    ``latest``, ``best`` (the monitored best, :func:`best_step`) or a step number."""
    wanted = str(wanted)
    steps = checkpoint_steps(checkpoint_dir)
    if not steps:
        raise UsageError(f"no checkpoints in {checkpoint_dir}; pass the --output_dir of a run that saved some")
    if wanted == "latest":
        return steps[-1]
    if wanted == "best":
        step = best_step(checkpoint_dir, steps)
        if step is None:
            raise UsageError(
                f"no monitored scores in {checkpoint_dir} (ModelCheckpoint ran without monitor); pass --step N or latest"
            )
        return step
    if not wanted.isdigit():
        raise UsageError(f"--step {wanted!r} is not a step number, 'latest' or 'best'")
    if int(wanted) not in steps:
        raise UsageError(f"no checkpoint for step {wanted} in {checkpoint_dir}; available: {', '.join(map(str, steps))}")
    return int(wanted)


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when there is no such file (or it holds no object).
    A file that is not JSON is a one-line UsageError."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} cannot be read as JSON ({err}); restore or remove it") from None
    return data if isinstance(data, dict) else None


def training_config(values: Mapping[str, Any] | None, model: str | None, where: str) -> Any:
    """The TrainingConfig of a run's config.json ``values`` (unknown keys dropped), its model
    replaced by ``model`` when given. Without values (e.g. weights from ``aurora-loop
    import-checkpoint``) ``model`` is required and the task reads its model config from
    ``where``."""
    from aurora_loop.config import TrainingConfig, config_from_mapping

    if values is None or "model" not in values:
        if model is None:
            raise UsageError(
                f"{where} holds no training config (config.json of an aurora-train run); "
                "pass --model NAME and the variables with --surf_vars/--static_vars/--atmos_vars/--levels"
            )
        # e.g. weights from `aurora-loop import-checkpoint`: the task reads its model config there
        return TrainingConfig(model=model, checkpoint_dir=where)
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    config = config_from_mapping({k: v for k, v in values.items() if k in known}, source=f"{where}")
    return config.replace(model=model) if model else config


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run, as :func:`resolve_run` found it.

    Attributes:
      path: the step dir ``RUN/checkpoints/<step>`` (layout ``state``) or the export dir.
      layout: ``state`` (a TrainState), ``model`` (an export's one params tree) or ``parts``
        (an export's encoder/backbone/decoder trees).
      step: the training step (an export's, from its export.json; None when unknown).
      run_dir: the run's --output_dir (layout ``state``; None for an export).
      config_values: the run's config.json as written (an export's training_config.json or
        config.json); None when there is none.
    """

    path: str
    layout: str
    step: int | None
    run_dir: str | None
    config_values: dict[str, Any] | None

    @property
    def state_dir(self) -> str:
        """The TrainState item of a step dir."""
        return os.path.join(self.path, "state")

    @property
    def meta(self) -> dict[str, Any]:
        """The step's trainer meta state (step, epoch, callbacks' states); {} for an export."""
        return read_meta(self.path) if self.layout == "state" else {}

    def training_config(self, model: str | None = None) -> Any:
        """The run's TrainingConfig (:func:`training_config`; ``model`` overrides its task). A
        run trained on the built-in sample (no dataset_path) points at its ``sample_data.zarr``."""
        if self.layout != "state" or self.run_dir is None:
            return training_config(self.config_values, model, self.path)
        config = training_config(self.config_values, model, self.run_dir)
        sample = os.path.join(self.run_dir, "sample_data.zarr")
        if not config.dataset_path and os.path.isdir(sample):
            config = config.replace(dataset_path=sample)
        return config

    def read_weights(self, weights: str = "auto", shardings: Any = None) -> tuple[Any, str]:
        """(the parameters, the subtree read); see :func:`read_weights`."""
        return read_weights(self.path, self.layout, weights, shardings)


def _single(path: str, step: str | int, at: int | None) -> None:
    """A step dir or export is one checkpoint: only ``latest`` (or its own step) selects it."""
    if str(step) not in ("latest", str(at)):
        raise UsageError(f"{path} holds one checkpoint (step {at}); pass its run dir to choose --step {step}")


def _in_checkpoints(checkpoint_dir: str, run_dir: str, step: str | int, exports: bool) -> Checkpoint:
    if exports and str(step) == "latest" and not checkpoint_steps(checkpoint_dir):
        raise UsageError(f"{checkpoint_dir} holds no complete checkpoint; train longer or pass a run that saved one")
    chosen = choose_step(checkpoint_dir, step)
    values = read_json(os.path.join(run_dir, "config.json"))
    return Checkpoint(os.path.join(checkpoint_dir, str(chosen)), "state", chosen, run_dir, values)


def resolve_run(path: str, step: str | int = "latest", exports: bool = False) -> Checkpoint:
    """The checkpoint of ``path`` at ``step``.

    ``path``: a run dir (aurora-train's ``--output_dir``, holding ``checkpoints/``), its
    ``checkpoints/`` dir, or one step dir (``run/checkpoints/<step>``, which is only its own
    step); with ``exports`` also an exported / imported weights dir (``encoder/ backbone/
    decoder/`` or ``model/``; see ``aurora-loop export-checkpoint``), and the messages name
    ``--checkpoint`` (``aurora-loop forecast``) rather than ``RUN_DIR`` (export-checkpoint).
    ``step``: ``latest`` (the newest complete checkpoint), ``best`` (ModelCheckpoint's
    monitored best) or a step number. Reads config.json (a one-line UsageError if it is not
    JSON), no weights.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        if exports:
            raise UsageError(
                f"--checkpoint {path} does not exist; pass a run dir, run/checkpoints/<step> or an exported checkpoint dir"
            )
        raise UsageError(f"RUN_DIR {path} does not exist; pass a training run's --output_dir")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return _in_checkpoints(os.path.join(path, "checkpoints"), path, step, exports)
    if is_step_dir(path):
        name = os.path.basename(path)
        at = int(name) if name.isdigit() else None
        _single(path, step, at)
        run_dir = os.path.dirname(os.path.dirname(path))
        return Checkpoint(path, "state", at, run_dir, read_json(os.path.join(run_dir, "config.json")))
    if os.path.basename(path) == "checkpoints" or checkpoint_steps(path):
        return _in_checkpoints(path, os.path.dirname(path), step, exports)
    if not exports:
        return _in_checkpoints(os.path.join(path, "checkpoints"), path, step, exports)  # no checkpoints: choose_step says so
    values = read_json(os.path.join(path, "training_config.json")) or read_json(os.path.join(path, "config.json"))
    record = read_json(os.path.join(path, "export.json")) or {}
    if os.path.isdir(os.path.join(path, "model")):
        layout = "model"
    elif all(os.path.isdir(os.path.join(path, p)) for p in PARTS):
        layout = "parts"
    else:
        raise UsageError(
            f"--checkpoint {path} is neither a run dir (with checkpoints/), a step dir (with state/ and meta/) "
            "nor an exported checkpoint (with model/ or encoder/ backbone/ decoder/)"
        )
    _single(path, step, record.get("step"))
    return Checkpoint(path, layout, record.get("step"), None, values)


def resolve_checkpoint(path: str, model: str | None = None) -> tuple[Any, str, str, int | None]:
    """Find the parameters and the training config behind ``path`` (``aurora-loop forecast
    --checkpoint``): a run dir (its newest step), a step dir, or an exported / imported
    checkpoint dir (:func:`resolve_run` with ``exports``).

    Returns ``(config, layout, params_dir, step)``: the TrainingConfig (``model`` overrides
    its task), ``layout`` "state" (a TrainState checkpoint), "model" (one params tree) or
    "parts" (encoder/backbone/decoder trees), the directory to read (:func:`read_weights`)
    and the training step (None when unknown).
    """
    checkpoint = resolve_run(path, exports=True)
    return checkpoint.training_config(model), checkpoint.layout, checkpoint.path, checkpoint.step


# --- reading the parameters ------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Orbax warns that a step's item dir has no _CHECKPOINT_METADATA (it is one level up)."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def _saved_tree(checkpointer: Any, directory: str) -> Any:
    """The saved PyTree's metadata tree (leaves: array metadata; reads no array data)."""
    metadata = checkpointer.metadata(directory)
    tree = getattr(metadata, "item_metadata", metadata)
    return getattr(tree, "tree", tree)


def _restore_args(tree: Any, shardings: Any, where: str) -> Any:
    """orbax restore args for the metadata ``tree``: numpy arrays without ``shardings``, else
    ``jax.Array`` values in ``shardings`` (one Sharding for every leaf, or a pytree of them shaped
    like ``tree``, matched by key path)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    if shardings is None:
        return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=shardings), tree)
    given = {jax.tree_util.keystr(k): s for k, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    args = []
    for key, _ in leaves:
        name = jax.tree_util.keystr(key)
        if name not in given:
            raise ValueError(
                f"shardings has no entry for parameter {name} of {where}; give one Sharding or a tree shaped like the parameters"
            )
        args.append(ocp.ArrayRestoreArgs(sharding=given[name]))
    if len(given) != len(leaves):
        raise ValueError(
            f"shardings has {len(given)} leaves, the parameters in {where} {len(leaves)}; give a tree shaped like the parameters"
        )
    return jax.tree.unflatten(treedef, args)


def weights_key(tree: Mapping[str, Any], weights: str, where: str) -> str:
    """``"ema_params"`` or ``"params"``: the subtree of a saved state ``weights`` names."""
    has_ema = isinstance(tree.get("ema_params"), Mapping) and bool(tree["ema_params"])
    if weights not in WEIGHT_CHOICES:
        raise UsageError(f"--weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    if weights == "ema" and not has_ema:
        raise UsageError(
            f"{where} holds no moving average of the weights (the run had no --ema_decay); use --weights raw or auto"
        )
    return "ema_params" if has_ema and weights != "raw" else "params"


def restore_state_weights(state_dir: str, weights: str = "auto", shardings: Any = None) -> tuple[Any, str]:
    """(the chosen weights of the TrainState saved in ``state_dir``, the subtree read:
    ``ema_params`` or ``params``; :func:`weights_key`).

    Only that subtree's arrays are read from disk (an orbax partial restore): never the
    optimizer state, nor the other weights. Without ``shardings`` numpy arrays (any device
    count); with them ``jax.Array`` values restored into those shardings (a Sharding for every
    leaf, or a pytree of Shardings shaped like the parameters).
    """
    import orbax.checkpoint as ocp

    with _quiet_orbax():
        checkpointer = ocp.PyTreeCheckpointer()
        tree = _saved_tree(checkpointer, state_dir)
        if not isinstance(tree, Mapping) or "params" not in tree:
            raise UsageError(
                f"{state_dir} does not hold a trainer state with params; pass a run dir, "
                "run/checkpoints/<step> or an exported checkpoint dir"
            )
        key = weights_key(tree, weights, state_dir)
        wanted = {key: tree[key]}
        restore_args = {key: _restore_args(tree[key], shardings, state_dir)}
        state = checkpointer.restore(
            state_dir, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True)
        )
    return state[key], key


def read_params(state_dir: str, weights: str = "auto", shardings: Any = None) -> Any:
    """The chosen weights of the TrainState in ``state_dir`` alone (:func:`restore_state_weights`)."""
    return restore_state_weights(state_dir, weights, shardings)[0]


def restore_tree(path: str, shardings: Any = None) -> Any:
    """The whole PyTree checkpoint in ``path`` (an export's part): numpy arrays, or
    ``jax.Array`` values in ``shardings`` (as :func:`restore_state_weights`)."""
    import orbax.checkpoint as ocp

    with _quiet_orbax():
        checkpointer = ocp.PyTreeCheckpointer()
        tree = _saved_tree(checkpointer, path)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=_restore_args(tree, shardings, path)))


def read_weights(path: str, layout: str = "state", weights: str = "auto", shardings: Any = None) -> tuple[Any, str]:
    """(the parameters of the checkpoint in ``path``, the subtree read).

    ``layout`` "state" (``path`` a step dir): the ``params`` or ``ema_params`` of its
    TrainState as ``weights`` chooses (:func:`restore_state_weights`: the optimizer state is
    not read). "model": the export's ``model/`` tree. "parts": ``{part: tree}`` of the
    export's encoder/backbone/decoder and any other part dirs beside them (e.g. LoRA
    adapters). An export holds the weights it was made with (``weights`` is not used; the
    subtree is reported as ``params``). ``shardings``: as :func:`restore_state_weights`;
    for "parts" a pytree is keyed by part.
    """
    if layout == "state":
        return restore_state_weights(os.path.join(path, "state"), weights, shardings)
    if layout == "model":
        return restore_tree(os.path.join(path, "model"), shardings), "params"
    if layout != "parts":
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    extra = sorted(
        n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)) and n not in PARTS and not n.startswith(".")
    )
    params = {}
    for name in (*PARTS, *extra):  # extra: e.g. LoRA adapters written next to the parts
        part = shardings if shardings is None or not isinstance(shardings, Mapping) else shardings[name]
        params[name] = restore_tree(os.path.join(path, name), part)
    return params, "params"
