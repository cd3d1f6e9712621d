"""Multi-process start-up on JAX's distributed runtime (multi-controller JAX).

Every process runs the same ``aurora-train`` command. Process 0 hosts JAX's coordination
service; all processes connect to it, then ``jax.devices()`` lists every process's devices
and one jitted step runs over all of them (gloo collectives on CPU, NCCL on GPUs).

How a process learns its place, in order:

1. ``--coordinator_address HOST:PORT --num_processes N --process_id I`` (any launcher);
2. else, under a detected launcher with more than one task (SLURM ``srun``, Open MPI
   ``mpirun``), ``jax.distributed.initialize()``'s own cluster detection;
3. else a single process (nothing to do). ``--num_processes 1`` forces this.

Host-side decisions that change which collectives run next (stop, save, validate) must be
the same on every process, or the job deadlocks: :func:`agree_any` makes them so.

Failure handling comes from JAX's runtime: when a process dies, the others stop receiving
its heartbeats and terminate after the heartbeat timeout with "the JAX distributed service
detected fatal errors ... another task died" (non-zero exit). Environment variables tune
the timeouts, in seconds: ``AURORA_LOOP_INIT_TIMEOUT_S`` (connecting; JAX's default 300),
``AURORA_LOOP_HEARTBEAT_TIMEOUT_S`` (declaring a silent process dead; JAX's default 100) and
``AURORA_LOOP_AGREE_TIMEOUT_S`` (waiting for the others at a decision point; 3600).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from aurora_loop.errors import UsageError

INIT_TIMEOUT_ENV = "AURORA_LOOP_INIT_TIMEOUT_S"
HEARTBEAT_TIMEOUT_ENV = "AURORA_LOOP_HEARTBEAT_TIMEOUT_S"
AGREE_TIMEOUT_ENV = "AURORA_LOOP_AGREE_TIMEOUT_S"
DEFAULT_AGREE_TIMEOUT_S = 3600

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class ClusterEnv:
    """A launcher environment that started several processes of this job.

    Attributes:
      name: ``"slurm"`` or ``"ompi"``.
      num_processes: tasks in the job step.
      process_id: this task's rank, 0-based.
      local_process_count: tasks on this node, when the launcher says.
      jax_detects: whether ``jax.distributed.initialize()`` finds the coordinator on its own
        (Open MPI 5 does not export the variable JAX reads).
    """

    name: str
    num_processes: int
    process_id: int
    local_process_count: int | None
    jax_detects: bool


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
    """Tasks on node ``node_id`` from SLURM's compressed list, e.g. ``"2(x3),1"``."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


def _int(environ: Mapping[str, str], name: str) -> int | None:
    try:
        return int(environ[name])
    except (KeyError, ValueError):
        return None


def detect_cluster(environ: Mapping[str, str] | None = None) -> ClusterEnv | None:
    """The launcher that started this process as one of several, or ``None``.

    SLURM counts only inside a job step (``srun``), where ``SLURM_STEP_NODELIST`` is set, so
    a plain ``aurora-train`` in a batch script stays a single process. Open MPI counts when
    ``OMPI_COMM_WORLD_SIZE`` > 1 (``mpirun`` / ``mpiexec``).
    """
    env = os.environ if environ is None else environ
    if all(name in env for name in _SLURM_VARS):
        count, rank = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID")
        if count is not None and rank is not None and count > 1:
            per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
            node_id = _int(env, "SLURM_NODEID")
            local = _tasks_on_node(per_node, node_id) if per_node and node_id is not None else None
            return ClusterEnv("slurm", count, rank, local, jax_detects=True)
    count, rank = _int(env, "OMPI_COMM_WORLD_SIZE"), _int(env, "OMPI_COMM_WORLD_RANK")
    if count is not None and rank is not None and count > 1:
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
        return ClusterEnv("ompi", count, rank, local, jax_detects="OMPI_MCA_orte_hnp_uri" in env)
    return None


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(
            f"--coordinator_address {address} is not HOST:PORT; pass process 0's host name or IP "
            "and a free TCP port, e.g. --coordinator_address node001:12355"
        )


def _timeout(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"environment variable {name}={value!r} must be a whole number of seconds, at least 1")
    return int(value)


def distributed_arguments(config: Any, environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Keyword arguments for ``jax.distributed.initialize``, or ``None`` for a single process.

    Checks the flags for consistency (raising :class:`UsageError` with the fix) without
    touching JAX, so it can be tested on its own.
    """
    env = os.environ if environ is None else environ
    address = getattr(config, "coordinator_address", None)
    count = getattr(config, "num_processes", None)
    rank = getattr(config, "process_id", None)
    if count is not None and count < 1:
        raise UsageError(f"--num_processes must be at least 1, got {count}")
    if rank is not None and rank < 0:
        raise UsageError(f"--process_id must be 0 or more, got {rank}")
    if count is not None and rank is not None and rank >= count:
        raise UsageError(f"--process_id {rank} is out of range for --num_processes {count}; process ids run from 0 to {count - 1}")
    if address is not None:
        _check_address(address)
    if count == 1 and address is None:
        return None  # explicitly one process, whatever the launcher says
    cluster = detect_cluster(env)

    kwargs: dict[str, Any] = {}
    if address is not None:
        if count is None or rank is None:
            if cluster is None:
                missing = " and ".join(f"--{n}" for n, v in (("num_processes", count), ("process_id", rank)) if v is None)
                raise UsageError(
                    f"--coordinator_address needs {missing} too (every process gets the same "
                    "--num_processes and its own --process_id from 0)"
                )
            count = cluster.num_processes if count is None else count
            rank = cluster.process_id if rank is None else rank
            if rank >= count:
                raise UsageError(f"process id {rank} is out of range for {count} processes; check --num_processes and --process_id")
        kwargs.update(coordinator_address=address, num_processes=count, process_id=rank)
    elif count is not None or rank is not None:
        if cluster is None:
            raise UsageError(
                "--num_processes / --process_id need --coordinator_address HOST:PORT of process 0 "
                "(or a launch by srun or mpirun, which JAX detects)"
            )
        if count is not None and count != cluster.num_processes:
            raise UsageError(
                f"--num_processes {count} disagrees with the {cluster.num_processes} tasks {cluster.name} started; "
                "drop --num_processes or launch that many tasks"
            )
        if not cluster.jax_detects:
            raise UsageError(
                f"JAX cannot find the coordinator under this {cluster.name} launcher; "
                "pass --coordinator_address HOST:PORT of the rank-0 host"
            )
        kwargs.update(num_processes=count, process_id=rank)
    elif cluster is None:
        return None
    elif not cluster.jax_detects:
        raise UsageError(
            f"{cluster.num_processes} {cluster.name} tasks detected, but JAX cannot find the coordinator under this "
            "launcher (Open MPI 5); pass --coordinator_address HOST:PORT of the rank-0 host"
        )

    if cluster is not None and cluster.name == "slurm" and "JAX_LOCAL_DEVICE_IDS" not in env:
        # JAX gives each SLURM task the one GPU numbered SLURM_LOCALID. With one task per
        # node, or when SLURM already bound one GPU to each task (--gpus-per-task=1), that
        # is wrong: use every device the task can see instead (an empty list = no filter).
        one_visible = len([d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]) == 1
        if cluster.local_process_count == 1 or one_visible:
            kwargs["local_device_ids"] = []
    init_timeout, heartbeat = _timeout(INIT_TIMEOUT_ENV), _timeout(HEARTBEAT_TIMEOUT_ENV)
    if init_timeout is not None:
        kwargs["initialization_timeout"] = init_timeout
    if heartbeat is not None:
        kwargs["heartbeat_timeout_seconds"] = heartbeat
    return kwargs


def initialize_distributed(config: Any) -> bool:
    """Join the multi-process job the config (or the launcher) describes; True if joined.

    Must run before anything touches devices. Single-process runs do nothing and return
    False. Inconsistent flags raise :class:`UsageError`; so does failing to reach the other
    processes within the connection timeout.
    """
    kwargs = distributed_arguments(config)
    if kwargs is None:
        return False
    import jax

    if jax.distributed.is_initialized():
        return True
    # Cross-process collectives on CPU (JAX >= 0.10 defaults to gloo; older ones to none).
    try:
        if jax.config.jax_cpu_collectives_implementation is None:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # pragma: no cover - the option was renamed or removed
        pass
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, TypeError) as err:
        raise UsageError(f"cannot start the multi-process job: {err}") from None
    except Exception as err:  # noqa: BLE001 - JaxRuntimeError from the connection attempt
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = kwargs.get("coordinator_address", "the detected coordinator")
        raise UsageError(
            f"could not join the multi-process job at {where} ({first}); start every process with the same "
            "--coordinator_address and --num_processes and a distinct --process_id, within the connection "
            f"timeout ({INIT_TIMEOUT_ENV})"
        ) from None
    if jax.process_count() > 1:
        _exit_promptly_on_uncaught_exception(jax.process_index())
    return True


def leave_job(status: int) -> int:
    """Return ``status``; in a multi-process job with ``status != 0``, end this process now.

    For an error that only this process may have hit (e.g. bad data in its shard): a
    normal exit would wait in JAX's shutdown barrier (up to 300 s) for processes blocked in
    a collective this one will never join. Ending at once lets JAX's heartbeats tell them.
    Usage: ``return leave_job(report_usage_error(err, PROG))``.
    """
    jax = sys.modules.get("jax")  # not imported yet: certainly a single process
    if status != 0 and jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _exit_promptly_on_uncaught_exception(process_index: int) -> None:
    """Make an uncaught exception end this process at once, after its traceback.

    A normal interpreter exit waits in JAX's shutdown barrier (up to 300 s) for processes
    that may be blocked in a collective this one will never join. Exiting at once lets JAX's
    heartbeats tell the others, which then stop with an error instead of hanging.
    """
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        previous(exc_type, exc, tb)
        print(f"process {process_index} failed ({exc_type.__name__}); ending it now so the other processes stop too",
              file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = hook


def _coordination_client() -> Any:
    """The client of JAX's coordination service (``None`` when JAX's distributed runtime was
    not started through ``jax.distributed.initialize``)."""
    try:
        from jax._src import distributed as jax_distributed

        return jax_distributed.global_state.client
    except (ImportError, AttributeError):  # pragma: no cover - a JAX without it
        return None


_agree_round = itertools.count()
_barrier_round = itertools.count()


def _wait_ms() -> int:
    return 1000 * (_timeout(AGREE_TIMEOUT_ENV) or DEFAULT_AGREE_TIMEOUT_S)


def agree_any(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over all processes, so that every process takes the same branch.

    Every process must call this at the same points, with the same number of flags. With
    one process it returns the flags unchanged, without any communication. With several,
    process 0 collects every process's flags through JAX's coordination service (its
    key-value store: host to host, no device work, so the device queue keeps running ahead)
    and publishes the OR, which all processes read: two small messages per process.
    """
    import jax

    count = jax.process_count()
    if count == 1:
        return tuple(bool(f) for f in flags)
    client = _coordination_client()
    if client is None:  # pragma: no cover - runtimes started without jax.distributed
        import numpy as np
        from jax.experimental import multihost_utils

        gathered = np.asarray(multihost_utils.process_allgather(np.asarray(flags, dtype=np.int32)))
        return tuple(bool(v) for v in gathered.reshape(count, len(flags)).any(axis=0))

    index, round_ = jax.process_index(), next(_agree_round)
    prefix = f"aurora_loop/agree/{round_}"
    mine = "".join("1" if f else "0" for f in flags)
    wait_ms = _wait_ms()
    try:
        if index == 0:
            votes = [mine] + [client.blocking_key_value_get(f"{prefix}/{q}", wait_ms) for q in range(1, count)]
            if any(len(v) != len(mine) for v in votes):
                raise RuntimeError(f"processes disagree on how many flags to agree on (round {round_}): {votes}")
            result = "".join("1" if any(v[i] == "1" for v in votes) else "0" for i in range(len(mine)))
            client.key_value_set(f"{prefix}/result", result)
            if round_ > 0:
                # Everyone read the previous result before sending this round's flags.
                client.key_value_delete(f"aurora_loop/agree/{round_ - 1}")
        else:
            client.key_value_set(f"{prefix}/{index}", mine)
            result = client.blocking_key_value_get(f"{prefix}/result", wait_ms)
    except RuntimeError:
        raise
    except Exception as err:  # noqa: BLE001 - JaxRuntimeError: deadline exceeded or the service failed
        raise RuntimeError(
            f"process {index}: the other processes did not reach the same decision point (round {round_}) "
            f"within {wait_ms // 1000} s ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
        ) from err
    return tuple(c == "1" for c in result)


def agree(flag: bool) -> bool:
    """``flag`` OR-ed over all processes (see :func:`agree_any`)."""
    return agree_any(flag)[0]


def barrier(name: str) -> None:
    """Wait until every process reached the barrier ``name`` (no-op with one process).

    E.g. after process 0 wrote files that the others read next. Every process must pass the
    same barriers in the same order.
    """
    import jax

    if jax.process_count() == 1:
        return
    client = _coordination_client()
    if client is None:  # pragma: no cover
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"aurora_loop/barrier/{next(_barrier_round)}/{name}", _wait_ms())
