"""``build_loaders(config)``: a training config -> (train loader, validation loader)."""

from __future__ import annotations

from typing import Any

from aurora_loop.datasets.loader import ZarrLoader
from aurora_loop.datasets.samples import SampleSpec, sample_index, split_starts
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


def sample_specs(config: Any) -> tuple[SampleSpec, SampleSpec | None]:
    """(training spec, validation spec) of a config: ``history`` inputs and ``rollout_steps``
    targets; validation takes ``val_rollout_steps`` targets when set (``None`` when unset:
    validation samples are shaped like training's)."""
    history = int(getattr(config, "history", 2) or 2)
    spec = SampleSpec(history=history, rollout_steps=int(getattr(config, "rollout_steps", 1) or 1))
    if spec.rollout_steps < 1 or spec.history < 1:
        raise UsageError(f"history and rollout_steps must be at least 1, got {spec.history} and {spec.rollout_steps}")
    val_steps = getattr(config, "val_rollout_steps", None)
    if val_steps is None:
        return spec, None
    if int(val_steps) < 1:
        raise UsageError(f"val_rollout_steps must be at least 1 (or none), got {val_steps}")
    return spec, SampleSpec(history=history, rollout_steps=int(val_steps))


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
    ``tfds_data_dir`` (for ``tfds:`` paths).
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
        store = WeatherStore(path, selection, static_path=static_path, cache_mb=float(getattr(config, "cache_mb", 256)))
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
    )
    return (
        ZarrLoader(store, sample_index(train, store.members), spec=spec, shuffle=True, **common),
        ZarrLoader(store, sample_index(val, store.members), spec=val_spec or spec, shuffle=False, **common),
    )
