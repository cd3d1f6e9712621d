"""``--help`` in one style for ``aurora-train`` and every ``aurora-loop`` sub-command.

Short metavars (``N``, ``X``, ``PATH``, ``A,B,...``) so that a flag and its help share a line,
on/off switches written ``--x, --no-x``, and each flag's default stated once, at the end of
its help: ``(default: 8)``. A help text that already names its default is left as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

# Fields whose values have a shape of their own; other metavars follow the type.
_METAVARS = {
    "max_time": "[DD:]HH:MM:SS",
    "profile_steps": "START:N",
    "coordinator_address": "HOST:PORT",
    "monitor": "TAG",
    "model_kwargs": "JSON",
    "storage_options": "JSON",
    "variable_map": "OLD=NEW,...",
    "loss_surf_weights": "VAR=W,...",
    "loss_atmos_weights": "VAR=W,...",
    "lr_multipliers": "PATTERN=X,...",
    "freeze": "PATTERN,...",
    "model": "NAME",
    "wandb_project": "NAME",
    "precision": "NAME",
    "nan_policy": "error|skip",
    "remat_policy": "inputs|dots",
    "new_weights_init": "zero|default",
    "eval_weights": "ema|raw",
    "rollout_mode": "MODE",
    "mode": "min|max",
    "val_table": "compact|full|none",
    "train_start": "TIME",
    "train_end": "TIME",
    "val_start": "TIME",
    "val_end": "TIME",
}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter with the flag column wide enough for ``--flag METAVAR`` and a
    default appended once (see the module docstring)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 34, width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, width)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or not action.option_strings or default is argparse.SUPPRESS or default is None:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction)) or default == []:
            return text  # a plain flag: giving it is the point
        return f"{text} (default: {shown_default(default).replace('%', '%%')})"

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return {int: "N", float: "X"}.get(action.type, action.dest.upper())  # type: ignore[arg-type]

    def _format_usage(self, usage: str | None, actions: Any, groups: Any, prefix: str | None) -> str:
        if usage is None:  # what must be given, then the rest in one bracket (the groups list them)
            parts = ["%(prog)s"]
            for action in actions:
                if action.option_strings and action.required:
                    parts.append(f"{action.option_strings[0]} {action.metavar or self._get_default_metavar_for_optional(action)}")
            if any(a.option_strings and not a.required for a in actions):
                parts.append("[--FLAG ...]")
            parts += [str(a.metavar or a.dest) for a in actions if not a.option_strings]
            usage = " ".join(parts)
        return super()._format_usage(usage, actions, groups, prefix)


def shown_default(value: Any) -> str:
    """A default as a flag would spell it: ``none``, ``on``/``off``, ``a,b`` or ``empty``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if value else "empty"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) if value else "empty"
    return str(value)


class Switch(argparse.Action):
    """An on/off flag, ``--name`` and ``--no-name`` (argparse's BooleanOptionalAction appends a
    default of its own to the help on some Python versions; this one leaves that to the
    formatter)."""

    def __init__(self, option_strings: list[str], dest: str, default: Any = None, help: str | None = None, **_: Any) -> None:
        names = []
        for option in option_strings:
            names += [option, f"--no-{option[2:]}"]
        super().__init__(names, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def field_metavar(field: dataclasses.Field, base: Any) -> str:
    """The metavar of a TrainingConfig field's flag, from its name and type."""
    if field.name in _METAVARS:
        return _METAVARS[field.name]
    if field.name.endswith(("_path", "_dir")) or field.name in ("stats", "compile_cache", "checkpoint_encoder",
                                                                 "checkpoint_backbone", "checkpoint_decoder"):
        return "PATH"
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        return {int: "N,...", float: "X,..."}.get(item, "A,...")
    if typing.get_origin(base) is dict:
        return "K=V,..."
    if base is int:
        return "N"
    if base is float:
        return "X"
    return "TEXT"
