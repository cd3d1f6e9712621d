"""The Trainer: a plain-Python, event-driven loop around one jitted, sharded train step.

    fetch batch -> place on mesh -> dispatch step t -> hooks of step t-1 -> maybe sync
    (hooks of step t, validate, checkpoint) -> maybe stop

JAX dispatches asynchronously, so the host runs ahead of the device as long as nothing
reads a result. Step t's hooks run only after step t+1 was dispatched, and its metrics are
fetched only if a callback reads them, so logging never leaves the device idle. A step is a
*sync* step when a callback needs the exact state after it (checkpoint, validation, stop):
there the hooks run before the next dispatch.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from aurora_loop.accumulation import micro_batch_shardings, stack_micro_batches
from aurora_loop.callbacks.base import Callback, CheckpointIO
from aurora_loop.compile_cache import cache_counts, came_from_cache
from aurora_loop.data import REPEAT_BATCH, Loader, example_batch
from aurora_loop.errors import DataUnavailable, UsageError
from aurora_loop.parallel import batch_shardings, check_batch_divisible, global_batch_size, make_mesh, place_batch, space_size
from aurora_loop.parallel.distributed import agree_any
from aurora_loop.step import (
    PRECISION_COMPUTE_DTYPES,
    StepOptions,
    TrainState,
    make_eval_step,
    make_init_fn,
    make_train_step,
    state_shardings,
)
from aurora_loop.task import Task
from aurora_loop.timing import CompileRecord, PhaseClock

log = logging.getLogger(__name__)


def _until_unavailable(batches: Iterable[Any], on_unavailable: Callable[[DataUnavailable], None]) -> Iterator[Any]:
    """``batches``, ending early (after calling ``on_unavailable``) when the loader raises
    :class:`DataUnavailable`, which loaders raise at the same batch on every process."""
    try:
        yield from batches
    except DataUnavailable as err:
        on_unavailable(err)


class LazyMetrics(Mapping):
    """A step's metrics, still on the device until someone reads a value.

    The first read fetches all of them at once (``jax.device_get``) and caches the floats.
    """

    def __init__(self, device_metrics: Mapping[str, jax.Array]) -> None:
        self._device = device_metrics
        self._host: dict[str, float] | None = None

    def prefetch(self) -> None:
        """Start the device-to-host copy now so a later read does not wait for it."""
        for value in self._device.values():
            value.copy_to_host_async()

    @property
    def fetched(self) -> bool:
        return self._host is not None

    def _values(self) -> dict[str, float]:
        if self._host is None:
            self._host = {k: float(v) for k, v in jax.device_get(dict(self._device)).items()}
        return self._host

    def __getitem__(self, key: str) -> float:
        return self._values()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._device)

    def __len__(self) -> int:
        return len(self._device)


class _ListLoader:
    """Adapts a re-iterable of global batches (e.g. a list) to the Loader protocol."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches
        self.epoch = self.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def example_batch(self) -> Any:
        return next(iter(self.batches))

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.batches):
            if i < self.position:
                continue
            self.position = i + 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class _OneShotLoader:
    """Adapts a one-shot iterable (a generator, an iterator) to the Loader protocol.

    It can be read once: the first epoch yields every batch, later epochs none. The first
    batch is peeked at for the shapes (``example_batch``) and still yielded.
    """

    def __init__(self, iterator: Iterator[Any]) -> None:
        self.iterator = iterator
        self.epoch = self.position = 0
        self._peeked: list[Any] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def example_batch(self) -> Any:
        if not self._peeked:
            self._peeked.append(next(self.iterator))
        return self._peeked[0]

    def __iter__(self) -> Iterator[Any]:
        while self._peeked:
            self.position += 1
            yield self._peeked.pop()
        for batch in self.iterator:
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        # A resumed run skips the batches the saved run had consumed.
        for _ in range(int(state["position"]) - self.position):
            self.example_batch()
            self._peeked.pop()
            self.position += 1


class _MicroBatches:
    """A Loader yielding lists of ``n`` consecutive batches of ``loader``: the micro-batches
    of one optimizer step (gradient accumulation).

    Its position is the inner loader's (it counts micro-batches); a group is consumed whole,
    so a checkpoint never falls inside one. The last ``len(loader) % n`` batches of an epoch
    are dropped: an update from fewer micro-batches would weigh them differently.
    """

    def __init__(self, loader: Loader, n: int) -> None:
        self.loader = loader
        self.n = n

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader) // self.n  # type: ignore[arg-type]

    def example_batch(self) -> Any:
        return example_batch(self.loader)

    def __iter__(self) -> Iterator[list[Any]]:
        group: list[Any] = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == self.n:
                yield group
                group = []

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loader.load_state_dict(state)


def _bind_mesh(task: Task, mesh: Mesh, fsdp: bool) -> None:
    """Hand the mesh (and whether the parameters are split over it) to a task that splits
    examples over its ``space`` axis (``bind_mesh``); a mesh with such an axis needs one."""
    if callable(getattr(task, "bind_mesh", None)):
        task.bind_mesh(mesh, fsdp=fsdp)
    elif space_size(mesh) > 1:
        raise UsageError(f"task {getattr(task, 'name', type(task).__name__)} cannot split an example over devices; "
                         "drop --space_parallel (use data parallelism, --fsdp) or choose an Aurora model")


def _global_shape(local_shape: tuple[int, ...], sharding: Any, mesh: Mesh) -> tuple[int, ...]:
    """The global shape of a leaf of one process's batch: leaves split over the devices are
    every process's shares together (:func:`~aurora_loop.parallel.global_batch_size`)."""
    if local_shape and any(axis is not None for axis in sharding.spec):
        return (global_batch_size(mesh, local_shape[0]), *local_shape[1:])
    return tuple(local_shape)


def _as_loader(data: Any) -> Loader | None:
    if data is None or isinstance(data, Loader):
        return data
    if iter(data) is data:  # an iterator: it can be read only once
        return _OneShotLoader(data)
    return _ListLoader(data)


class Trainer:
    """Runs a Task's training loop and emits hooks to callbacks.

    Args:
      callbacks: hook receivers, called in list order.
      optimizer: an optax transformation (default: ``optax.adamw(1e-3)``).
      log_learning_rate: the optimizer's schedule (or a constant), for reporting only: loggers
        read it through ``learning_rate(step)``; the optimizer itself is what trains.
      max_epochs: passes over the training data.
      max_steps: stop after this many optimizer steps in total (``None``: epochs decide).
      val_every_n_steps: validate every N steps; ``None``: at the end of each epoch. Either
        way the run ends with a validation of the parameters it hands over (unless a signal
        or a non-finite step stopped it).
      mesh: the device mesh with a ``data`` axis; or ``num_devices`` to build one
        (``None``: all visible devices).
      seed: seeds parameter initialisation and the per-step RNG.
      fsdp: shard parameters and optimizer state over the ``data`` axis (``state_shardings``).
      trainable: ``trainable(key_path) -> bool`` names the parameters the optimizer updates
        (e.g. :func:`aurora_loop.optim.is_lora_param`, or ``ParamGroups.is_trainable``);
        ``grad_norm`` (and so the NaN guard) covers only those, and XLA can drop the frozen
        ones' gradients. ``None``: all.
      accumulate_grad_batches: micro-batches per optimizer step (gradient accumulation).
        ``max_steps``, ``val_every_n_steps``, the schedule and every hook count optimizer
        steps; the loader's position counts micro-batches.
      ema_decay: keep an exponential moving average of the weights on the devices
        (``TrainState.ema_params``, sharded like the parameters, checkpointed with them).
      eval_weights: ``"ema"`` (validate with the average when there is one) or ``"raw"``.
      precision: ``"fp32"``, ``"bf16-mixed"`` (the model's own bfloat16 compute; the task
        decides) or ``"bf16-params"`` (the step also casts the weights to bfloat16 for the
        forward and backward pass; the optimizer updates float32 masters).
      learning_rate: the earlier name of ``log_learning_rate`` (deprecated).
    """

    def __init__(
        self,
        callbacks: Sequence[Callback] = (),
        optimizer: optax.GradientTransformation | None = None,
        log_learning_rate: optax.Schedule | float | None = None,
        max_epochs: int = 1,
        max_steps: int | None = None,
        val_every_n_steps: int | None = None,
        mesh: Mesh | None = None,
        num_devices: int | None = None,
        seed: int = 0,
        fsdp: bool = False,
        trainable: Callable[[tuple], bool] | None = None,
        accumulate_grad_batches: int = 1,
        ema_decay: float | None = None,
        eval_weights: str = "ema",
        precision: str = "fp32",
        learning_rate: optax.Schedule | float | None = None,
    ) -> None:
        if learning_rate is not None:  # the earlier name of log_learning_rate
            warnings.warn("Trainer(learning_rate=) is now log_learning_rate= (it is only reported; the optimizer trains)",
                          DeprecationWarning, stacklevel=2)
            log_learning_rate = learning_rate if log_learning_rate is None else log_learning_rate
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be at least 1, got {accumulate_grad_batches}")
        if eval_weights not in ("ema", "raw"):
            raise ValueError(f"eval_weights must be 'ema' or 'raw', got {eval_weights!r}")
        if precision not in PRECISION_COMPUTE_DTYPES:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_COMPUTE_DTYPES)}, got {precision!r}")
        keys = [cb.state_key for cb in callbacks]
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        if duplicated:
            raise ValueError(f"callbacks share the state_key {duplicated[0]!r}; give each instance its own state_key")
        checkpoint_io = [cb for cb in callbacks if isinstance(cb, CheckpointIO)]
        if len(checkpoint_io) > 1:
            names = ", ".join(type(cb).__name__ for cb in checkpoint_io)
            raise ValueError(f"two callbacks hold the CheckpointIO role ({names}): keep one, the one that resumes the run")
        self.callbacks = list(callbacks)
        self.checkpoint_io: CheckpointIO | None = checkpoint_io[0] if checkpoint_io else None
        self.optimizer = optimizer if optimizer is not None else optax.adamw(1e-3)
        self._learning_rate = log_learning_rate
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.val_every_n_steps = val_every_n_steps
        self.mesh = mesh
        self.num_devices = num_devices
        self.seed = seed
        self.fsdp = fsdp
        self.trainable = trainable
        self.accumulate_grad_batches = accumulate_grad_batches
        self.ema_decay = ema_decay
        self.eval_weights = eval_weights
        self.precision = precision

        self.state: TrainState | None = None
        self.state_shardings: TrainState | None = None
        # The compiled ``train_step(state, batch) -> (state, metrics)`` of the current fit, as
        # the callbacks' ``wrap_train_step`` returned it.
        self.train_step: Callable[[TrainState, Any], tuple[TrainState, Any]] | None = None
        self.task: Task | None = None
        self.train_data: Loader | None = None
        self.val_data: Loader | None = None
        self.global_step = 0
        self.epoch = 0
        self.epoch_step = 0  # steps taken in the current epoch
        self.stop_reason: str | None = None
        self._clear_stop_requests()
        self.data_error: str | None = None  # why the data stopped the last fit (DataUnavailable), if it did
        self.last_val_metrics: dict[str, float] = {}
        self.last_validated_step: int | None = None
        self.resumed_from: int | None = None
        self._sharding_cache: dict[Any, Any] = {}
        self._lr_table: np.ndarray | None = None
        # Where the time of the current (or last) fit went, by phase; and the compilations
        # it waited for (the first train step, the first eval step).
        self.clock = PhaseClock()
        self.compiles: list[CompileRecord] = []

    # --- helpers for callbacks -------------------------------------------------------------
    @property
    def is_main_process(self) -> bool:
        """True on process 0, which writes logs and checkpoints' metadata."""
        return jax.process_index() == 0

    @property
    def eval_params(self) -> Any:
        """The parameters validation and forecast maps use: the moving average when the run
        keeps one and ``eval_weights == "ema"``, else the trained ones."""
        if self.state is None:
            return None
        if self.state.ema_params is not None and self.eval_weights == "ema":
            return self.state.ema_params
        return self.state.params

    @property
    def compute_dtype(self) -> Any:
        """The dtype the steps cast the weights to (``None``: as stored)."""
        return PRECISION_COMPUTE_DTYPES[self.precision]

    @property
    def stopping(self) -> bool:
        """The run stops at this step boundary: ``should_stop`` as agreed by every process.

        Callbacks that take collective actions (saving, validating) branch on this, never on
        ``should_stop``, which a signal may have set on one process only.
        """
        return self._stop_agreed

    @property
    def stop_skips_validation(self) -> bool:
        """The agreed stop asked to end without the final validation (a signal: save promptly,
        the open epoch is finished by the resumed run; a broken state: nothing worth scoring)."""
        return self._skip_validation_agreed

    @property
    def stop_checkpoint(self) -> bool | None:
        """What the agreed stop asks of checkpointing: ``True`` save the state now whatever the
        schedule (a signal), ``False`` save nothing more (the state is broken; this wins),
        ``None`` as scheduled."""
        if self._no_save_agreed:
            return False
        return True if self._save_agreed else None

    def request_stop(self, reason: str | None = None, *, validate: bool = True, checkpoint: bool | None = None) -> None:
        """Ask the loop to stop at the next step boundary. Safe from a signal handler and on any
        one process: every process stops at the same step.

        Args:
          reason: a few words for messages, e.g. ``"SIGTERM"`` or ``"the non-finite step 7"``.
          validate: ``False`` ends without the final validation and leaves the epoch open.
          checkpoint: ``True`` asks the checkpoint callback to save the state now, ``False``
            to save nothing more (see :attr:`stop_checkpoint`); ``None``: as scheduled.
        """
        if reason is not None and self.stop_reason is None:
            self.stop_reason = reason
        if not validate:
            self._skip_validation_requested = True
        if checkpoint is True:
            self._save_requested = True
        elif checkpoint is False:
            self._no_save_requested = True
        self.should_stop = True

    def _clear_stop_requests(self) -> None:
        """No stop asked for. Requests (``should_stop`` and :meth:`request_stop`'s) are set by
        callbacks and signal handlers at any time and on any one process; the loop acts on
        their agreed values."""
        self.should_stop = False
        self._skip_validation_requested = self._save_requested = self._no_save_requested = False
        self._stop_agreed = self._skip_validation_agreed = self._save_agreed = self._no_save_agreed = False
        self.stop_reason = None

    def _agree(self, *flags: bool) -> tuple[bool, ...]:
        """Agree on the stop requests (and ``flags``) over all processes.

        A request that a signal handler raises while the processes exchange their flags is
        kept (never overwritten) and joins the next agreement.
        """
        requests = (self._skip_validation_requested, self._save_requested, self._no_save_requested)
        stop, skip_validation, save, no_save, *rest = agree_any(self.should_stop, *requests, *flags)
        if stop:
            self.should_stop = self._stop_agreed = True
        self._skip_validation_agreed |= skip_validation
        self._save_agreed |= save
        self._no_save_agreed |= no_save
        return tuple(rest)

    def learning_rate(self, step: int) -> float | None:
        """The learning rate the optimizer used at ``step`` (1-based), if known."""
        lr = self._learning_rate
        if lr is None:
            return None
        if not callable(lr):
            return float(lr)
        if self._lr_table is not None and 0 < step <= len(self._lr_table):
            return float(self._lr_table[step - 1])
        return float(lr(step - 1))

    def _tabulate_learning_rate(self) -> None:
        """Evaluate the schedule for every step once, before the loop.

        Evaluating an optax schedule is a device computation: done per step inside the loop,
        reading it would wait for the queued train step and leave the device idle.
        """
        lr, total = self._learning_rate, self.total_steps
        self._lr_table = None
        if not callable(lr) or total is None:
            return
        try:
            self._lr_table = np.asarray(jax.device_get(jax.jit(jax.vmap(lr))(jnp.arange(total))), np.float64)
        except Exception:  # noqa: BLE001 - a schedule that cannot be vmapped is evaluated per step
            log.debug("learning-rate schedule not tabulated", exc_info=True)

    @property
    def steps_per_epoch(self) -> int | None:
        try:
            return len(self.train_data)  # type: ignore[arg-type]
        except TypeError:
            return None

    @property
    def total_steps(self) -> int | None:
        """The step the run will end at (``max_steps`` or epochs x steps per epoch)."""
        per_epoch = self.steps_per_epoch
        by_epochs = None if per_epoch is None else per_epoch * self.max_epochs
        if self.max_steps is None:
            return by_epochs
        return self.max_steps if by_epochs is None else min(self.max_steps, by_epochs)

    def meta_state(self) -> dict[str, Any]:
        """The host-side part of the trainer state saved with every checkpoint."""
        return {
            "step": self.global_step,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "last_validated_step": self.last_validated_step,
            "train_loader": self.train_data.state_dict() if self.train_data is not None else None,
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks},
        }

    def load_meta_state(self, meta: Mapping[str, Any]) -> None:
        self.global_step = int(meta["step"])
        self.epoch = int(meta["epoch"])
        self.last_validated_step = meta.get("last_validated_step")
        if self.train_data is not None and meta.get("train_loader") is not None:
            self.train_data.load_state_dict(meta["train_loader"])
        if meta.get("epoch_step") is not None:
            self.epoch_step = int(meta["epoch_step"])
        elif hasattr(self.train_data, "steps_into_epoch"):  # a checkpoint from before epoch_step was saved
            self.epoch_step = int(self.train_data.steps_into_epoch)
        elif meta.get("train_loader") is not None:
            self.epoch_step = int(meta["train_loader"].get("position", 0))
        saved = meta.get("callbacks", {})
        for cb in self.callbacks:
            if cb.state_key in saved:
                cb.load_state_dict(saved[cb.state_key])

    # --- the loop -----------------------------------------------------------------------
    def fit(self, task: Task, train_data: Any, val_data: Any = None, resume: bool = True) -> TrainState:
        """Train ``task`` on ``train_data``; returns the final TrainState.

        ``train_data`` / ``val_data``: Loaders (see ``aurora_loop.data``), re-iterables of
        batches, or (read once) iterators. With ``resume``, the callback holding the
        :class:`~aurora_loop.callbacks.base.CheckpointIO` role (ModelCheckpoint) restores the
        newest checkpoint: parameters, optimizer, step, data position and every callback's
        state.
        """
        self.task = task
        self.train_data = _as_loader(train_data)
        if callable(getattr(task, "train_loader", None)):
            self.train_data = task.train_loader(self.train_data)
        if self.accumulate_grad_batches > 1:
            self.train_data = _MicroBatches(self.train_data, self.accumulate_grad_batches)
        self.val_data = _as_loader(val_data)
        self._clear_stop_requests()
        self.data_error = None
        self.last_validated_step = None
        self.clock.start()
        self.compiles = []
        if self.mesh is None:
            self.mesh = make_mesh(self.num_devices)
        _bind_mesh(task, self.mesh, self.fsdp)
        try:
            with self.clock.phase("start-up"):
                self._setup(resume)
            self._emit("on_fit_start")
            self._run()
            self._emit("on_fit_end")
        except BaseException as exc:
            for cb in self.callbacks:
                try:
                    cb.on_exception(self, exc)
                except Exception:  # noqa: BLE001 - the original error matters more
                    log.exception("%s.on_exception failed", type(cb).__name__)
            raise
        return self.state

    def example_val_batch(self) -> Any:
        """This process's share of one validation batch (host arrays, the first of the validation
        data), without moving the validation loader's position; ``None`` without validation data
        or when it is empty. For callbacks that draw or score an example (e.g. forecast maps):
        :meth:`place` puts it on the mesh."""
        if self.val_data is None:
            return None
        try:
            return example_batch(self.val_data)
        except StopIteration:
            return None

    @property
    def train_step_compile(self) -> CompileRecord | None:
        """The compilation of this fit's train step (``None`` before its first step)."""
        return next((c for c in self.compiles if c.what == "train step"), None)

    def timed_compile(self, what: str, step: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` for the first time in this fit: the call compiles ``fn`` (or loads it
        from the persistent cache), which :attr:`clock` (as compilation) and :attr:`compiles`
        record. Dispatch is asynchronous, so the call's length is the compilation's. The loop
        uses it for its train and eval steps; a callback that jits a program of its own (the
        forecast maps' predict step) may use it for that program's first call."""
        before = cache_counts()
        start = time.perf_counter()
        with self.clock.phase("compilation"):
            out = fn(*args)
        self.compiles.append(CompileRecord(what, step, time.perf_counter() - start, came_from_cache(before, cache_counts())))
        return out

    def _batches(self, loader: Loader) -> Iterator[Any]:
        """``loader``'s batches, the wait for each charged to the clock's ``data`` phase."""
        iterator = iter(loader)
        while True:
            with self.clock.phase("data"):
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
            yield batch

    def _shardings(self, batch: Any) -> Any:
        key = jax.tree.structure(batch), tuple(getattr(x, "shape", ()) for x in jax.tree.leaves(batch))
        if key not in self._sharding_cache:
            global_size = global_batch_size(self.mesh, jax.tree.leaves(batch)[0].shape[0])
            check_batch_divisible(global_size, self.mesh)
            self._sharding_cache[key] = batch_shardings(batch, self.mesh)
        return self._sharding_cache[key]

    def place(self, local_batch: Any) -> Any:
        """Put this process's share of a batch onto the mesh as global arrays."""
        examples = global_batch_size(self.mesh, jax.tree.leaves(local_batch)[0].shape[0])
        return place_batch(local_batch, self._shardings(local_batch), examples)

    def _place_train_batch(self, local_batch: Any) -> Any:
        """A training batch on the mesh; with accumulation, its micro-batches stacked."""
        if self.accumulate_grad_batches == 1:
            return self.place(local_batch)
        shardings = self._shardings(local_batch[0])
        examples = global_batch_size(self.mesh, jax.tree.leaves(local_batch[0])[0].shape[0])
        return place_batch(stack_micro_batches(local_batch, shardings), micro_batch_shardings(shardings, self.mesh), examples)

    def abstract_train_step(self, task: Task, train_data: Any) -> tuple[Callable[..., Any], TrainState, Any]:
        """The train step :meth:`fit` would compile for ``task`` and ``train_data``, with its
        arguments as shapes only: ``(jitted step, abstract train state, abstract global
        batch)``, each abstract leaf a ``jax.ShapeDtypeStruct`` carrying its sharding. Reads
        one example batch (host arrays) and runs ``task.setup`` on it, as :meth:`fit` does, but
        allocates nothing on the devices; ``step.lower(state, batch).compile()`` then gives
        what the run would need (``compiled.memory_analysis()``, :mod:`aurora_loop.memory`)."""
        self.task = task
        self.train_data = _as_loader(train_data)
        if callable(getattr(task, "train_loader", None)):
            self.train_data = task.train_loader(self.train_data)
        if self.mesh is None:
            self.mesh = make_mesh(self.num_devices)
        _bind_mesh(task, self.mesh, self.fsdp)
        host_example = example_batch(self.train_data)
        if callable(getattr(task, "setup", None)):
            task.setup(host_example)
        sharding = self._shardings(host_example)
        example = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(_global_shape(x.shape, s, self.mesh), np.asarray(x).dtype, sharding=s),
                               host_example, sharding)
        init_fn, abstract, shardings, batch_sharding = self._step_parts(example, sharding)
        step = make_train_step(task, self.optimizer, shardings, batch_sharding, self.mesh, self.trainable, self._step_options())
        if self.accumulate_grad_batches > 1:
            n = self.accumulate_grad_batches
            leaves = [jax.ShapeDtypeStruct((n, *x.shape), x.dtype, sharding=s) if split else x
                      for x, s, split in zip(jax.tree.leaves(example), jax.tree.leaves(batch_sharding.leaves), batch_sharding.stacked)]
            example = type(batch_sharding)(leaves, batch_sharding.stacked, batch_sharding.treedef)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        return step, state, example

    def _step_options(self) -> StepOptions:
        return StepOptions(accumulate=self.accumulate_grad_batches, ema_decay=self.ema_decay, compute_dtype=self.compute_dtype)

    def _step_parts(self, example: Any, example_sharding: Any) -> tuple[Callable[[Any], TrainState], TrainState, TrainState, Any]:
        """(init function, abstract train state, its shardings, the train step's batch
        shardings) for a placed (or abstract) ``example`` batch with ``example_sharding``."""
        init_fn = make_init_fn(self.task, self.optimizer, self.seed, ema=self.ema_decay is not None)
        abstract = jax.eval_shape(init_fn, example)
        if abstract.task_state is not None and self.accumulate_grad_batches > 1:
            raise ValueError(f"task {type(self.task).__name__} keeps a state across steps (e.g. replay mode's buffer); "
                             "gradient accumulation does not combine with it: use accumulate_grad_batches=1")
        shardings = state_shardings(abstract, self.mesh, fsdp=self.fsdp)
        train_batch_sharding = example_sharding
        if self.accumulate_grad_batches > 1:
            train_batch_sharding = micro_batch_shardings(train_batch_sharding, self.mesh)
        return init_fn, abstract, shardings, train_batch_sharding

    def _setup(self, resume: bool) -> None:
        host_example = example_batch(self.train_data)
        if callable(getattr(self.task, "setup", None)):
            self.task.setup(host_example)
        example = self.place(host_example)
        del host_example

        init_fn, abstract, shardings, train_batch_sharding = self._step_parts(example, self._shardings_of(example))
        self.state_shardings = shardings
        self.train_step = make_train_step(self.task, self.optimizer, shardings, train_batch_sharding, self.mesh, self.trainable,
                                          self._step_options())
        for cb in self.callbacks:
            self.train_step = cb.wrap_train_step(self, self.train_step)
        self._eval_step = make_eval_step(self.task, shardings.params, None, self.mesh, self.compute_dtype)

        restored = None
        if resume and self.checkpoint_io is not None:
            abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
            restored = self.checkpoint_io.restore_latest(self, abstract_sharded)
        if restored is not None:
            self.state, meta = restored
            self.load_meta_state(meta)
            self.resumed_from = self.global_step
        else:
            self.train_data.set_epoch(0)
            self.state = jax.jit(init_fn, out_shardings=shardings)(example)
            self.global_step = self.epoch = self.epoch_step = 0
        self._tabulate_learning_rate()

    def _shardings_of(self, placed: Any) -> Any:
        return jax.tree.map(lambda x: x.sharding, placed)

    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            if cb is self.checkpoint_io:  # its hooks save (and wait for earlier saves)
                with self.clock.phase("checkpointing"):
                    getattr(cb, hook)(self, *args)
            else:
                getattr(cb, hook)(self, *args)

    def _run(self) -> None:
        """The loop. Order at a step that ends an epoch or the run: its ``on_step``, then its
        validation, ``on_epoch_end``, and last ``on_sync`` (where checkpoints are written), so a
        checkpoint always carries the validation of its own step."""
        loader = self.train_data
        per_epoch = self.steps_per_epoch
        pending: tuple[int, LazyMetrics] | None = None
        last_synced = self.global_step if self.resumed_from is not None else None

        def flush() -> None:
            nonlocal pending
            if pending is not None:
                self._emit("on_step", *pending)
                pending = None

        ended_mid_epoch = False
        placed = None  # the batch on the mesh that a REPEAT_BATCH trains on again
        compiled = False
        while self.epoch < self.max_epochs and not self._reached_max_steps() and not self.stopping:
            for local_batch in _until_unavailable(self._batches(loader), self._data_unavailable):
                if local_batch is not REPEAT_BATCH:
                    with self.clock.phase("data"):
                        placed = self._place_train_batch(local_batch)
                elif placed is None:
                    raise ValueError("the training loader yielded REPEAT_BATCH before any batch")
                if compiled:
                    self.state, device_metrics = self.train_step(self.state, placed)
                else:
                    self.state, device_metrics = self.timed_compile("train step", self.global_step + 1, self.train_step, self.state, placed)
                    compiled = True
                self.global_step += 1
                self.epoch_step += 1
                step = self.global_step
                metrics = LazyMetrics(device_metrics)
                if any(cb.wants_metrics(self, step) for cb in self.callbacks):
                    metrics.prefetch()
                flush()  # step - 1's hooks, now that step is queued on the device
                pending = (step, metrics)

                last_of_epoch = per_epoch is not None and self.epoch_step >= per_epoch
                val_due = self.val_every_n_steps is not None and step % self.val_every_n_steps == 0
                # All processes must take the same branch (collectives follow); one process: no communication.
                (wants_sync,) = self._agree(any(cb.wants_sync(self, step) for cb in self.callbacks))
                if not (val_due or wants_sync or last_of_epoch or self.stopping or self._reached_max_steps()):
                    continue
                flush()
                if val_due:
                    self.validate(step)
                self._agree()  # hooks above may have asked to stop
                if last_of_epoch and not self.stop_skips_validation:
                    break  # the epoch's end below validates (when due) and syncs
                if self.stopping or self._reached_max_steps():
                    ended_mid_epoch = True
                    break
                self._emit("on_sync", step)
                last_synced = step
            flush()
            if self.data_error is not None and not ended_mid_epoch:
                self._agree()  # every process met it at the same batch
                ended_mid_epoch = True
            if ended_mid_epoch:
                break
            run_ends = self.stopping or self._reached_max_steps() or self.epoch + 1 >= self.max_epochs
            if run_ends:
                self._validate_final()
            elif self.val_every_n_steps is None:
                self.validate(self.global_step)
            self._emit("on_epoch_end", self.epoch, dict(self.last_val_metrics))
            # The saved position is the start of the next epoch, so a resume never replays one.
            self.epoch += 1
            self.epoch_step = 0
            loader.set_epoch(self.epoch)
            self._agree()
            self._emit("on_sync", self.global_step)
            last_synced = self.global_step
        flush()
        if ended_mid_epoch and self._validate_final():
            self._emit("on_epoch_end", self.epoch, dict(self.last_val_metrics))  # a partial epoch
        if last_synced != self.global_step:
            self._emit("on_sync", self.global_step)

    def _data_unavailable(self, err: DataUnavailable) -> None:
        """A loader could not read the next batch (on every process at once): stop here as a
        preemption does, saving the last completed step, without the final validation."""
        self.data_error = str(err)
        log.warning("data unavailable, stopping at step %d after saving: %s", self.global_step, err)
        self.request_stop(f"data unavailable ({err})", validate=False, checkpoint=True)

    def _reached_max_steps(self) -> bool:
        return self.max_steps is not None and self.global_step >= self.max_steps

    def _validate_final(self) -> bool:
        """Validate the parameters the run hands over, unless already done at this step or the
        stop asked to skip it (:attr:`stop_skips_validation`). Returns whether the run ends cleanly."""
        self._agree()
        if self.stop_skips_validation:
            return False
        if self.last_validated_step != self.global_step:
            self.validate(self.global_step)
        return True

    def validate(self, step: int) -> dict[str, float] | None:
        """Score the validation data with the current parameters and emit ``on_validate``.

        Returns the scores (keys such as ``loss``, ``mae/2t``), or ``None`` when there is
        no validation data or a stop that skips validation arrived mid-way (a signal: the pass
        is given up, nothing is emitted, so that the run saves promptly; the data became
        unavailable: the run stops with a checkpoint).
        """
        if self.val_data is None:
            return None
        with self.clock.phase("validation"):
            self.val_data.set_epoch(0)
            total = None
            for local_batch in _until_unavailable(self.val_data, self._data_unavailable):
                self._agree()
                if self.stop_skips_validation:
                    return None
                placed = self.place(local_batch)
                if any(c.what == "eval step" for c in self.compiles):
                    batch_metrics = self._eval_step(self.eval_params, placed)
                else:
                    batch_metrics = self.timed_compile("eval step", step, self._eval_step, self.eval_params, placed)
                total = batch_metrics if total is None else total.merge(batch_metrics)
            if total is None or self.data_error is not None:  # no scores from part of the data
                return None
            self.last_val_metrics = total.compute()
            self.last_validated_step = step
            self._emit("on_validate", step, dict(self.last_val_metrics))
        return self.last_val_metrics
