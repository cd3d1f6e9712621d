"""Reader for WeatherBench2-layout Zarr stores (Zarr format 2 or 3, any chunking).

Layout read: data variables with dims ``(time, latitude, longitude)`` (surface),
``(time, level, latitude, longitude)`` (atmospheric, ``level`` in hPa) and ``(latitude,
longitude)`` (static; a static variable with a ``time`` dim is read at its first time), in
any order, optionally with an ensemble dim (``number``, ``member``, ``realization``) whose
members become separate samples. Coordinates: ``time`` (datetime64, evenly spaced),
``latitude`` (degrees north, ascending as WB2 writes it, or descending), ``longitude``
(degrees east, any range, e.g. [-180, 180)), ``level`` (hPa); the other names in
:mod:`.layout` (``lat``, ``lon``, ``pressure_level``, ``isobaricInhPa``, ...) work too.

Everything leaves the reader in Aurora's orientation (:class:`.layout.Grid`), float32.
Metadata (time, coordinates, encodings) is decoded once with xarray; the field reads go
straight to zarr, which decompresses into the caller's batch arrays where it can, so many
threads read at once without xarray's per-call overhead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import xarray as xr
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import NDBuffer as _NDBuffer
from zarr.core.indexing import BasicIndexer
from zarr.storage import LocalStore

from aurora_loop.datasets.layout import (
    CANONICAL,
    LEVEL_DIMS,
    MEMBER_DIMS,
    OPTIONAL,
    REQUIRED,
    Grid,
    check_static,
    check_times,
    find_dim,
    level_values,
    role,
    select_levels,
)
from aurora_loop.datasets.storage import check_remote_root, is_remote, open_store, storage_error
from aurora_loop.datasets.variables import ATMOS, STATIC, SURF, V1P5_OUTPUT_ONLY, VariableSelection
from aurora_loop.errors import DataUnavailable, UsageError
from aurora_loop.model.batch import hours_since_epoch


def open_zarr_dataset(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None) -> xr.Dataset:
    """Open ``path`` (a local path or a URL, see :mod:`.storage`) lazily with xarray (no
    dask), or raise a one-line :class:`UsageError`."""
    return open_zarr(path, storage_options, cache_dir)[0]


def open_zarr(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
              cache_gb: float = 50.0) -> tuple[xr.Dataset, Any]:
    """``(dataset, store)``: ``path`` opened lazily with xarray, and what zarr opens it from
    (the local path, or the remote store object). One-line :class:`UsageError` for a missing
    path or bucket, a denied request or something that is not a Zarr store."""
    path = os.fspath(path)
    remote = is_remote(path)
    if not remote and not os.path.exists(path):
        raise UsageError(f"data store {path!r} does not exist; pass the path of a WeatherBench2-layout Zarr store (make one with `aurora-loop sample-data OUT.zarr`)")
    store = open_store(path, storage_options, cache_dir, cache_gb)
    if remote:
        check_remote_root(store, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return xr.open_zarr(store, chunks=None, consolidated=None, decode_timedelta=False), store
    except Exception as err:  # zarr/xarray raise many types for "not a store"
        mapped = storage_error(err, path) if remote else None
        if isinstance(mapped, UsageError) and "does not exist" not in str(mapped):
            raise mapped from None
        if isinstance(mapped, DataUnavailable):
            raise UsageError(f"{path!r} could not be read ({str(mapped)}); check the URL and the network, then retry") from None
        if isinstance(mapped, UsageError):
            raise UsageError(f"no Zarr store at {path!r}; check the path (it must name the store's root, where .zgroup or zarr.json lies)") from None
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"{path!r} is not a readable Zarr store ({first}); convert NetCDF/GRIB with `aurora-loop convert SRC... OUT.zarr`") from err


@dataclasses.dataclass
class _Field:
    """One selected variable: where it lives, its dims and how to decode it."""

    kind: str
    aurora_name: str
    store_name: str
    array: Any  # zarr.Array
    roles: tuple[str, ...]  # role of each store dim: time / level / member / lat / lon
    grid: Grid
    scale: float | None
    offset: float | None
    fill: float | None
    cache: np.ndarray | None = None  # (members or 1, time, [c,] h, w) decoded, oriented, levels picked

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """Raw store values -> float32 physical values (NaN where missing)."""
        out = raw.astype(np.float32, copy=False)
        if self.fill is not None and not np.isnan(self.fill):
            out = np.where(raw == self.fill, np.float32(np.nan), out)
        if self.scale is not None:
            out = out * np.float32(self.scale)
        if self.offset is not None:
            out = out + np.float32(self.offset)
        return out

    def read(self, time: slice | int, levels: np.ndarray | slice | None = None, member: int = 0) -> np.ndarray:
        """Decoded float32 values in Aurora orientation, dims (time, [level,] lat, lon).

        ``time`` an int drops the time dim; ``levels`` are store level indices in the order
        wanted (an array, or a slice for an ascending run; None = all, in store order);
        ``member`` indexes an ensemble dim, if any.
        """
        level_sel, selection = self._selection(time, levels, member)
        if any(isinstance(v, np.ndarray) for v in selection):
            raw = self.array.get_orthogonal_selection(selection)
        else:
            raw = self.array[selection]
        return self._finish(raw, selection, levels, level_sel)

    async def read_async(self, time: slice | int, levels: np.ndarray | slice | None = None, member: int = 0) -> np.ndarray:
        """:meth:`read` as a coroutine on zarr's event loop (decoding in its thread pool)."""
        level_sel, selection = self._selection(time, levels, member)
        array = self.array._async_array
        if any(isinstance(v, np.ndarray) for v in selection):
            raw = await array.get_orthogonal_selection(selection)
        else:
            raw = await array.getitem(selection)
        return await asyncio.to_thread(self._finish, raw, selection, levels, level_sel)

    def _selection(self, time: slice | int, levels: np.ndarray | slice | None, member: int) -> tuple[Any, tuple[Any, ...]]:
        """(the level selection, the store-order selection) of a read."""
        if levels is None or isinstance(levels, slice):
            level_sel: Any = slice(None) if levels is None else levels
        else:
            level_sel = np.sort(levels)  # zarr wants them ascending
        pick = {"time": time, "level": level_sel, "member": member, "lat": slice(None), "lon": slice(None)}
        return level_sel, tuple(pick[r] for r in self.roles)

    def _finish(self, raw: Any, selection: tuple[Any, ...], levels: np.ndarray | slice | None, level_sel: Any) -> np.ndarray:
        """Raw store values of ``selection`` -> decoded float32 in Aurora's dim order and orientation."""
        kept = [r for r, v in zip(self.roles, selection) if not isinstance(v, (int, np.integer))]
        order = [kept.index(r) for r in CANONICAL if r in kept]
        raw = np.transpose(np.asarray(raw), order)
        if isinstance(levels, np.ndarray) and not np.array_equal(levels, level_sel):
            axis = [r for r in CANONICAL if r in kept].index("level")
            raw = np.take(raw, np.searchsorted(level_sel, levels), axis=axis)
        return self.grid.orient(self.decode(raw))  # may be a view (flipped latitudes)

    def reads_directly(self, levels: np.ndarray | slice | None) -> bool:
        """Whether zarr can decompress straight into a float32 output for this selection."""
        return (
            not isinstance(levels, np.ndarray)
            and self.grid.lon_order is None
            and self.array.dtype == np.float32
            and self.scale is None
            and self.offset is None
            and (self.fill is None or np.isnan(self.fill))
            and [r for r in self.roles if r != "member"] == [r for r in CANONICAL if r in self.roles]
        )

    def read_into(self, out: np.ndarray, time: slice, levels: np.ndarray | slice | None = None, member: int = 0) -> None:
        """Write the values :meth:`read` returns into ``out`` (float32, (t, [c,] h, w)).

        A cached field is copied from memory. For float32 stores in WB2 dim order zarr
        decompresses into ``out`` itself; ascending
        latitudes cost nothing, as zarr writes into a latitude-reversed view of ``out``.
        Anything else (other dtypes, packing, reordered longitudes or levels) is read,
        decoded and copied once.
        """
        if self.cache is not None:
            out[...] = self.cache[member if "member" in self.roles else 0, time]
            return
        if not self.reads_directly(levels):
            out[...] = self.read(time, levels, member)
            return
        selection, target = self._direct(out, time, levels, member)
        self.array.get_basic_selection(selection, out=_out_buffer(target))

    async def read_into_async(self, out: np.ndarray, time: slice, levels: np.ndarray | slice | None = None, member: int = 0) -> bool | None:
        """:meth:`read_into` as a coroutine on zarr's event loop: every chunk request of the
        reads that are awaited together is in flight at once (what a remote store needs).
        Returns whether ``out`` holds a NaN when the read checked it on the way (chunks
        decoded here), else None (the caller checks)."""
        if self.cache is not None:
            self.read_into(out, time, levels, member)
            return None
        if not self.reads_directly(levels):
            values = await self.read_async(time, levels, member)
            await asyncio.to_thread(np.copyto, out, values)
            return None
        codec = self._whole_chunks_codec(levels)
        if codec is not None and out.flags.c_contiguous:
            times = range(*time.indices(self.array.shape[0]))
            found = await asyncio.gather(*(self._decode_chunk(codec, t, out[i]) for i, t in enumerate(times)))
            return any(found)
        selection, target = self._direct(out, time, levels, member)
        array = self.array._async_array
        indexer = BasicIndexer(selection, array.shape, array.metadata.chunk_grid)
        await array._get_selection(indexer, prototype=default_buffer_prototype(), out=_out_buffer(target))
        return None

    def _whole_chunks_codec(self, levels: np.ndarray | slice | None) -> Any:
        """The compressor when every chunk is one time of the whole field and can be decoded
        by itself straight into the batch (zarr v2, one numcodecs compressor, no filters,
        float32 in WB2 dim order, all levels, no members): then a read fetches the chunk's
        bytes and decodes them into ``out``, as plain reads of the chunk files do, without
        zarr's intermediate array and copy. None otherwise (zarr reads it)."""
        meta = self.array.metadata
        if levels is not None or "member" in self.roles or getattr(meta, "zarr_format", 3) != 2 or meta.filters or meta.compressor is None:
            return None
        if meta.chunks[0] != 1 or tuple(meta.chunks[1:]) != tuple(self.array.shape[1:]) or meta.order != "C":
            return None
        return meta.compressor

    async def _decode_chunk(self, codec: Any, t: int, out: np.ndarray) -> bool:
        """Fetch time ``t``'s chunk, decode it into ``out`` ((c,) h, w float32) in zarr's thread
        pool and check it for NaNs while it is fresh; a missing chunk is the fill value.
        Returns whether it holds a NaN. From local disk the file is read in the same thread
        task (read, decode, check: as plain reads do, without queueing compressed bytes)."""
        meta = self.array.metadata
        key = str(t) + f"{meta.dimension_separator}0" * (len(meta.chunks) - 1)
        store_path = self.array._async_array.store_path / key
        flip = self.grid.flip_lat
        if isinstance(store_path.store, LocalStore):
            file = os.path.join(os.fspath(store_path.store.root), *store_path.path.split("/"))
            return await asyncio.to_thread(_read_decode_into, codec, file, out, flip, meta.fill_value)
        buffer = await store_path.get(prototype=default_buffer_prototype())
        if buffer is None:
            out[...] = np.nan if meta.fill_value is None else meta.fill_value
            return bool(np.isnan(out.flat[0]))
        return await asyncio.to_thread(_decode_into, codec, buffer.as_numpy_array(), out, flip)

    def _direct(self, out: np.ndarray, time: slice, levels: np.ndarray | slice | None, member: int) -> tuple[tuple[Any, ...], np.ndarray]:
        """(store selection, the view of ``out`` zarr decodes into) of a direct read."""
        pick = {"time": time, "level": slice(None) if levels is None else levels, "member": member}
        selection = tuple(pick.get(r, slice(None)) for r in self.roles)
        return selection, (out[..., ::-1, :] if self.grid.flip_lat else out)


_scratch = threading.local()


def _decode_into(codec: Any, data: Any, out: np.ndarray, flip_lat: bool) -> bool:
    """Decode one chunk's bytes into ``out`` (C-contiguous float32), latitudes reversed if
    asked; returns whether it holds a NaN (min propagates NaN: one pass)."""
    if not flip_lat:
        codec.decode(data, out=out)
        return bool(np.isnan(out.min()))
    scratch = getattr(_scratch, "array", None)
    if scratch is None or scratch.size < out.size:
        scratch = _scratch.array = np.empty(out.size, np.float32)
    view = scratch[: out.size].reshape(out.shape)
    codec.decode(data, out=view)
    np.copyto(out, view[..., ::-1, :])
    return bool(np.isnan(view.min()))  # the scratch copy is the one still in cache


def _read_decode_into(codec: Any, file: str, out: np.ndarray, flip_lat: bool, fill: Any) -> bool:
    """:func:`_decode_into` of a local chunk file (its fill value when the file is missing)."""
    try:
        with open(file, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        out[...] = np.nan if fill is None else fill
        return bool(np.isnan(out.flat[0]))
    return _decode_into(codec, data, out, flip_lat)


def _out_buffer(array: np.ndarray) -> Any:
    """``out=`` for zarr's selection methods: an NDBuffer over ``array``."""
    return _NDBuffer.from_numpy_array(array)


def _encoding_number(enc: dict[str, Any], key: str) -> float | None:
    value = enc.get(key)
    try:
        return None if value is None else float(np.asarray(value).reshape(-1)[0])
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass
class ZarrSource:
    """One opened store: its xarray view (metadata), zarr group (reads) and grid."""

    path: str
    ds: xr.Dataset
    group: Any
    grid: Grid

    @classmethod
    def open(cls, path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
             cache_gb: float = 50.0) -> ZarrSource:
        path = os.fspath(path)
        ds, store = open_zarr(path, storage_options, cache_dir, cache_gb)
        grid = Grid.of(ds, path)
        return cls(path, ds, zarr.open_group(store, mode="r"), grid)

    def find(self, selection: VariableSelection, kind: str, name: str) -> _Field | None:
        """The store variable that serves Aurora ``name`` of ``kind``, or None if there is none.

        Raises when a WB2 (or mapped) name is present with dims unfit for ``kind``.
        """
        for candidate in selection.candidates(kind, name):
            if candidate not in self.ds.data_vars:
                continue
            var = self.ds[candidate]
            dims = tuple(map(str, var.dims))
            roles = tuple(role(d) for d in dims)
            present = set(roles)
            fits = None not in roles and len(present) == len(roles) and REQUIRED[kind] <= present <= REQUIRED[kind] | OPTIONAL[kind]
            if not fits:
                if candidate == name and kind != ATMOS:
                    continue  # e.g. Aurora's static "z" sharing a name with the atmospheric z
                want = {SURF: "(time, latitude, longitude)", ATMOS: "(time, level, latitude, longitude)", STATIC: "(latitude, longitude)"}[kind]
                raise UsageError(
                    f"variable {candidate!r} ({kind} {name!r}) in {self.path!r} has dims {dims}, expected {want}; "
                    "rewrite it in the WeatherBench2 layout (aurora-loop convert does)"
                )
            if not (np.issubdtype(var.dtype, np.floating) or "scale_factor" in var.encoding):
                raise UsageError(f"variable {candidate!r} in {self.path!r} has dtype {var.dtype}; store float32 or float64 (or packed ints with scale_factor)")
            enc = var.encoding
            return _Field(
                kind=kind,
                aurora_name=name,
                store_name=candidate,
                array=self.group[candidate],
                roles=roles,
                grid=self.grid,
                scale=_encoding_number(enc, "scale_factor"),
                offset=_encoding_number(enc, "add_offset"),
                fill=_encoding_number(enc, "_FillValue"),
            )
        return None


class WeatherSource(Protocol):
    """What samples and loaders read: a WeatherStore, or a RecordStore (TFDS).

    ``times`` (n,) datetime64[ns] evenly spaced ``time_step`` apart, ``hours`` (n,) float64,
    ``lat`` (h,) decreasing, ``lon`` (w,) in [0, 360), ``levels`` (hPa), ``members``,
    ``static`` {name: (h, w)}, ``fields`` {kind: {aurora name: ...}}, ``path`` (for messages).
    Optional, for writing the source's own coordinates back (the forecast writer falls back
    to ``lat``/``lon``/``levels`` without them): ``grid`` (:class:`.layout.Grid`, whose
    ``lat_values``/``lon_values`` are the source's coordinate values) and ``level_values``
    (the source's level values of ``levels``, its dtype).
    """

    path: str
    times: np.ndarray
    time_step: np.timedelta64
    hours: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    levels: tuple[int, ...]
    members: int
    static: dict[str, np.ndarray]
    fields: dict[str, dict[str, Any]]

    @property
    def shape(self) -> tuple[int, int]: ...

    def read_into(self, surf: dict[str, np.ndarray], atmos: dict[str, np.ndarray], start: int, member: int = 0, step: int = 1) -> None: ...


class WeatherStore:
    """A WeatherBench2-layout Zarr store opened for reading Aurora fields.

    Args:
      path: the Zarr store (directory) with time-varying fields (and maybe static ones).
      selection: which Aurora variables and levels to read.
      static_path: another store to take static fields from (tried first; the main store is
        the fallback). Its grid must match the main store's after orientation.
      cache_mb: when the selected fields of all times fit in this many MiB (float32), they
        are read into memory once, at open (``cached``); 0 never caches.
      storage_options: for a URL (``s3://``, ``gs://``, ``az://``, ``https://``): obstore
        settings over the defaults (see :mod:`.storage`); the static store uses them too.
      cache_dir: keep a remote store's chunks in this local directory (:mod:`.chunk_cache`),
      cache_gb: at most this many GB for all stores in ``cache_dir``.
      optional: surface or atmospheric Aurora names the store may lack (a forecast's
        output-only variables: predicted, never read); the missing ones are in ``absent``.

    Attributes:
      times: (n,) datetime64[ns], evenly spaced.
      time_step: the spacing, numpy timedelta64.
      hours: (n,) float64 hours since 1970-01-01 UTC.
      lat: (h,) float32 decreasing; lon: (w,) float32 increasing in [0, 360).
      grid: the store's :class:`.layout.Grid`; ``grid.lat_values`` / ``grid.lon_values`` are
        the store's own coordinate values (its dtype) in the order of ``lat`` / ``lon``.
      levels: tuple of hPa levels of atmospheric fields, in the model's order.
      level_values: (c,) the store's own level coordinate values of ``levels`` (its dtype).
      members: ensemble members (size of a ``number``/``member`` dim; 1 without one).
      static: dict Aurora name -> (h, w) float32 array (read once, here).
      absent: {kind: [Aurora names]} of the ``optional`` variables the store lacks.
    """

    def __init__(self, path: str | os.PathLike, selection: VariableSelection, static_path: str | os.PathLike | None = None, cache_mb: float = 256,
                 storage_options: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None, cache_gb: float = 50.0,
                 optional: Sequence[str] = ()) -> None:
        self.path = os.fspath(path)
        self.selection = selection
        self.remote = is_remote(self.path)
        self._open_options = (storage_options, cache_dir, cache_gb)
        self._source = ZarrSource.open(self.path, *self._open_options)
        ds = self._source.ds
        self.grid = self._source.grid
        self.lat, self.lon = self.grid.lat, self.grid.lon
        self._read_times(ds)
        self.fields: dict[str, dict[str, _Field]] = {SURF: {}, ATMOS: {}}
        self.absent: dict[str, list[str]] = {SURF: [], ATMOS: []}
        for kind in (SURF, ATMOS):
            for name in selection.names(kind):
                if name in optional and self._source.find(selection, kind, name) is None:
                    self.absent[kind].append(name)
                    continue
                self.fields[kind][name] = self._require(self._source, kind, name)
        member_dim = find_dim(ds, MEMBER_DIMS)
        self.members = int(ds.sizes[member_dim]) if member_dim in ds.dims else 1
        self._read_levels(ds)
        self.static = self._read_static(static_path)
        self.cached = self._cache_if_small(cache_mb)

    # -- metadata -------------------------------------------------------------------------

    def _read_times(self, ds: xr.Dataset) -> None:
        if "time" not in ds.coords:
            raise UsageError(f"{self.path!r} has no 'time' coordinate; write dims (time, [level,] latitude, longitude) as WeatherBench2 does")
        self.times, self.time_step = check_times(np.asarray(ds["time"].values), self.path)
        self.hours = hours_since_epoch(self.times)

    def _read_levels(self, ds: xr.Dataset) -> None:
        self.levels: tuple[int, ...] = ()
        self._level_index = None
        self.level_values = np.zeros(0, np.int64)
        if self.fields[ATMOS]:
            level_dim = find_dim(ds, LEVEL_DIMS)
            store_levels = np.asarray(ds[level_dim].values)
            self.levels, self._level_index = select_levels(store_levels, self.selection.levels, self.path)
            self.level_values = level_values(store_levels, self.levels)

    def _require(self, source: ZarrSource, kind: str, name: str) -> _Field:
        field = source.find(self.selection, kind, name)
        if field is None:
            looked = ", ".join(self.selection.candidates(kind, name))
            have = ", ".join(sorted(map(str, source.ds.data_vars))) or "none"
            flag = {SURF: "--surf_vars", STATIC: "--static_vars", ATMOS: "--atmos_vars"}[kind]
            role = " (an output-only variable: the model predicts it, so the store must hold it as a target)" if kind == SURF and name in V1P5_OUTPUT_ONLY else ""
            raise UsageError(
                f"{kind} variable {name!r}{role} is not in {source.path!r} (looked for {looked}; the store has: {have}); "
                f"map a store variable to it with variable_map or leave it out of {flag}"
            )
        return field

    def _read_static(self, static_path: str | os.PathLike | None) -> dict[str, np.ndarray]:
        sources = [self._source] if static_path is None else [ZarrSource.open(static_path, *self._open_options), self._source]
        return check_static(read_static(self.selection, sources, self.lat, self.lon), self.path)

    def _cache_if_small(self, cache_mb: float) -> bool:
        """Read every selected field into memory once when they fit in ``cache_mb`` MiB.

        Small stores (the synthetic sample, the ERA5 sample) then cost a memory copy per
        sample instead of one zarr call per variable (milliseconds each).
        """
        fields = [*self.fields[SURF].values(), *self.fields[ATMOS].values()]
        h, w = self.shape
        per_step = sum(h * w * (len(self.levels) if f.kind == ATMOS else 1) * (self.members if "member" in f.roles else 1) for f in fields)
        if not fields or per_step * len(self.times) * 4 > cache_mb * 2**20:
            return False
        everything = slice(0, len(self.times))
        for f in fields:
            levels = self._level_index if f.kind == ATMOS else None
            members = range(self.members) if "member" in f.roles else range(1)
            f.cache = np.stack([np.ascontiguousarray(f.read(everything, levels, m)) for m in members])
        return True

    # -- reads ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.times.size)

    @property
    def shape(self) -> tuple[int, int]:
        """(h, w) of the grid."""
        return int(self.lat.size), int(self.lon.size)

    def read(self, start: int, stop: int, member: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Fields at time indices ``start:stop`` (of ensemble ``member``) in Aurora orientation.

        Returns ``(surf, atmos)``, float32: ``surf[name]`` (t, h, w), ``atmos[name]``
        (t, c, h, w), t = stop - start, c = len(levels). The arrays may be strided views
        (a latitude flip costs no copy here; collating the batch makes the one copy).
        """
        span = slice(start, stop)
        surf = {name: f.read(span, member=member) for name, f in self.fields[SURF].items()}
        atmos = {name: f.read(span, self._level_index, member) for name, f in self.fields[ATMOS].items()}
        return surf, atmos

    def read_into(self, surf: dict[str, np.ndarray], atmos: dict[str, np.ndarray], start: int, member: int = 0, step: int = 1) -> None:
        """Like :meth:`read`, writing into given float32 arrays: ``surf[name]`` (t, h, w) and
        ``atmos[name]`` (t, c, h, w) receive times ``start, start + step, ..., start + (t - 1) * step``
        (``step`` 1: ``start : start + t``). Only those times are read."""
        for name, out in surf.items():
            self.fields[SURF][name].read_into(out, _times(start, out.shape[0], step), member=member)
        for name, out in atmos.items():
            self.fields[ATMOS][name].read_into(out, _times(start, out.shape[0], step), self._level_index, member)


    async def read_into_async(self, surf: dict[str, np.ndarray], atmos: dict[str, np.ndarray], start: int, member: int = 0, step: int = 1) -> bool | None:
        """:meth:`read_into` as a coroutine on zarr's event loop: every field's chunks are
        requested at once. Returns whether the fields hold a NaN when every read checked
        on the way (True as soon as one found one), else None. A storage error becomes a one-line :class:`UsageError` (missing,
        denied) or :class:`~aurora_loop.errors.DataUnavailable` (kept failing after retries)."""
        reads = [self.fields[SURF][name].read_into_async(out, _times(start, out.shape[0], step), member=member) for name, out in surf.items()]
        reads += [self.fields[ATMOS][name].read_into_async(out, _times(start, out.shape[0], step), self._level_index, member) for name, out in atmos.items()]
        try:
            found = await asyncio.gather(*reads)
        except Exception as err:
            mapped = storage_error(err, self.path) if self.remote else None
            if mapped is None:
                raise
            raise mapped from err
        if any(f is True for f in found):
            return True
        return False if all(f is False for f in found) else None


def _times(start: int, count: int, step: int = 1) -> slice:
    """The slice of ``count`` time indices ``step`` apart from ``start``."""
    step = int(step)
    if step < 1:
        raise ValueError(f"time step must be at least 1, got {step}")
    return slice(int(start), int(start) + (int(count) - 1) * step + 1, step)


def read_static(selection: VariableSelection, sources: Sequence[ZarrSource], lat: np.ndarray, lon: np.ndarray) -> dict[str, np.ndarray]:
    """The selected static fields, (h, w) float32 in Aurora orientation, each from the first
    of ``sources`` that has it; every source must be on the (``lat``, ``lon``) grid."""
    names = selection.names(STATIC)
    if not names:
        return {}
    for source in sources:
        g = source.grid
        if g.lat.shape != lat.shape or g.lon.shape != lon.shape or not (np.allclose(g.lat, lat, atol=1e-3) and np.allclose(g.lon, lon, atol=1e-3)):
            raise UsageError(f"the static store {source.path!r} is on a {g.lat.size}x{g.lon.size} grid unlike the data's {lat.size}x{lon.size} grid; regrid it to the same latitudes/longitudes")
    out: dict[str, np.ndarray] = {}
    for name in names:
        field = next((f for f in (s.find(selection, STATIC, name) for s in sources) if f is not None), None)
        if field is None:
            where = " or ".join(repr(s.path) for s in sources) or "no static store"
            looked = ", ".join(selection.candidates(STATIC, name))
            raise UsageError(
                f"static variable {name!r} is in neither {where} (looked for {looked}); "
                "pass a store that has it with --static_path, map one with variable_map, or leave it out of --static_vars"
            )
        out[name] = np.ascontiguousarray(field.read(time=0))
    return out
