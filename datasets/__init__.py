"""Weather data for aurora_loop: WeatherBench2-layout Zarr stores -> Aurora samples.

- :mod:`.store`: :class:`WeatherStore`, the reader (Zarr v2/v3, WB2 names, orientation).
- :mod:`.samples`: history + rollout targets per sample, valid starts, time splits.
- :mod:`.loader`: :class:`ZarrLoader`, prefetching, per-process, resumable batches.
- :mod:`.build`: :func:`build_loaders` from a training config.
- :mod:`.sample_data`: synthetic stores (``aurora-loop sample-data``).
- :mod:`.variables`: the WB2 <-> Aurora name map and variable selections.
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
