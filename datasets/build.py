"""``build_loaders(config)``: a training config -> (train loader, validation loader)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from aurora_loop.datasets.loader import ZarrLoader
from aurora_loop.datasets.samples import SampleSpec, sample_index, split_starts
from aurora_loop.datasets.storage import parse_storage_options
from aurora_loop.datasets.store import WeatherStore
from aurora_loop.datasets.tfds_source import TFDS_PREFIX, RecordStore, open_tfds
from aurora_loop.datasets.variables import ATMOS, AURORA_VARS, STATIC, SURF, VariableSelection, parse_name_list
from aurora_loop.errors import UsageError


def selection_from_config(config: Any) -> VariableSelection:
    """The variables and levels a config asks for (Aurora's full sets when a field is absent)."""

    def names(field: str, kind: str) -> tuple[str, ...]:
        value = getattr(config, field, None)
        return AURORA_VARS[kind] if value is None else parse_name_list(value)

    levels = getattr(config, "levels", None) or ()
    if isinstance(levels, str):
        levels = parse_name_list(levels)
    try:
        levels = tuple(int(v) for v in levels)
    except ValueError as err:
        raise UsageError(f"--levels must be whole hPa values like 500,850, got {levels!r}") from err
    return VariableSelection(
        surf=names("surf_vars", SURF),
        static=names("static_vars", STATIC),
        atmos=names("atmos_vars", ATMOS),
        levels=levels,
        variable_map=getattr(config, "variable_map", None) or None,
    )


def _multiple(hours: float, step_hours: float) -> int | None:
    """``hours / step_hours`` when it is a whole number >= 1, else None."""
    ratio = float(hours) / step_hours
    whole = int(round(ratio))
    return whole if whole >= 1 and abs(ratio - whole) <= 1e-6 * max(1.0, ratio) else None


def lead_steps(lead_times: Sequence[float], timestep_hours: float | None, time_step: np.timedelta64) -> tuple[int, tuple[int, ...]]:
    """(model step T, lead times) in store steps, for ``--lead_times`` on a store of ``time_step``.

    T is ``timestep_hours`` when given, else the largest lead time; T and every lead time must
    be positive whole multiples of the store's step (a one-line UsageError naming the fix
    otherwise). Lead times are kept in the order given, duplicates dropped.
    """
    dt = float(time_step / np.timedelta64(1, "s")) / 3600.0
    leads = tuple(dict.fromkeys(float(v) for v in lead_times))
    bad = [v for v in leads if not v > 0]
    if bad:
        raise UsageError(f"lead_times must be positive hours, got {bad[0]:g}; e.g. --lead_times 1,3,6")
    for lead in leads:
        if _multiple(lead, dt) is None:
            raise UsageError(f"--lead_times {lead:g} h is not a multiple of the store's {dt:g} h time step; give lead times in multiples of {dt:g} h "
                             "or use a store with a finer step (e.g. aurora-loop sample-data --step_hours 1)")
    model_step = float(timestep_hours) if timestep_hours else max(leads)
    stride = _multiple(model_step, dt)
    if stride is None:
        source = "--timestep_hours" if timestep_hours else "the largest of --lead_times"
        raise UsageError(f"the model step {model_step:g} h ({source}) is not a multiple of the store's {dt:g} h time step; "
                         f"pass --timestep_hours as a multiple of {dt:g} h")
    return stride, tuple(_multiple(v, dt) or 0 for v in leads)


def sample_specs(config: Any, time_step: np.timedelta64 | None = None) -> tuple[SampleSpec, SampleSpec | None]:
    """(training spec, validation spec) of a config: ``history`` inputs and ``rollout_steps``
    targets; validation takes ``val_rollout_steps`` targets when set (``None`` when unset:
    validation samples are shaped like training's).

    With ``lead_times`` (and the store's ``time_step``) the steps lie the model step T apart
    (:func:`lead_steps`) and training draws the last target's lead from ``lead_times``;
    validation keeps every step T apart (its spec is then never None)."""
    history = int(getattr(config, "history", 2) or 2)
    spec = SampleSpec(history=history, rollout_steps=int(getattr(config, "rollout_steps", 1) or 1))
    if spec.rollout_steps < 1 or spec.history < 1:
        raise UsageError(f"history and rollout_steps must be at least 1, got {spec.history} and {spec.rollout_steps}")
    val_steps = getattr(config, "val_rollout_steps", None)
    if val_steps is not None and int(val_steps) < 1:
        raise UsageError(f"val_rollout_steps must be at least 1 (or none), got {val_steps}")
    lead_times = tuple(getattr(config, "lead_times", ()) or ())
    if lead_times and time_step is not None:
        stride, leads = lead_steps(lead_times, getattr(config, "timestep_hours", None), time_step)
        val = SampleSpec(history=history, rollout_steps=int(val_steps or spec.rollout_steps), stride=stride)
        return SampleSpec(history=history, rollout_steps=spec.rollout_steps, stride=stride, leads=leads), val
    if val_steps is None:
        return spec, None
    return spec, SampleSpec(history=history, rollout_steps=int(val_steps))


def storage_kwargs(config: Any) -> dict[str, Any]:
    """The :class:`WeatherStore` keywords for a remote store that a config sets:
    ``storage_options`` (a dict or JSON text), ``cache_dir`` and ``cache_gb``."""
    return {
        "storage_options": parse_storage_options(getattr(config, "storage_options", None)),
        "cache_dir": getattr(config, "cache_dir", None) or None,
        "cache_gb": float(getattr(config, "cache_gb", 50.0) or 50.0),
    }


def build_loaders(config: Any) -> tuple[ZarrLoader, ZarrLoader]:
    """Open ``config.dataset_path`` and return ``(train_loader, val_loader)``.

    ``dataset_path`` is a WB2-layout Zarr store, or ``tfds:NAME[:SPLIT]`` for a TFDS
    array_record dataset under ``tfds_data_dir`` (see ``tfds_source``).

    Config fields read (with defaults when absent): ``dataset_path``, ``static_path`` (None),
    ``batch_size`` (global), ``num_workers`` (2), ``prefetch`` (2 * num_workers),
    ``rollout_steps`` (1), ``val_rollout_steps`` (None: ``rollout_steps``; the validation
    loader's targets per sample), ``history`` (2), ``seed`` (0), ``surf_vars`` / ``static_vars`` /
    ``atmos_vars`` (Aurora's full sets), ``levels`` (() = all), ``variable_map`` (None),
    ``train_start`` / ``train_end`` / ``val_start`` / ``val_end`` (ISO strings or None: with
    none set, the last ~20% of the times validate), ``nan_policy`` ("error" or "skip"),
    ``cache_mb`` (256: stores whose selected fields fit are read into memory once),
    ``tfds_data_dir`` (for ``tfds:`` paths), ``storage_options`` / ``cache_dir`` / ``cache_gb``
    (for stores in object storage, see :mod:`.storage`), ``lead_times`` (() = none) and ``timestep_hours``
    (None): with lead times, training samples take their steps the model step T apart
    (``timestep_hours``, else the largest lead time; a multiple of the store's step) and draw
    the last target's lead per example from ``lead_times`` (the batch's ``lead_hours``);
    validation samples keep every step T apart (``lead_hours`` None). See
    :mod:`aurora_loop.datasets.samples`.
    The training loader shuffles with (seed, epoch); validation keeps time order.
    """
    path = getattr(config, "dataset_path", None)
    if not path:
        raise UsageError("no dataset_path given; pass --dataset_path STORE.zarr (make one with `aurora-loop sample-data OUT.zarr`)")
    batch_size = int(getattr(config, "batch_size", 1))
    spec, val_spec = sample_specs(config)
    selection, static_path = selection_from_config(config), getattr(config, "static_path", None)
    if str(path).startswith(TFDS_PREFIX):
        store: WeatherStore | RecordStore = open_tfds(str(path), selection, getattr(config, "tfds_data_dir", None), static_path)
    else:
        store = WeatherStore(path, selection, static_path=static_path, cache_mb=float(getattr(config, "cache_mb", 256)), **storage_kwargs(config))
    if getattr(config, "lead_times", None):
        spec, val_spec = sample_specs(config, store.time_step)
    train, val = split_starts(
        store.times,
        spec,
        batch_size,
        train_range=(getattr(config, "train_start", None), getattr(config, "train_end", None)),
        val_range=(getattr(config, "val_start", None), getattr(config, "val_end", None)),
        members=store.members,
        val_spec=val_spec,
    )
    common = dict(
        batch_size=batch_size,
        seed=int(getattr(config, "seed", 0)),
        num_workers=int(getattr(config, "num_workers", 2)),
        prefetch=getattr(config, "prefetch", None),
        nan_policy=getattr(config, "nan_policy", "error") or "error",
        space=int(getattr(config, "space_parallel", 1) or 1),
        devices=getattr(config, "num_gpus", None),
    )
    return (
        ZarrLoader(store, sample_index(train, store.members), spec=spec, shuffle=True, **common),
        ZarrLoader(store, sample_index(val, store.members), spec=val_spec or spec, shuffle=False, **common),
    )
