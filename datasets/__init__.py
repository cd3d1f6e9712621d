"""Weather data for aurora_loop: WeatherBench2-layout Zarr stores -> Aurora samples.

- :mod:`.build`: :func:`build_loaders`, a training config -> (train, validation) loaders.
- :mod:`.store`: :class:`WeatherStore`, the Zarr reader (v2/v3, WB2 names, members).
- :mod:`.storage`: local paths, or ``s3://`` / ``gs://`` / ``az://`` / ``https://`` stores through obstore.
- :mod:`.chunk_cache`: a bounded local cache of a remote store's chunks, shared by processes.
- :mod:`.layout`: dim names, grid orientation, time / level / static checks.
- :mod:`.samples`: history + rollout targets per sample, valid starts, time splits, batches.
- :mod:`.loader`: :class:`ZarrLoader`, prefetching, per-process, resumable batches.
- :mod:`.buffers`: batch memory recycled once nothing refers to it.
- :mod:`.variables`: the WB2 <-> Aurora name map and variable selections.
- :mod:`.sample_data`: synthetic learnable stores (``aurora-loop sample-data``).
- :mod:`.convert`: NetCDF / GRIB -> WB2 Zarr (``aurora-loop convert``); :mod:`.writer`.
- :mod:`.tfds_source`: TFDS array_record data sources (and any record source) as a store.
"""

from aurora_loop.datasets.build import build_loaders, selection_from_config
from aurora_loop.datasets.loader import ZarrLoader, process_share
from aurora_loop.datasets.samples import SampleSpec, read_sample, split_starts, valid_starts
from aurora_loop.datasets.store import WeatherStore
from aurora_loop.datasets.variables import AURORA_VARS, DEFAULT_MAP, VariableSelection

__all__ = [
    "AURORA_VARS",
    "DEFAULT_MAP",
    "SampleSpec",
    "VariableSelection",
    "WeatherStore",
    "ZarrLoader",
    "build_loaders",
    "process_share",
    "read_sample",
    "selection_from_config",
    "split_starts",
    "valid_starts",
]
