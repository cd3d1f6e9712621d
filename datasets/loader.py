"""A resumable, prefetching, process-sharded loader of Aurora samples from a weather store.

Implements :class:`aurora_loop.data.Loader`. Batch ``p`` of epoch ``e`` is the global batch
of start indices ``order[p * B : (p + 1) * B]``, where ``order`` is the split's valid starts,
shuffled with ``numpy.random.default_rng((seed, e))`` for training. Process ``r`` of ``P``
reads and yields only its contiguous share ``[r * B / P, (r + 1) * B / P)`` of it. So the
batches depend only on (seed, epoch, position), never on threads or timing, and
``state_dict()`` / ``load_state_dict()`` resume at exactly the next batch.

Sampled lead times (``spec.leads``): the example at position ``k`` of epoch ``e``'s order
gets lead ``spec.leads[j_k]``, where ``j = numpy.random.default_rng((seed, e, LEAD_STREAM))
.integers(len(leads), size=len(order))``: a function of (seed, epoch, position) only, like
the order, so the draws too are the same for any number of processes, threads or resumes.

Reading runs ahead of the consumer in a bounded window of ``prefetch`` batches, yielded in
order. From a Zarr store read from disk or object storage (not cached in memory), each
batch is one coroutine on zarr's event loop that requests every chunk of every example at
once (and the window's other batches are in flight too), so a remote store costs a few round
trips per batch rather than one per chunk; decompression runs on zarr's thread pool (it
releases the GIL). Other sources (an in-memory store, TFDS) are read on ``num_workers``
threads, each loading whole batches. ``num_workers=0`` reads in the caller's thread. Batch
memory is recycled once the consumer (and anything wrapping the arrays) lets go of a batch
(``buffers.BufferPool``), so steady-state loading does not page-fault fresh memory.

A remote store that keeps failing after its retries raises
:class:`~aurora_loop.errors.DataUnavailable` from the iterator before the batch it could not
read; with several processes they agree on it first, so all of them raise at the same batch
(the trainer then saves and stops, as after a preemption).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from aurora_loop.datasets.buffers import BufferPool
from aurora_loop.datasets.samples import BatchArrays, SampleSpec, sample_index
from aurora_loop.datasets.store import WeatherSource
from aurora_loop.datasets.variables import ATMOS, SURF
from aurora_loop.errors import DataUnavailable, UsageError
from aurora_loop.model.batch import Sample
from aurora_loop.parallel.distributed import agree_any

NAN_POLICIES = ("error", "skip")
#: Third entropy word of the lead-time draws' generator (the order's is ``(seed, epoch)``).
LEAD_STREAM = 0x1EAD


def process_share(batch_size: int, process_index: int, process_count: int, space: int = 1, devices: int | None = None) -> slice:
    """The slice of a global batch of ``batch_size`` examples that process ``process_index`` reads.

    With ``space`` > 1 (``--space_parallel``) the ``devices`` of the mesh form groups of
    ``space`` consecutive devices, each group sharing its examples, and processes hold
    consecutive devices: a process reads the examples of the groups its devices belong to
    (the same examples as another process when a group spans both)."""
    if space <= 1 or devices is None:
        if batch_size % process_count:
            raise UsageError(f"--batch_size {batch_size} does not split evenly over {process_count} processes; use a multiple of {process_count}")
        local = batch_size // process_count
        return slice(process_index * local, (process_index + 1) * local)
    per_process, groups = devices // process_count, devices // space
    if batch_size % groups:
        raise UsageError(f"--batch_size {batch_size} does not split evenly over the {groups} groups of --space_parallel {space}; "
                         f"use a multiple of {groups}")
    first, last = process_index * per_process // space, ((process_index + 1) * per_process - 1) // space
    per_group = batch_size // groups
    return slice(first * per_group, (last + 1) * per_group)


@dataclasses.dataclass
class _Loaded:
    batch: Sample
    skipped: int


class ZarrLoader:
    """Batches of :class:`~aurora_loop.model.batch.Sample` (numpy, process-local) from a store.

    Args:
      store: an opened :class:`WeatherStore` (or any ``WeatherSource``, e.g. a TFDS RecordStore).
      starts: this split's samples: (m,) valid start time indices (see
        ``samples.split_starts``), or (m, 2) rows ``(ensemble member, start)``.
      spec: history and rollout steps per sample.
      batch_size: global batch size (all processes together).
      shuffle: reshuffle the starts every epoch (training); False keeps time order (validation).
      seed: shuffling seed.
      num_workers: reader threads for sources read on threads (see the module docstring); 0
        reads synchronously, in the caller's thread.
      prefetch: batches read ahead (the bound of the queue; for a Zarr store, the batches whose
        chunks are in flight at once); default ``2 * num_workers``.
      nan_policy: ``"error"`` raises on a sample holding NaNs; ``"skip"`` replaces it by the
        next clean start in the epoch's order (deterministically) and counts the replaced
        examples in ``skipped``.
      process_index, process_count: this process's place; default ``jax.process_index()`` /
        ``jax.process_count()`` (read when iteration starts).
      space, devices: ``--space_parallel`` and the mesh's device count (None: all devices),
        which decide the examples each process reads (:func:`process_share`).

    Yields per batch a ``Sample`` whose inputs hold surf (b, history, h, w), atmos
    (b, history, c, h, w), static (h, w), metadata.time (b,) hours since 1970 (float64), with
    b = batch_size / process_count; targets likewise with t = rollout_steps. With sampled
    lead times (``spec.leads``) ``lead_hours`` (b,) float32 holds each example's draw.
    """

    def __init__(
        self,
        store: WeatherSource,
        starts: np.ndarray,
        spec: SampleSpec,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 2,
        prefetch: int | None = None,
        nan_policy: str = "error",
        process_index: int | None = None,
        process_count: int | None = None,
        space: int = 1,
        devices: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"--batch_size must be at least 1, got {batch_size}")
        if nan_policy not in NAN_POLICIES:
            raise UsageError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if num_workers < 0:
            raise UsageError(f"--num_workers must be 0 or more, got {num_workers}")
        self.store = store
        starts = np.asarray(starts, dtype=np.int64)
        self.index = sample_index(starts) if starts.ndim == 1 else starts
        self.spec = spec
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.prefetch = max(1, int(prefetch) if prefetch is not None else 2 * self.num_workers)
        self.nan_policy = nan_policy
        self._process = (process_index, process_count)
        self.space, self.devices = int(space), devices  # --space_parallel, and the mesh's devices (None: all)
        self.epoch = 0
        self.position = 0
        self.skipped = 0
        # batches read ahead + the one in use + one being released, for every field
        n_fields = len(store.fields[SURF]) + len(store.fields[ATMOS])
        self._pool = BufferPool(keep=(self.prefetch + 2) * max(n_fields, 1))
        if len(self) == 0:
            raise UsageError(f"{self.index.shape[0]} valid samples cannot fill one batch of {batch_size}; use more times or a smaller --batch_size")

    @property
    def time_step(self) -> np.timedelta64:
        """The model's step (the lead time per roll-out step): the data's time step times the
        spec's stride (the data's step itself unless lead times are sampled)."""
        return self.store.time_step * int(self.spec.stride)

    # -- Loader protocol ------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.index.shape[0]) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batches": len(self), "skipped": self.skipped}
        if self.spec.leads:
            state["lead_hours"] = self._lead_hours()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        batches = state.get("batches")
        if batches is not None and int(batches) != len(self):
            raise UsageError(
                f"the checkpoint's loader had {batches} batches per epoch, this one has {len(self)}; resume with the same data, split, batch size and rollout steps"
            )
        saved = [float(v) for v in state.get("lead_hours", [])]
        if saved != (self._lead_hours() if self.spec.leads else []):
            before = ",".join(f"{v:g}" for v in saved) or "none"
            now = ",".join(f"{v:g}" for v in self._lead_hours()) if self.spec.leads else "none"
            raise UsageError(f"the checkpoint's loader sampled lead times {before} h, this one {now} h; resume with the same --lead_times")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped = int(state.get("skipped", 0))

    def example_batch(self) -> Sample:
        """Batch 0 of epoch 0 (this process's share), read in the caller's thread; the
        position does not move. The trainer learns every batch's shapes from it."""
        return self._load(self._rows(0), 0, self._share()).batch

    def __iter__(self) -> Iterator[Sample]:
        order = self._rows(self.epoch)
        share = self._share()
        if self.num_workers == 0:
            while self.position < len(self):
                yield self._take(self._load(order, self.position, share))
            return
        pool = None if self.reads_async else cf.ThreadPoolExecutor(self.num_workers, thread_name_prefix="aurora-data")
        pending: collections.deque[cf.Future[_Loaded]] = collections.deque()
        ahead = self.position
        try:
            while self.position < len(self):
                while ahead < len(self) and len(pending) < self.prefetch:
                    if pool is None:
                        pending.append(asyncio.run_coroutine_threadsafe(self._load_async(order, ahead, share), _zarr_loop()))
                    else:
                        pending.append(pool.submit(self._load, order, ahead, share))
                    ahead += 1
                yield self._take(self._agreed(pending.popleft()))
        finally:
            for future in pending:
                future.cancel()
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    @property
    def reads_async(self) -> bool:
        """Whether batches are read as coroutines on zarr's event loop (a Zarr store not cached
        in memory), rather than on threads."""
        return callable(getattr(self.store, "read_into_async", None)) and not getattr(self.store, "cached", False)

    def _agreed(self, future: cf.Future[_Loaded]) -> _Loaded:
        """The batch of ``future``, or :class:`DataUnavailable` on every process when any
        process could not read its share (remote stores agree on it before each batch)."""
        failure: DataUnavailable | None = None
        loaded = None
        try:
            loaded = future.result()
        except DataUnavailable as err:
            failure = err
        if getattr(self.store, "remote", False) and jax.process_count() > 1:
            (anyone,) = agree_any(failure is not None)
            if anyone and failure is None:
                failure = DataUnavailable(f"another process could not read its share of batch {self.position} of {self.store.path!r}")
        if failure is not None:
            raise failure
        assert loaded is not None
        return loaded

    # -- internals ------------------------------------------------------------------------

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's sequence of (member, start) rows (a permutation of ``index`` when shuffling)."""
        if not self.shuffle:
            return self.index
        return np.random.default_rng((self.seed, int(epoch))).permutation(self.index)

    def leads(self, epoch: int) -> np.ndarray | None:
        """The epoch's lead per position of its order, in store steps (None: not sampled).

        A function of (seed, epoch) only, so every process, thread count and resumed run
        draws the same lead for the same example of the same epoch."""
        if not self.spec.leads:
            return None
        choices = np.asarray(self.spec.leads, dtype=np.int64)
        draws = np.random.default_rng((self.seed, int(epoch), LEAD_STREAM)).integers(len(choices), size=self.index.shape[0])
        return choices[draws]

    def _rows(self, epoch: int) -> np.ndarray:
        """The epoch's order, with each row's lead (store steps) as a third column when lead
        times are sampled: rows ``(member, start[, lead])``."""
        order, leads = self.order(epoch), self.leads(epoch)
        return order if leads is None else np.column_stack([order, leads])

    def _lead_hours(self) -> list[float]:
        step = float(self.store.time_step / np.timedelta64(1, "s")) / 3600.0
        return [round(int(lead) * step, 9) for lead in self.spec.leads]

    def _share(self) -> slice:
        index, count = self._process
        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
        return process_share(self.batch_size, index, count, self.space, self.devices or jax.device_count())

    def _take(self, loaded: _Loaded) -> Sample:
        self.position += 1
        self.skipped += loaded.skipped
        return loaded.batch

    def _load(self, order: np.ndarray, position: int, share: slice) -> _Loaded:
        """Read this process's share of global batch ``position`` of ``order`` (rows
        ``(member, start[, lead])``, see :meth:`_rows`)."""
        if self.reads_async:
            return _zarr_sync(self._load_async(order, position, share))
        base = position * self.batch_size
        arrays = BatchArrays(self.store, self.spec, share.stop - share.start, self._pool)
        skipped = sum(self._fill_clean(arrays, slot, order, base + k) for slot, k in enumerate(range(share.start, share.stop)))
        return _Loaded(arrays.sample(), skipped)

    async def _load_async(self, order: np.ndarray, position: int, share: slice) -> _Loaded:
        """:meth:`_load` as one coroutine: every example's reads in flight at once."""
        base = position * self.batch_size
        arrays = BatchArrays(self.store, self.spec, share.stop - share.start, self._pool)
        rows = [(slot, *_row(order[base + k])) for slot, k in enumerate(range(share.start, share.stop))]
        await arrays.fill_async(rows)
        # One NaN check per example and field, spread over the thread pool (a pass over 0.8 GB
        # per 0.25 degree sample: on one thread it would cost as much as decoding).
        # Slots whose chunks were checked as they were decoded need no second pass.
        fields = [*arrays.surf.values(), *arrays.atmos.values()]
        checks = [(slot, v[slot]) for slot in range(len(rows)) if arrays.nan_known.get(slot) is None for v in fields]
        found = await asyncio.gather(*(asyncio.to_thread(_holds_nan, values) for _, values in checks))
        bad = sorted({slot for (slot, _), nan in zip(checks, found) if nan} | {s for s, known in arrays.nan_known.items() if known})
        skipped = 0
        for slot in bad:  # rare: replace (or refuse) the examples holding NaNs, one at a time
            k = base + share.start + slot
            n = order.shape[0]
            for misses in range(n):
                if misses == 0:
                    if self.nan_policy == "error":
                        self._refuse_nan(*_row(order[k % n])[:2])
                    continue
                start, member, lead = _row(order[(k + misses) % n])
                await arrays.fill_async([(slot, start, member, lead)])
                known = arrays.nan_known.get(slot)
                clean = known is False or (known is None and not await asyncio.to_thread(arrays.has_nan, slot))
                if clean:
                    skipped += 1
                    break
            else:
                raise UsageError(f"every sample of {self.store.path!r} holds NaNs; fill the missing values")
        return _Loaded(arrays.sample(), skipped)

    def _refuse_nan(self, start: int, member: int) -> None:
        which = f" (member {member})" if self.store.members > 1 else ""
        raise UsageError(
            f"NaN in the sample starting {self.store.times[start]}{which} of {self.store.path!r}; fill the missing values, or set nan_policy='skip' to skip such samples"
        )

    def _fill_clean(self, arrays: BatchArrays, slot: int, order: np.ndarray, k: int) -> int:
        """Fill ``slot`` with example ``k`` of ``order`` or, skipping NaNs, the next clean one
        (with its own lead); returns 1 if it had to skip, else 0."""
        n = order.shape[0]
        for misses in range(n):
            row = order[(k + misses) % n]
            member, start = int(row[0]), int(row[1])
            arrays.fill(slot, start, member, int(row[2]) if row.shape[0] > 2 else None)
            if not arrays.has_nan(slot):
                return int(misses > 0)
            if self.nan_policy == "error":
                self._refuse_nan(start, member)
        raise UsageError(f"every sample of {self.store.path!r} holds NaNs; fill the missing values")


def _holds_nan(values: np.ndarray) -> bool:
    return bool(np.isnan(values.min()))  # min propagates NaN: one fast pass


def _row(row: np.ndarray) -> tuple[int, int, int | None]:
    """An order row ``(member, start[, lead])`` -> ``(start, member, lead or None)``."""
    return int(row[1]), int(row[0]), int(row[2]) if row.shape[0] > 2 else None


def _zarr_loop() -> asyncio.AbstractEventLoop:
    """zarr's event loop (its own thread), where the stores' clients live."""
    from zarr.core.sync import _get_loop

    return _get_loop()


def _zarr_sync(coroutine: Any) -> Any:
    from zarr.core.sync import sync

    return sync(coroutine)
