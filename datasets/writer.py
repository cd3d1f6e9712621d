"""Writing WeatherBench2-layout stores with xarray's ``Dataset.to_zarr``, all or nothing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

import xarray as xr

from aurora_loop.errors import UsageError


def chunk_encoding(ds: xr.Dataset, chunks: Mapping[str, int] | None = None) -> dict[str, dict]:
    """Per-variable zarr chunk encoding: ``chunks`` maps dim -> chunk length (default: one time
    step per chunk, every other dim whole, as WeatherBench2 stores are chunked)."""
    chunks = {"time": 1, **(chunks or {})}
    return {
        name: {"chunks": tuple(min(int(chunks.get(d, n)), n) for d, n in zip(var.dims, var.shape))}
        for name, var in ds.data_vars.items()
    }


def write_store(ds: xr.Dataset, path: str | os.PathLike, zarr_format: int = 2, chunks: Mapping[str, int] | None = None, overwrite: bool = False) -> str:
    """Write ``ds`` to ``path`` with ``Dataset.to_zarr`` and return the path.

    Zarr format 2 gets consolidated metadata (as WB2 publishes); format 3 does not (the spec
    has none). The store is written beside ``path`` and renamed into place at the end, so a
    failure leaves nothing at ``path``. An existing ``path`` is refused unless ``overwrite``.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise UsageError(f"{path!r} already exists; choose a new output path or remove it first")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"the folder of {path!r} does not exist; create {parent!r} first")
    partial = f"{path}.partial-{os.getpid()}"
    try:
        ds.to_zarr(partial, mode="w", zarr_format=zarr_format, consolidated=zarr_format == 2, encoding=chunk_encoding(ds, chunks))
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            shutil.rmtree(partial, ignore_errors=True)
    return path
