"""Callback plugins: load a callback from a spec string or an installed entry point.

A *spec* (what ``aurora-train --callback SPEC`` takes, repeatable) is one of::

    module.path:ClassName                         # constructed without arguments
    module.path:ClassName={"every_n_steps": 5}    # '=' then a JSON object of keyword arguments
    name                                          # an entry point of the group below
    name={"patience": 2}                          # the same, with keyword arguments

The class (or any callable returning a callback) must produce an
``aurora_loop.callbacks.Callback``. Packages publish callbacks under the entry-point group
``aurora_loop.callbacks``, e.g. in their ``setup.cfg``::

    [options.entry_points]
    aurora_loop.callbacks =
        gradient_histograms = my_package.callbacks:GradientHistograms

Every failure (bad syntax, missing module or class, bad JSON, wrong arguments, not a
Callback) raises :class:`aurora_loop.errors.UsageError` with one line naming the spec and
the fix.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import re
from typing import Any

from aurora_loop.callbacks.base import Callback
from aurora_loop.errors import UsageError

ENTRY_POINT_GROUP = "aurora_loop.callbacks"

_DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_FORMS = "module:Class, module:Class={json kwargs}, or an entry-point name"


def entry_point_callbacks() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed callbacks: entry-point name -> entry point (not loaded yet)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _split(spec: str) -> tuple[str, dict[str, Any]]:
    target, sep, raw = spec.strip().partition("=")
    target = target.strip()
    kwargs: dict[str, Any] = {}
    if sep:
        try:
            kwargs = json.loads(raw)
        except ValueError as err:
            raise UsageError(f"--callback {spec!r}: the arguments after '=' are not valid JSON ({err.msg} at column {err.colno}); write e.g. {target}={{\"every_n_steps\": 5}}") from None
        if not isinstance(kwargs, dict):
            raise UsageError(f"--callback {spec!r}: the arguments after '=' must be a JSON object of keyword arguments, e.g. {target}={{\"every_n_steps\": 5}}")
    if not target:
        raise UsageError(f"--callback {spec!r}: no callback named; use {_FORMS}")
    return target, kwargs


def _resolve(target: str, spec: str) -> Any:
    if ":" in target:
        module_name, _, attr = target.partition(":")
        if not _DOTTED.match(module_name) or not _DOTTED.match(attr):
            raise UsageError(f"--callback {spec!r}: {target!r} is not of the form module.path:ClassName")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UsageError(f"--callback {spec!r}: cannot import module {module_name!r} ({err}); check the name and that it is on PYTHONPATH") from None
        obj: Any = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise UsageError(f"--callback {spec!r}: module {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        return obj
    if not _DOTTED.match(target):
        raise UsageError(f"--callback {spec!r}: not a callback spec; use {_FORMS}")
    installed = entry_point_callbacks()
    if target not in installed:
        known = ", ".join(sorted(installed)) or "none installed"
        raise UsageError(f"--callback {spec!r}: no entry point {target!r} in group {ENTRY_POINT_GROUP} ({known}); use module:Class or install the plugin")
    try:
        return installed[target].load()
    except Exception as err:  # noqa: BLE001 - any failure of a third-party import
        raise UsageError(f"--callback {spec!r}: loading entry point {installed[target].value!r} failed ({type(err).__name__}: {err})") from None


def load_callback(spec: str) -> Callback:
    """Build the callback a spec names (see the module docstring for the forms)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"--callback {spec!r}: empty; use {_FORMS}")
    target, kwargs = _split(spec)
    factory = _resolve(target, spec)
    if not callable(factory):
        raise UsageError(f"--callback {spec!r}: {target!r} is not a class or factory")
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as err:
        raise UsageError(f"--callback {spec!r}: bad keyword arguments for {target} ({err})") from None
    except ValueError:
        pass  # no signature available (a builtin): let the call decide
    try:
        callback = factory(**kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--callback {spec!r}: {target} rejected its arguments ({err})") from None
    if not isinstance(callback, Callback):
        raise UsageError(f"--callback {spec!r}: {target} made a {type(callback).__name__}, not an aurora_loop.callbacks.Callback; subclass Callback")
    return callback


def load_callbacks(specs: list[str] | tuple[str, ...]) -> list[Callback]:
    """:func:`load_callback` for each spec, in order."""
    return [load_callback(spec) for spec in specs]
