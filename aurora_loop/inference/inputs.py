"""The model inputs of a forecast, read from a weather store.

For initial times ``store.times[indices]`` (b of them), :func:`read_inputs` gives a Sample:
inputs surf (b, history, h, w), atmos (b, history, c, h, w) float32 in the store's units,
``history`` model steps (``stride`` store steps) apart and ending at the initial time
(c: ``store.levels``, hPa; h, w: the store's grid in Aurora's orientation, latitudes
decreasing, longitudes in [0, 360)), and zero targets that only give the roll-out's shapes
and first valid time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from aurora_loop.datasets.variables import ATMOS, SURF
from aurora_loop.errors import UsageError
from aurora_loop.inference.times import timedelta_hours


def read_inputs(
    store: Any, indices: Sequence[int], steps: int, history: int, member: int = 0, stride: int = 1, skip: Sequence[str] = ()
) -> Any:
    """The model inputs for initial times ``store.times[indices]`` as a Sample.

    ``inputs``: surf (b, history, h, w), atmos (b, history, c, h, w) float32 read from the
    store at times ``index - (history - 1) * stride, .., index`` (``stride`` store steps apart:
    the model step), without the variables in ``skip`` (output-only ones: never inputs);
    ``metadata.time`` = the initial times (hours since 1970). ``targets``: zeros of
    t = ``steps`` (the forecast does not need the truth, so it may run past the store's end)
    with ``metadata.time`` = the first lead's valid time; only their shapes and times are read.
    """
    from aurora_loop.model.batch import Batch, Metadata, Sample

    b = len(indices)
    h, w = store.shape
    c = len(store.levels)
    stride = int(stride)
    surf = {k: np.empty((b, history, h, w), np.float32) for k in store.fields[SURF] if k not in skip}
    atmos = {k: np.empty((b, history, c, h, w), np.float32) for k in store.fields[ATMOS] if k not in skip}
    for slot, index in enumerate(indices):
        first = int(index) - (history - 1) * stride
        views = ({k: v[slot] for k, v in surf.items()}, {k: v[slot] for k, v in atmos.items()})
        if stride == 1:
            store.read_into(*views, first, member)
        else:
            store.read_into(*views, first, member, step=stride)
    for name, value in (*surf.items(), *atmos.items()):
        if np.isnan(value.min()):
            raise UsageError(
                f"the inputs of {name!r} hold NaNs at one of the initial times; choose initial times with complete data"
            )
    init_hours = store.hours[np.asarray(indices)]
    step_hours = timedelta_hours(store.time_step) * stride
    meta = dict(lat=store.lat, lon=store.lon, atmos_levels=store.levels)
    inputs = Batch(surf_vars=surf, static_vars=store.static, atmos_vars=atmos, metadata=Metadata(time=init_hours, **meta))
    absent = getattr(store, "absent", {SURF: [], ATMOS: []})  # predicted variables the store lacks
    targets = Batch(
        surf_vars={k: np.zeros((b, steps, h, w), np.float32) for k in (*store.fields[SURF], *absent[SURF])},
        static_vars=store.static,
        atmos_vars={k: np.zeros((b, steps, c, h, w), np.float32) for k in (*store.fields[ATMOS], *absent[ATMOS])},
        metadata=Metadata(time=init_hours + step_hours, **meta),
    )
    return Sample(inputs=inputs, targets=targets)
