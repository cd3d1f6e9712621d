"""TensorFlow Datasets (TFDS) and other random-access record sources as a weather store.

:class:`RecordStore` wraps any random-access source of records (``len(source)``,
``source[i]`` -> dict of numpy arrays), one record per time step, and offers the same
interface as :class:`~aurora_loop.datasets.store.WeatherStore`, so the ZarrLoader (shuffling,
process share, prefetch, resume) and the samples work on it unchanged.

What works without TensorFlow (checked with tensorflow-datasets 4.9.10 and array_record
0.8.6, TensorFlow not installed): ``tfds.data_source(name, split=..., data_dir=...)`` over
datasets prepared in the ``array_record`` file format, which decodes records with numpy;
and preparing such a dataset (``builder.download_and_prepare()`` with
``file_format="array_record"``) for builders that need no TensorFlow ops themselves.
What needs TensorFlow: ``tfds.load`` / ``as_dataset`` (tf.data pipelines) and datasets
stored as TFRecord (the default file format) — convert them to array_record once with
TensorFlow installed (``tfds build --file_format=array_record``).

Record layout (keys are WB2 names, or mapped with ``variable_map``):

- ``time``: int64 seconds since 1970-01-01 UTC (or a numpy datetime64, or an ISO string);
- surface variables (h, w), atmospheric variables (c, h, w), static variables (h, w)
  (optional: they are read from the first record, else from ``static_path``);
- ``latitude`` (h,), ``longitude`` (w,), ``level`` (c,) hPa, unless given to the constructor.

TFDS writes records in a shuffled order; the store reads every record's time once unless
16 probed records show them evenly spaced in record order (use ``disable_shuffling = True``
in the builder to skip that scan on large datasets; every read checks its record's time).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aurora_loop.datasets.layout import Grid, check_static, check_times, level_values, select_levels
from aurora_loop.datasets.store import ZarrSource, read_static
from aurora_loop.datasets.variables import ATMOS, STATIC, SURF, VariableSelection
from aurora_loop.errors import UsageError
from aurora_loop.model.batch import hours_since_epoch

TFDS_PREFIX = "tfds:"


def record_time(value: Any) -> np.datetime64:
    """A record's ``time`` (seconds since 1970 UTC, datetime64, or ISO text) as datetime64[ns]."""
    value = np.asarray(value).reshape(-1)[0] if np.ndim(value) else value
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode()
    if isinstance(value, (str, np.str_, np.datetime64)):
        return np.datetime64(value, "ns")
    return np.datetime64(int(value), "s").astype("datetime64[ns]")


class RecordStore:
    """One-record-per-time-step source read like a WeatherStore (see the module docstring).

    Args:
      source: random-access records (``tfds.data_source(...)``, a list of dicts, ...).
      selection: which Aurora variables and levels to read.
      lat, lon, levels: the grid (degrees; hPa) in the records' order, if the records do not
        carry ``latitude`` / ``longitude`` / ``level``.
      static_path: a Zarr store with static fields the records lack.
      name: how errors name the source.

    Attributes as WeatherStore: ``times``, ``time_step``, ``hours``, ``lat``, ``lon``, ``grid``,
    ``levels``, ``level_values``, ``members`` (1), ``static``, ``fields``; ``read_into`` fills
    batch slots.
    """

    def __init__(
        self,
        source: Any,
        selection: VariableSelection,
        lat: Sequence[float] | None = None,
        lon: Sequence[float] | None = None,
        levels: Sequence[float] | None = None,
        static_path: str | None = None,
        name: str = "record source",
    ) -> None:
        self.source, self.selection, self.path = source, selection, name
        if len(source) < 2:
            raise UsageError(f"{name} holds {len(source)} record(s); a sample needs at least history + rollout_steps time steps")
        first = source[0]
        lat = first.get("latitude") if lat is None else lat
        lon = first.get("longitude") if lon is None else lon
        if lat is None or lon is None:
            raise UsageError(f"{name} records carry no 'latitude'/'longitude'; add them to the records or pass lat= and lon=")
        self._grid = self.grid = Grid.from_coords(np.asarray(lat), np.asarray(lon), name)
        self.lat, self.lon = self._grid.lat, self._grid.lon
        self.members = 1
        self._index, times = self._time_order()
        self.times, self.time_step = check_times(times, name)
        self.hours = hours_since_epoch(self.times)
        self.fields: dict[str, dict[str, str]] = {
            kind: {n: self._key(first, kind, n) for n in selection.names(kind)} for kind in (SURF, ATMOS)
        }
        self.levels: tuple[int, ...] = ()
        self._level_index: np.ndarray | slice | None = None
        self.level_values = np.zeros(0, np.int64)
        if self.fields[ATMOS]:
            levels = first.get("level") if levels is None else levels
            if levels is None:
                raise UsageError(f"{name} records carry no 'level'; add it to the records or pass levels=")
            self.levels, self._level_index = select_levels(np.asarray(levels), selection.levels, name)
            self.level_values = level_values(np.asarray(levels), self.levels)
        self.static = check_static(self._read_static(first, static_path), name)

    # -- metadata -------------------------------------------------------------------------

    def _time_order(self) -> tuple[np.ndarray, np.ndarray]:
        """Record indices in time order, and the times in that order."""
        n = len(self.source)
        probe = np.unique(np.concatenate([[0, 1], np.linspace(0, n - 1, min(n, 16)).round()]).astype(int))
        probe_times = np.array([record_time(self.source[int(i)]["time"]) for i in probe])
        step = probe_times[1] - probe_times[0]
        if step > np.timedelta64(0) and np.all(probe_times == probe_times[0] + probe * step):
            return np.arange(n), probe_times[0] + np.arange(n) * step  # written in time order: no scan
        times = np.array([record_time(self.source[i]["time"]) for i in range(n)])
        order = np.argsort(times, kind="stable")
        return order, times[order]

    def _key(self, record: Mapping[str, Any], kind: str, name: str) -> str:
        for key in self.selection.candidates(kind, name):
            if key in record:
                want = 3 if kind == ATMOS else 2
                if np.ndim(record[key]) != want:
                    raise UsageError(f"{key!r} ({kind} {name!r}) in {self.path} has {np.ndim(record[key])} dims, expected {want} ({'level, ' if want == 3 else ''}latitude, longitude)")
                return key
        looked = ", ".join(self.selection.candidates(kind, name))
        flag = {SURF: "--surf_vars", ATMOS: "--atmos_vars"}[kind]
        raise UsageError(
            f"{kind} variable {name!r} is not in the records of {self.path} (looked for {looked}; they have: {', '.join(sorted(record))}); "
            f"map a record key to it with variable_map or leave it out of {flag}"
        )

    def _read_static(self, first: Mapping[str, Any], static_path: str | None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        missing = []
        for name in self.selection.names(STATIC):
            key = next((k for k in self.selection.candidates(STATIC, name) if k in first and np.ndim(first[k]) == 2), None)
            if key is None:
                missing.append(name)
            else:
                out[name] = np.ascontiguousarray(self._grid.orient(np.asarray(first[key], dtype=np.float32)))
        if missing:
            sources = [ZarrSource.open(static_path)] if static_path else []
            out.update(read_static(VariableSelection(surf=(), atmos=(), static=tuple(missing), variable_map=self.selection.variable_map), sources, self.lat, self.lon))
        return out

    # -- reads ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.times.size)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.lat.size), int(self.lon.size)

    def read(self, start: int, stop: int, member: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """As WeatherStore.read: surf (t, h, w), atmos (t, c, h, w), float32."""
        h, w = self.shape
        c, t = len(self.levels), stop - start
        surf = {k: np.empty((t, h, w), np.float32) for k in self.fields[SURF]}
        atmos = {k: np.empty((t, c, h, w), np.float32) for k in self.fields[ATMOS]}
        self.read_into(surf, atmos, start, member)
        return surf, atmos

    def read_into(self, surf: dict[str, np.ndarray], atmos: dict[str, np.ndarray], start: int, member: int = 0, step: int = 1) -> None:
        """Write time steps ``start, start + step, ...`` (t of them) into ``surf`` (t, h, w) /
        ``atmos`` (t, c, h, w)."""
        steps = next(iter((*surf.values(), *atmos.values()))).shape[0]
        for t in range(steps):
            i = start + t * int(step)
            record = self.source[int(self._index[i])]
            got = record_time(record["time"])
            if got != self.times[i]:
                raise UsageError(
                    f"record {int(self._index[i])} of {self.path} holds {got}, expected {self.times[i]}: the records are not evenly spaced in time order "
                    "(or the source changed); write them in time order, every step the same"
                )
            for name, out in surf.items():
                out[t] = self._grid.orient(np.asarray(record[self.fields[SURF][name]]))
            for name, out in atmos.items():
                values = np.asarray(record[self.fields[ATMOS][name]])
                out[t] = self._grid.orient(values if self._level_index is None else values[self._level_index])


def open_tfds(spec: str, selection: VariableSelection, data_dir: str | None = None, static_path: str | None = None) -> RecordStore:
    """``"tfds:NAME[:SPLIT]"`` (split default ``train``) -> a RecordStore over ``tfds.data_source``.

    Needs ``pip install tensorflow-datasets array_record`` (not TensorFlow); the dataset
    must be prepared in the array_record format under ``data_dir``.
    """
    name, _, split = spec[len(TFDS_PREFIX):].partition(":")
    if not name:
        raise UsageError(f"--dataset_path {spec!r} names no dataset; write tfds:NAME or tfds:NAME:SPLIT")
    if importlib.util.find_spec("tensorflow_datasets") is None or importlib.util.find_spec("array_record") is None:
        raise UsageError(f"--dataset_path {spec!r} needs TensorFlow Datasets; pip install 'aurora_loop[tfds]' array_record (TensorFlow itself is not needed)")
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split or "train", data_dir=data_dir)
    except Exception as err:  # tfds raises many kinds for unknown / unprepared datasets
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UsageError(f"TFDS dataset {name!r} (split {split or 'train'}) cannot be opened as an array_record data source ({reason}); prepare it with file_format='array_record' under --tfds_data_dir") from err
    return RecordStore(source, selection, static_path=static_path, name=spec)
