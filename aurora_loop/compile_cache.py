"""JAX's persistent compilation cache, on by default for ``aurora-train`` and ``forecast``.

A rerun, a resume after a preemption and the next run with the same shapes then load the
compiled steps from disk instead of compiling them again (the train step of AuroraSmall
compiles for about 20 s on two CPU cores, the 1.3 B model for minutes on a GPU).

Several processes may share one directory: an entry is written whole before it is used,
and JAX treats an entry it cannot read (one being written by another process) as a miss
and compiles. Programs with host callbacks are never cached (JAX refuses them); this
project's train, eval and predict steps have none (``posenc.KnownGrid``).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

DEFAULT_DIR = "~/.cache/aurora_loop/xla"
# Programs that compile faster than this are not worth a disk round trip.
MIN_COMPILE_SECONDS = 0.5


def default_dir() -> str:
    """``$XDG_CACHE_HOME/aurora_loop/xla`` when XDG_CACHE_HOME is set, else ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME")
    return os.path.join(base, "aurora_loop", "xla") if base else os.path.expanduser(DEFAULT_DIR)


def enable_compile_cache(setting: str | None) -> str | None:
    """Point JAX's persistent compilation cache at ``setting`` (a directory; ``"none"`` or
    ``None``: leave it off) before anything compiles; returns the directory in use.

    ``JAX_COMPILATION_CACHE_DIR`` in the environment wins, so a launcher's choice is kept.
    A directory that cannot be created only costs the speed-up: a warning, no error.
    """
    import jax

    chosen = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if chosen:
        return chosen
    if setting is None or str(setting).strip().lower() in ("none", "off", ""):
        return None
    path = os.path.abspath(os.path.expanduser(default_dir() if setting == DEFAULT_DIR else str(setting)))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        log.warning("compilation cache disabled: cannot create %s (%s)", path, err.strerror)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path


# --- was a program compiled or loaded from the cache? ------------------------------------------

_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_counts = {"hits": 0, "misses": 0}
_listening = False


def _on_event(event: str, **_: object) -> None:
    name = _EVENTS.get(event)
    if name is not None:
        _counts[name] += 1


def cache_counts() -> tuple[int, int]:
    """(hits, misses) of JAX's persistent compilation cache in this process so far.

    Counting starts with the first call (JAX's monitoring events; one listener, registered
    once); compare two readings around a compilation to learn where its program came from.
    """
    global _listening
    if not _listening:
        import jax.monitoring

        jax.monitoring.register_event_listener(_on_event)
        _listening = True
    return _counts["hits"], _counts["misses"]


def came_from_cache(before: tuple[int, int], after: tuple[int, int]) -> bool:
    """Whether the compilations between two :func:`cache_counts` readings were all served
    from the persistent cache (at least one hit, no miss)."""
    return after[0] > before[0] and after[1] == before[1]
