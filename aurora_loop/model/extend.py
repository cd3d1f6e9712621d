"""Extend a pretrained Aurora: new variables, a longer history, other pressure levels.

A pretrained model's per-variable tensors are stacked in its config's variable order
(:mod:`aurora_loop.model.checkpoint`):

- ``encoder.surf_token_embeds.weight`` (V_surf + V_static, T, p, p, D) in the order
  ``surf_vars + static_vars``, and ``encoder.atmos_token_embeds.weight`` (V_atmos, T, p, p, D);
- ``decoder.surf_heads.{kernel,bias}`` (V_surf, ...) and ``decoder.atmos_heads.{kernel,bias}``
  (V_atmos, ...).

:func:`adapt_pretrained` maps a checkpoint written for ``old_config`` onto ``new_config`` by
variable *name*: every variable both configs know keeps its pretrained slice exactly,
wherever it now stands in the order; a new variable's embedding slice and output head start
from zeros (``init="zero"``) or from the fresh initialisation (``init="default"``). Every
other parameter must fit unchanged (LoRA adapters the checkpoint lacks start fresh).

- A larger ``max_history_size`` grows the embeddings' history axis: the pretrained slots
  keep their place (slot ``t`` stays slot ``t``) and the new slots start at zero, whatever
  ``init`` says, as the reference's ``Aurora.adapt_checkpoint_max_history_size`` does. A
  shorter history than the checkpoint's is refused (:class:`ExtendError`).
- Pressure levels are not parameters (they enter through Fourier encodings and the shared
  ``atmos_levels_embed`` layers), so other or more levels need no new weights.

With ``init="zero"`` an extended model computes the old variables as the pretrained model
did: the surface embedding sums ``x_v * W_v`` over variables plus one bias shared by all
variables, so a new variable with ``W_v = 0`` adds exactly zero, provided its normalised
input is finite (``0 * NaN`` is NaN); the output heads are per variable and independent.
Only the order of the floating-point sum may change (a new variable between old ones), so
equality holds to float32 rounding. Zero slices still train: their gradients are the inputs
times the incoming gradient, as for a LoRA ``B`` that starts at zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from aurora_loop.model.checkpoint import CheckpointError, _check_against, _get, _has, _paths, _set, is_lora_path
from aurora_loop.model.config import AuroraConfig

INITS = ("zero", "default")
VARIABLE_FIELDS = ("surf_vars", "static_vars", "atmos_vars")
_KIND_WORDS = {"surf_vars": "surface", "static_vars": "static", "atmos_vars": "atmospheric"}


class ExtendError(CheckpointError):
    """A pretrained model that cannot be extended to the new configuration (a shorter history)."""


def dotted(path: tuple[str, ...]) -> str:
    """A parameter path as ``aurora_loop.optim.param_path`` prints it."""
    return ".".join(path)


def per_variable_leaves(config: AuroraConfig) -> dict[tuple[str, ...], tuple[tuple[str, ...], bool]]:
    """Parameter path -> (the variable names along its first axis, whether axis 1 is history)."""
    return {
        ("encoder", "surf_token_embeds", "weight"): (config.surf_vars + config.static_vars, True),
        ("encoder", "atmos_token_embeds", "weight"): (config.atmos_vars, True),
        ("decoder", "surf_heads", "kernel"): (config.surf_vars, False),
        ("decoder", "surf_heads", "bias"): (config.surf_vars, False),
        ("decoder", "atmos_heads", "kernel"): (config.atmos_vars, False),
        ("decoder", "atmos_heads", "bias"): (config.atmos_vars, False),
    }


def merge_variables(pretrained: tuple[str, ...], requested: tuple[str, ...] | None) -> tuple[str, ...]:
    """The variable list of a model extended from ``pretrained`` by the ``requested`` flags.

    Unchanged unless ``requested`` names a variable ``pretrained`` lacks; then ``requested``
    in its order, followed by the pretrained variables it leaves out (kept, so that no
    pretrained weight is lost: the data may hold fewer variables than the model).
    """
    if requested is None:
        return tuple(pretrained)
    requested = tuple(dict.fromkeys(requested))
    if set(requested) <= set(pretrained):
        return tuple(pretrained)
    return requested + tuple(v for v in pretrained if v not in requested)


def extended_variables(pretrained: AuroraConfig, config: Any) -> dict[str, tuple[str, ...]]:
    """The ``surf_vars`` / ``static_vars`` / ``atmos_vars`` overrides that the flags of a
    TrainingConfig-like ``config`` make to a pretrained model's config (only changed ones)."""
    out = {}
    for name in VARIABLE_FIELDS:
        value = getattr(config, name, None)
        merged = merge_variables(getattr(pretrained, name), None if value is None else tuple(value))
        if merged != getattr(pretrained, name):
            out[name] = merged
    return out


def check_extension(old: AuroraConfig, new: AuroraConfig) -> None:
    """Raise :class:`ExtendError` if ``new`` cannot take ``old``'s weights (a shorter history)."""
    if new.max_history_size < old.max_history_size:
        raise ExtendError(
            f"the pretrained model takes max_history_size={old.max_history_size} history steps, more than "
            f"the {new.max_history_size} asked for; a history can grow but not shrink: set max_history_size "
            f">= {old.max_history_size} in --model_kwargs, or leave it out"
        )


def new_variables(old: AuroraConfig, new: AuroraConfig) -> dict[str, tuple[str, ...]]:
    """``surf_vars`` / ``static_vars`` / ``atmos_vars`` -> the names ``new`` has and ``old`` lacks
    (only kinds with new names). A surface/static variable is new to the shared surface
    embedding only if ``old`` has it in neither list."""
    out = {}
    for field in VARIABLE_FIELDS:
        known = set(getattr(old, field))
        if field != "atmos_vars":
            known = set(old.surf_vars + old.static_vars) if field == "static_vars" else set(old.surf_vars)
        added = tuple(v for v in getattr(new, field) if v not in known)
        if added:
            out[field] = added
    return out


def describe_extension(old: AuroraConfig, new: AuroraConfig) -> str:
    """One line naming what ``new`` adds to ``old`` (empty when nothing)."""
    parts = [f"new {_KIND_WORDS[k]} variables {', '.join(v)}" for k, v in new_variables(old, new).items()]
    if new.max_history_size > old.max_history_size:
        slots = _slots(old.max_history_size, new.max_history_size)
        parts.append(f"max_history_size {old.max_history_size} -> {new.max_history_size} "
                     f"({slots} {'starts' if new.max_history_size == old.max_history_size + 1 else 'start'} at zero)")
    dropped = [v for f in VARIABLE_FIELDS for v in getattr(old, f) if v not in getattr(new, f)]
    if dropped:
        parts.append(f"pretrained variables not in the model: {', '.join(dropped)}")
    return "; ".join(parts)


def _slots(old_t: int, new_t: int) -> str:
    """1-based names of the new history slots: "history slot 3", "history slots 3-4"."""
    return f"history slot {new_t}" if new_t == old_t + 1 else f"history slots {old_t + 1}-{new_t}"


def new_slice_masks(old: AuroraConfig, new: AuroraConfig) -> dict[tuple[str, ...], np.ndarray]:
    """Per-variable parameter path -> a boolean (V,) mask over its first axis, true for the
    new variables (where ``init="default"`` takes the fresh values). Only paths with a new
    variable appear."""
    out = {}
    old_leaves = per_variable_leaves(old)
    for path, (names, _) in per_variable_leaves(new).items():
        mask = np.array([n not in old_leaves[path][0] for n in names], bool)
        if mask.any():
            out[path] = mask
    return out


def _broadcast(mask: np.ndarray, ndim: int) -> np.ndarray:
    """A (V,) mask reshaped to broadcast over a parameter of ``ndim`` dimensions."""
    return np.asarray(mask).reshape((-1,) + (1,) * (ndim - 1))


def adapt_pretrained(loaded_parts: Mapping[str, Any], old_config: AuroraConfig, new_config: AuroraConfig,
                     fresh_params: Mapping[str, Any], init: str = "zero") -> tuple[dict[str, Any], dict[str, str]]:
    """Map pretrained parts written for ``old_config`` onto ``new_config``.

    Args:
      loaded_parts: part name (``encoder`` / ``backbone`` / ``decoder``) -> nested dict of
        arrays, as restored from the pretrained checkpoint (any subset of the parts).
      old_config: the pretrained model's config (its ``config.json``): its variable order
        says which slice belongs to which variable.
      new_config: the model to build.
      fresh_params: ``new_config``'s parameters, or their shapes (leaves with ``.shape``,
        e.g. ``jax.ShapeDtypeStruct``) when ``init="zero"``; every part of the model.
      init: what a new variable's slices start from: ``"zero"`` or ``"default"`` (the
        values in ``fresh_params``). New history slots of pretrained variables are zero
        either way.

    Returns:
      ``(params, new_paths)``: ``params`` holds the loaded parts as numpy trees shaped for
      ``new_config`` (LoRA adapters the checkpoint lacks are left out: overlay onto fresh
      parameters); ``new_paths`` maps the dotted path of every parameter that is new or
      partly new to a short note (``"new: tp"``, ``"history slot 3 new"``, ``"new: LoRA
      adapter"``, ``"new: no pretrained backbone"``).

    Raises:
      ExtendError: ``new_config`` has a shorter history than ``old_config``.
      CheckpointError: a parameter that is neither per variable nor LoRA does not fit
        (names it), or a per-variable tensor does not match ``old_config``'s variables.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    check_extension(old_config, new_config)
    old_leaves, new_leaves = per_variable_leaves(old_config), per_variable_leaves(new_config)
    masks = new_slice_masks(old_config, new_config)
    t_new = new_config.max_history_size
    params: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for part, tree in loaded_parts.items():
        tree = _copy(tree)
        for path, (names, history) in new_leaves.items():
            if path[0] != part or not _has(tree, path[1:]):
                continue
            old_names = old_leaves[path][0]
            value = np.asarray(_get(tree, path[1:]))
            if value.ndim < 1 or value.shape[0] != len(old_names):
                raise CheckpointError(
                    f"parameter {'/'.join(path)} has {value.shape[0] if value.ndim else 0} variable slices, but the pretrained "
                    f"config lists {len(old_names)} ({', '.join(old_names)}); is config.json the one written with these weights?"
                )
            if history and value.ndim >= 2 and value.shape[1] > t_new:
                check_extension(old_config.replace(max_history_size=value.shape[1]), new_config)
            shape = (len(names),) + ((t_new,) if history else ()) + value.shape[2 if history else 1:]
            out = np.zeros(shape, value.dtype)
            if init == "default" and path in masks:
                fresh = np.asarray(_get(fresh_params, path))
                if fresh.shape == shape:
                    out = np.where(_broadcast(masks[path], out.ndim), fresh.astype(value.dtype), out)
            for i, name in enumerate(names):
                if name in old_names:
                    src = value[old_names.index(name)]
                    if history:
                        out[i, : src.shape[0]] = src
                    else:
                        out[i] = src
            _set(tree, path[1:], out)
            added = [n for n in names if n not in old_names]
            note = [f"new: {', '.join(added)}"] if added else []
            if history and t_new > value.shape[1]:
                note.append(f"{_slots(value.shape[1], t_new)} new")
            if note:
                notes[dotted(path)] = "; ".join(note)
        expected = _get(fresh_params, (part,))
        absent = _check_against({part: tree}, {part: expected}, allow_missing=is_lora_path)
        notes.update({dotted(p): "new: LoRA adapter" for p in absent})
        params[part] = tree
    if loaded_parts:
        for part in fresh_params:
            if part not in loaded_parts:
                notes.update({dotted((part,) + p): f"new: no pretrained {part}" for p in _paths(_as_dict(fresh_params[part]))})
    return params, notes


def _copy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _copy(v) for k, v in tree.items()}
    return np.asarray(tree)


def _as_dict(tree: Any) -> Any:
    return {k: _as_dict(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def apply_fresh(loaded: Any, fresh: Any, masks: Mapping[tuple[str, ...], Any], where: Callable[[Any, Any, Any], Any]) -> Any:
    """``loaded`` with the masked slices of ``masks`` taken from ``fresh`` (``where`` is
    ``numpy.where`` or ``jax.numpy.where``; used for ``init="default"`` inside a jitted init)."""
    for path, mask in masks.items():
        if _has(loaded, path) and _has(fresh, path):
            leaf = _get(loaded, path)
            _set(loaded, path, where(_broadcast(mask, np.ndim(leaf)), _get(fresh, path), leaf))
    return loaded
