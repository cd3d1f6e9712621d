"""The optimizer: AdamW with its learning-rate schedule, gradient clipping and parameter groups.

Parameter groups say which parameters train, and at what multiple of the learning rate.

A parameter is named by its dotted path, e.g. ``backbone.encoder_layers_0.blocks_1.attn.qkv.kernel``.
Patterns (Python regular expressions) match a path in full or a whole subtree of it, and
may also write a layer index the PyTorch way (``encoder_layers.0`` for ``encoder_layers_0``)
or use ``/`` between names, so ``backbone\\.encoder_layers\\.0\\..*``,
``backbone.encoder_layers_0`` and ``encoder/surf_token_embeds`` all work.

Groups: ``frozen`` (``--freeze``, or not LoRA under ``--lora_only``: zero updates, no
optimizer state), ``lr_x<FACTOR>`` (``--lr_multipliers``: the first matching pattern wins)
and ``base``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax

from aurora_loop.errors import UsageError

FROZEN, BASE = "frozen", "base"


def param_path(key_path: tuple) -> str:
    """The dotted name of a parameter from its JAX key path."""
    parts = []
    for key in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def _spellings(path: str) -> tuple[str, ...]:
    """``path`` as written here, with PyTorch-style layer indices, and with ``/`` separators."""
    torch_like = re.sub(r"_(\d+)(?=\.|$)", r".\1", path)
    return tuple(dict.fromkeys((path, torch_like, path.replace(".", "/"), torch_like.replace(".", "/"))))


def matches(pattern: str, path: str) -> bool:
    """Whether ``pattern`` matches parameter ``path`` in full, or a whole subtree holding it."""
    whole = re.compile(f"(?:{pattern})(?:[./].*)?")
    return any(whole.fullmatch(s) for s in _spellings(path))


def _factor_label(factor: float) -> str:
    return BASE if factor == 1 else f"lr_x{factor:g}"


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """How ``make_optimizer`` treats each parameter.

    Args:
      freeze: patterns of parameters that never change.
      lr_multipliers: pattern -> factor of the learning rate (first match wins).
      trainable: an extra ``trainable(key_path) -> bool`` (``--lora_only``); others freeze.
    """

    freeze: tuple[str, ...] = ()
    lr_multipliers: Mapping[str, float] = dataclasses.field(default_factory=dict)
    trainable: Callable[[tuple], bool] | None = None

    @property
    def trivial(self) -> bool:
        """No freezing and no multipliers: one group (the optimizer needs no labels)."""
        return not self.freeze and not self.lr_multipliers and self.trainable is None

    @property
    def has_multipliers(self) -> bool:
        return any(f != 1 for f in self.lr_multipliers.values())

    def label(self, key_path: tuple) -> str:
        """``frozen``, ``lr_x<factor>`` or ``base`` for the parameter at ``key_path``."""
        path = param_path(key_path)
        if any(matches(p, path) for p in self.freeze):
            return FROZEN
        if self.trainable is not None and not self.trainable(key_path):
            return FROZEN
        for pattern, factor in self.lr_multipliers.items():
            if matches(pattern, path):
                return _factor_label(factor)
        return BASE

    def is_trainable(self, key_path: tuple) -> bool:
        return self.label(key_path) != FROZEN

    def labels(self, params: Any) -> Any:
        """A tree like ``params`` of group labels."""
        return jax.tree_util.tree_map_with_path(lambda path, _: self.label(path), params)

    def factors(self) -> dict[str, float]:
        """Label -> learning-rate factor of every group that can occur (``base`` included)."""
        out = {BASE: 1.0}
        out.update({_factor_label(f): float(f) for f in self.lr_multipliers.values()})
        return out

    def check(self, params: Any) -> None:
        """Refuse patterns that match no parameter, and a model with nothing left to train."""
        paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        for flag, patterns in (("--freeze", self.freeze), ("--lr_multipliers", tuple(self.lr_multipliers))):
            for pattern in patterns:
                if not any(matches(pattern, path) for path in paths):
                    raise UsageError(f"{flag} pattern {pattern!r} matches no parameter; "
                                     "list the parameter paths with aurora-train --print_param_groups")
        if all(label == FROZEN for label in jax.tree.leaves(self.labels(params))):
            raise UsageError("no parameter is trainable (--freeze matches everything, or --lora_only on a model without "
                             "LoRA weights); freeze less, or use an Aurora model with LoRA (use_lora)")


def group_table(params: Any, groups: ParamGroups) -> list[tuple[str, str, tuple[int, ...], int]]:
    """One row per parameter: (path, group, shape, element count); ``params`` may hold
    ``jax.ShapeDtypeStruct`` leaves."""
    rows = []
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        shape = tuple(getattr(leaf, "shape", ()))
        rows.append((param_path(key_path), groups.label(key_path), shape, math.prod(shape)))
    return rows


def format_group_table(rows: Sequence[tuple[str, str, tuple[int, ...], int]], notes: Mapping[str, str] | None = None) -> str:
    """The table ``--print_param_groups`` prints, with a total per group at the end.

    ``notes``: parameter path -> a note printed in a last ``new`` column (e.g. which
    slices of a pretrained model's parameter are new); the column appears when there are any.
    """
    width = max((len(r[0]) for r in rows), default=10)
    notes = dict(notes or {})
    extra = (lambda path: f"  {notes.get(path, '')}".rstrip()) if notes else (lambda path: "")
    lines = [f"{'parameter':<{width}}  {'group':<10}  {'shape':<22}  {'count':>12}" + ("  new" if notes else "")]
    lines += [f"{path:<{width}}  {group:<10}  {str(shape):<22}  {count:>12,}{extra(path)}" for path, group, shape, count in rows]
    totals: dict[str, list[int]] = {}
    for _, group, _, count in rows:
        totals.setdefault(group, [0, 0])
        totals[group][0] += 1
        totals[group][1] += count
    lines.append("")
    for group, (tensors, count) in sorted(totals.items()):
        lines.append(f"group {group}: {tensors} tensors, {count:,} parameters")
    return "\n".join(lines)


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak``, then cosine decay to ``peak / 10`` at ``total_steps``.

    (The Aurora paper's pre-training schedule shape.) With fewer total steps than warm-up
    steps, the warm-up is shortened to half the run.
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(int(warmup_steps), total_steps // 2)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=peak / 10,
    )


def is_lora_param(path: tuple) -> bool:
    """Whether a parameter's key path names a LoRA weight (Aurora's ``lora_qkv`` /
    ``lora_proj`` modules hold ``lora_A`` / ``lora_B``): the path contains "lora"."""
    return "lora" in jax.tree_util.keystr(path).lower()


def make_optimizer(
    schedule: optax.Schedule | float,
    weight_decay: float = 0.0,
    grad_clip_norm: float | None = None,
    trainable: Callable[[tuple], bool] | None = None,
    groups: ParamGroups | None = None,
) -> optax.GradientTransformation:
    """AdamW on ``schedule``, optionally after clipping gradients to a global norm.

    ``groups`` (:class:`aurora_loop.optim.ParamGroups`; or just ``trainable(key_path)
    -> bool``, e.g. :func:`is_lora_param` for ``--lora_only``): frozen parameters get zero
    updates and keep no Adam state (``optax.multi_transform`` with ``set_to_zero``), and
    clipping sees only the others' gradients; a group with a learning-rate factor runs its
    own AdamW on ``factor x schedule`` (same weight decay, same step count).
    """
    groups = groups if groups is not None else ParamGroups(trainable=trainable)
    clip = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm is not None else []
    if groups.trivial:
        return optax.chain(*clip, optax.adamw(schedule, weight_decay=weight_decay))

    def scaled(factor: float) -> optax.Schedule | float:
        if factor == 1:
            return schedule
        return (lambda count: factor * schedule(count)) if callable(schedule) else factor * schedule

    if groups.has_multipliers:
        by_factor = {label: optax.adamw(scaled(f), weight_decay=weight_decay) for label, f in groups.factors().items()}
        inner = optax.multi_transform(by_factor, groups.labels)
    else:
        inner = optax.adamw(schedule, weight_decay=weight_decay)

    def labels(params: Any) -> Any:
        groups.check(params)
        return jax.tree_util.tree_map_with_path(lambda path, _: "train" if groups.is_trainable(path) else "frozen", params)

    return optax.multi_transform({"train": optax.chain(*clip, inner), "frozen": optax.set_to_zero()}, labels)
