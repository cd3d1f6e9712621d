"""Samples: ``history`` input steps followed by ``rollout_steps`` targets, and time splits.

A sample starting at time index ``i`` reads the contiguous steps ``i .. i + history +
rollout_steps - 1``: the first ``history`` are the inputs (oldest first), the rest the
targets. A start is valid only when every step it touches lies in the split's time range.
A store with an ensemble dim gives one sample per (member, start).

With a model step of ``stride`` store steps (``SampleSpec.stride``: the model step T over the
store's step dt, e.g. 6 on an hourly store) the steps lie ``stride`` apart instead: inputs at
``i, i + s, .., n = i + (history - 1) s`` (newest ``n``), targets at ``n + s, .., n + (R - 1) s``
and the last at ``n + (R - 1) s + l``, where ``l`` (``SampleSpec.leads``: the sampled lead
times, in store steps) is drawn per example by the loader; without ``leads`` it is ``s``.
Only those time indices are read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math

import numpy as np

from aurora_loop.datasets.buffers import BufferPool
from aurora_loop.datasets.store import WeatherSource
from aurora_loop.datasets.variables import ATMOS, SURF
from aurora_loop.errors import UsageError
from aurora_loop.model.batch import Batch, Metadata, Sample


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """Steps per sample: ``history`` inputs (Aurora uses 2) and ``rollout_steps`` targets.

    ``stride``: store time steps between consecutive inputs and roll-out targets (the model
    step over the store's step; 1 = contiguous). ``leads``: the lead times, in store steps,
    that the last target's offset from the step before it is drawn from per example
    (``()``: always ``stride``; then the batch's ``lead_hours`` is None).
    """

    history: int = 2
    rollout_steps: int = 1
    stride: int = 1
    leads: tuple[int, ...] = ()

    @property
    def steps(self) -> int:
        """Time steps one sample holds (inputs and targets)."""
        return self.history + self.rollout_steps

    @property
    def max_lead(self) -> int:
        """The largest offset, in store steps, of the last target from the step before it."""
        return max(self.leads) if self.leads else self.stride

    @property
    def span(self) -> int:
        """Store time steps one sample covers, first input to the farthest last target."""
        return (self.steps - 2) * self.stride + self.max_lead + 1

    def offsets(self, lead: int | None = None) -> np.ndarray:
        """(steps,) time-index offsets from the start (the oldest input) of every step read,
        with the last target ``lead`` store steps after the step before it (None: ``stride``)."""
        offsets = np.arange(self.steps, dtype=np.int64) * self.stride
        offsets[-1] = offsets[-2] + (self.stride if lead is None else int(lead))
        return offsets


def _as_datetime64(value: str | np.datetime64 | None, name: str) -> np.datetime64 | None:
    if value is None or value == "":
        return None
    try:
        return np.datetime64(value, "ns")
    except ValueError as err:
        raise UsageError(f"{name}={value!r} is not an ISO date/time; write it like 2020-01-31 or 2020-01-31T18:00") from err


def valid_starts(times: np.ndarray, spec: SampleSpec, start: str | np.datetime64 | None = None, end: str | np.datetime64 | None = None, name: str = "split") -> np.ndarray:
    """Start indices whose whole span of times lies within [start, end] (inclusive).

    Args:
      times: (n,) datetime64, evenly spaced.
      spec: steps per sample.
      start, end: ISO strings / datetime64 bounds, None = open.
    Returns:
      (m,) int64 start indices, ascending.
    """
    lo = _as_datetime64(start, f"{name}_start")
    hi = _as_datetime64(end, f"{name}_end")
    n = times.size
    first = np.arange(max(n - spec.span + 1, 0))
    if first.size == 0:
        return first.astype(np.int64)
    last = first + spec.span - 1
    ok = np.ones(first.size, dtype=bool)
    if lo is not None:
        ok &= times[first] >= lo
    if hi is not None:
        ok &= times[last] <= hi
    return first[ok].astype(np.int64)


def split_starts(times: np.ndarray, spec: SampleSpec, batch_size: int, train_range: tuple = (None, None), val_range: tuple = (None, None), val_fraction: float = 0.2, members: int = 1, val_spec: SampleSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation start indices.

    With explicit ranges each split keeps the samples that lie wholly inside its range. With
    no range at all, the last ``val_fraction`` of the times (at least enough for one batch of
    ``batch_size`` samples) is validation and the rest training, so no training sample's
    targets reach a validation input. Each start gives ``members`` samples (ensemble stores).
    ``val_spec``: the validation samples' steps when they differ from ``spec`` (a longer
    roll-out, ``--val_rollout_steps``); ``None``: ``spec``.
    """
    starts_per_batch = math.ceil(batch_size / members)
    # Name the flag that sets the validation roll-out, so a too-short split says what to shrink.
    val_flag = "--rollout_steps" if val_spec is None or val_spec.rollout_steps == spec.rollout_steps else "--val_rollout_steps"
    val_spec = val_spec or spec
    if any(v not in (None, "") for v in (*train_range, *val_range)):
        train = valid_starts(times, spec, *train_range, name="train")
        val = valid_starts(times, val_spec, *val_range, name="val")
    else:
        n = times.size
        n_val = max(math.ceil(val_fraction * n), starts_per_batch + val_spec.span - 1)
        if n - n_val < starts_per_batch + spec.span - 1:
            need = 2 * starts_per_batch + spec.span + val_spec.span - 2
            steps = f"{spec.history} history + {spec.rollout_steps} target steps"
            if val_spec.rollout_steps != spec.rollout_steps:
                steps = f"{steps} (validation: {val_spec.rollout_steps} target steps)"
            raise UsageError(
                f"the store holds {n} times, too few for one training and one validation batch of {batch_size} "
                f"samples of {steps} (need at least {need}); use more times or a smaller --batch_size/--rollout_steps"
                + ("" if val_flag == "--rollout_steps" else f"/{val_flag}")
            )
        train = valid_starts(times[: n - n_val], spec)
        val = valid_starts(times[n - n_val :], val_spec) + (n - n_val)
    for name, starts, span, flag in (("training", train, spec.span, "--rollout_steps"), ("validation", val, val_spec.span, val_flag)):
        if starts.size * members < batch_size:
            raise UsageError(
                f"the {name} time range holds {starts.size * members} valid samples of {span} steps, fewer than one batch of {batch_size}; "
                f"widen --{name[:5] if name == 'training' else 'val'}_start/_end, use more times or a smaller --batch_size/{flag}"
            )
    return train, val


def sample_index(starts: np.ndarray, members: int = 1) -> np.ndarray:
    """(m,) start indices -> (m * members, 2) rows ``(member, start)``, time-major."""
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    grid = np.stack(np.meshgrid(np.arange(members, dtype=np.int64), starts, indexing="xy"), axis=-1)
    return grid.reshape(-1, 2)


class BatchArrays:
    """The numpy arrays of one batch of ``size`` examples, filled slot by slot from a store.

    Each variable has one float32 array of all ``history + rollout_steps`` steps, surf
    (size, steps, h, w) and atmos (size, steps, c, h, w); an example's steps are read into its
    slot with one zarr call per variable (zarr decompresses the span's chunks in parallel and,
    when it can, straight into the slot), so there are no per-example arrays and no
    collation copy; a sampled lead time other than the stride costs a second call for the
    last target. ``inputs`` / ``targets`` are views of the first ``history`` and the last
    ``rollout_steps`` steps. With a :class:`BufferPool` the arrays reuse the memory of
    batches nothing refers to any more.
    """

    def __init__(self, store: WeatherSource, spec: SampleSpec, size: int, pool: BufferPool | None = None) -> None:
        self.store, self.spec = store, spec
        h, w = store.shape
        c = len(store.levels)
        empty = np.empty if pool is None else pool.empty
        self.surf = {k: empty((size, spec.steps, h, w), np.float32) for k in store.fields[SURF]}
        self.atmos = {k: empty((size, spec.steps, c, h, w), np.float32) for k in store.fields[ATMOS]}
        self.starts = np.zeros(size, dtype=np.int64)
        self.leads = np.full(size, spec.stride, dtype=np.int64)  # the last target's offset, store steps
        self.nan_known: dict[int, bool | None] = {}  # per slot, from fill_async: NaN found on the way (None: not checked)

    def fill(self, slot: int, start: int, member: int = 0, lead: int | None = None) -> None:
        """Read the example starting at time index ``start`` (of ``member``) into ``slot``, its
        last target ``lead`` store steps after the step before it (None: the stride)."""
        spec = self.spec
        lead = spec.stride if lead is None else int(lead)
        surf = {k: v[slot] for k, v in self.surf.items()}
        atmos = {k: v[slot] for k, v in self.atmos.items()}
        if lead == spec.stride:
            self._read(surf, atmos, start, member, spec.stride)
        else:  # every step but the last on the stride, then the last one alone
            self._read({k: v[:-1] for k, v in surf.items()}, {k: v[:-1] for k, v in atmos.items()}, start, member, spec.stride)
            last = start + int(spec.offsets(lead)[-1])
            self._read({k: v[-1:] for k, v in surf.items()}, {k: v[-1:] for k, v in atmos.items()}, last, member, 1)
        self.starts[slot] = start
        self.leads[slot] = lead

    async def fill_async(self, rows: list[tuple[int, int, int, int | None]]) -> None:
        """Read examples ``(slot, start, member, lead)`` into their slots, every read in flight
        at once (the store's ``read_into_async``). A time that an earlier row of ``rows``
        also holds (consecutive windows overlap) is read once and copied."""
        spec = self.spec
        first: dict[tuple[int, int], tuple[int, int]] = {}  # (member, time) -> (slot, step) that reads it
        copies: list[tuple[int, int, int, int]] = []
        reads, readers = [], []
        for slot, start, member, lead in rows:
            lead = spec.stride if lead is None else int(lead)
            times = int(start) + spec.offsets(lead)
            own = []
            for k, t in enumerate(times.tolist()):
                if (member, t) in first:
                    copies.append((slot, k, *first[(member, t)]))
                else:
                    first[(member, t)] = (slot, k)
                    own.append(k)
            for run in _runs(own, times, spec.stride):
                k0, k1 = run[0], run[-1] + 1
                reads.append(self._read_async({n: v[slot, k0:k1] for n, v in self.surf.items()},
                                              {n: v[slot, k0:k1] for n, v in self.atmos.items()}, int(times[k0]), member, spec.stride))
                readers.append(slot)
            self.starts[slot] = start
            self.leads[slot] = lead
        found = await asyncio.gather(*reads)
        for slot, k, src_slot, src_k in copies:
            for v in (*self.surf.values(), *self.atmos.values()):
                v[slot, k] = v[src_slot, src_k]
        # Whether each filled slot holds a NaN, where the reads checked on the way (None: unknown).
        for slot, _, _, _ in rows:
            flags = [f for r, f in zip(readers, found) if r == slot]
            copied = any(c[0] == slot for c in copies)
            self.nan_known[slot] = True if True in flags else (False if flags and all(f is False for f in flags) and not copied else None)

    async def _read_async(self, surf: dict[str, np.ndarray], atmos: dict[str, np.ndarray], start: int, member: int, step: int) -> bool | None:
        if not (surf or atmos):
            return False
        count = next(iter((*surf.values(), *atmos.values()))).shape[0]
        return await self.store.read_into_async(surf, atmos, start, member, step=step if count > 1 else 1)

    def _read(self, surf: dict[str, np.ndarray], atmos: dict[str, np.ndarray], start: int, member: int, step: int) -> None:
        if step == 1:
            self.store.read_into(surf, atmos, start, member)
        else:
            self.store.read_into(surf, atmos, start, member, step=step)

    def has_nan(self, slot: int) -> bool:
        """Whether any field of the example in ``slot`` holds a NaN (min propagates NaN: one fast pass)."""
        return any(bool(np.isnan(v[slot].min())) for v in (*self.surf.values(), *self.atmos.values()))

    def sample(self) -> Sample:
        """The batch: inputs' metadata.time = newest input, targets' = first target (hours);
        ``lead_hours`` (b,) float32 the last target's lead in hours when the spec samples lead
        times, else None."""
        spec = self.spec
        h = spec.history
        newest = self.starts + (h - 1) * spec.stride
        first_target = newest + (spec.stride if spec.rollout_steps > 1 else self.leads)
        lead_hours = None
        if spec.leads:
            step_hours = float(self.store.time_step / np.timedelta64(1, "s")) / 3600.0
            lead_hours = (self.leads * step_hours).astype(np.float32)

        def batch(steps: slice, time_index: np.ndarray) -> Batch:
            return Batch(
                surf_vars={k: v[:, steps] for k, v in self.surf.items()},
                static_vars=self.store.static,
                atmos_vars={k: v[:, steps] for k, v in self.atmos.items()},
                metadata=Metadata(lat=self.store.lat, lon=self.store.lon, time=self.store.hours[time_index], atmos_levels=self.store.levels),
            )

        return Sample(inputs=batch(slice(0, h), newest), targets=batch(slice(h, None), first_target), lead_hours=lead_hours)


def _runs(steps: list[int], times: np.ndarray, stride: int) -> list[list[int]]:
    """``steps`` (ascending) split into runs of consecutive steps whose times lie ``stride`` apart."""
    runs: list[list[int]] = []
    for k in steps:
        if runs and runs[-1][-1] == k - 1 and times[k] - times[k - 1] == stride:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def read_sample(store: WeatherSource, start: int, spec: SampleSpec, member: int = 0, lead: int | None = None) -> Sample:
    """One example (b = 1) starting at time index ``start`` (of ensemble ``member``).

    ``inputs``: surf (1, history, h, w), atmos (1, history, c, h, w), metadata.time = the newest
    input's time. ``targets``: t = rollout_steps, metadata.time = the first target's time.
    Static fields (h, w) are shared by both. ``lead``: the last target's offset in store steps
    from the step before it, for a spec with ``leads`` (None: the stride).
    """
    arrays = BatchArrays(store, spec, 1)
    arrays.fill(0, start, member, lead)
    return arrays.sample()
