"""A bounded local cache of a remote store's chunks (``--cache_dir``), shared by processes.

Each chunk a run reads from object storage is written once under
``cache_dir/<hash of the store URL>/<chunk key>``, so the second epoch (and any other run
on the node) reads local disk. Metadata keys (``.zarray``, ``zarr.json``, ...) are never
cached: they are small, and a store that grows must show its new times.

Several processes on a node share one cache safely: a chunk is written to a private
temporary file and renamed into place (readers see a whole chunk or none), and eviction
runs under an exclusive ``flock`` that a busy process skips rather than waits for (it tries
again at its next write; the threads of one process take turns). A chunk
removed while another process reads it stays readable to that process (POSIX unlink), and
one removed before it is opened is simply fetched again. The bound is kept by deleting the
least recently used chunks (by modification time, refreshed on every hit) down to 90% of
``max_bytes`` whenever the writes since the last check could have passed it.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import threading
import uuid
from typing import Any

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

METADATA_NAMES = (".zarray", ".zgroup", ".zattrs", ".zmetadata", "zarr.json")


class ChunkCache(WrapperStore):
    """A read-only zarr store that keeps ``store``'s chunks under ``cache_dir``.

    Args:
      store: the remote store (a zarr ``Store``).
      cache_dir: the cache's root directory (created); one subdirectory per store URL.
      url: the store's URL (names its subdirectory).
      max_bytes: the bound on the cached bytes of all stores under ``cache_dir``.
    """

    def __init__(self, store: Any, cache_dir: str | os.PathLike, url: str, max_bytes: int) -> None:
        super().__init__(store)
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))
        self.url = url
        self.max_bytes = int(max_bytes)
        self.root = os.path.join(self.cache_dir, hashlib.sha256(url.encode()).hexdigest()[:16])
        os.makedirs(self.root, exist_ok=True)
        self.hits = self.misses = 0
        self._written_since_check = self.max_bytes  # check the bound on the first write
        self._lock, self._evicting = threading.Lock(), threading.Lock()

    def _with_store(self, store: Any) -> ChunkCache:
        return ChunkCache(store, self.cache_dir, self.url, self.max_bytes)

    def __str__(self) -> str:
        return f"cached({self._store})"

    def _path(self, key: str) -> str | None:
        if key.rsplit("/", 1)[-1] in METADATA_NAMES or ".." in key.split("/"):
            return None
        return os.path.join(self.root, *key.split("/"))

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        path = self._path(key) if byte_range is None else None
        if path is None:
            return await self._store.get(key, prototype, byte_range)
        data = await asyncio.to_thread(_read_touch, path)
        if data is not None:
            self.hits += 1
            return prototype.buffer.from_bytes(data)
        self.misses += 1
        buffer = await self._store.get(key, prototype, byte_range)
        if buffer is not None:
            await asyncio.to_thread(self._put, path, buffer.to_bytes())
        return buffer

    def _put(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError:  # a full or read-only disk: the run goes on without caching this chunk
            _remove(tmp)
            return
        with self._lock:
            self._written_since_check += len(data)
            due = self._written_since_check >= self.max_bytes // 20
        if due and self.evict() is not None:
            with self._lock:
                self._written_since_check = 0

    def evict(self) -> int | None:
        """Delete the least recently used chunks until the cache holds at most 90% of
        ``max_bytes`` (only when it holds more than ``max_bytes``); returns the bytes freed.
        Threads of this process take turns; while another process evicts, this one skips
        (None) and tries again at its next write."""
        with self._evicting, open(os.path.join(self.cache_dir, ".evict.lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            try:
                files = list(_chunk_files(self.cache_dir))
                total = sum(size for _, _, size in files)
                if total <= self.max_bytes:
                    return 0
                freed, target = 0, total - int(0.9 * self.max_bytes)
                for _, path, size in sorted(files):
                    if freed >= target:
                        break
                    if _remove(path):
                        freed += size
                return freed
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def cached_bytes(self) -> int:
        """Bytes of chunks under ``cache_dir`` now (all stores)."""
        return sum(size for _, _, size in _chunk_files(self.cache_dir))


def _read_touch(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, IsADirectoryError):
        return None
    try:
        os.utime(path)  # recently used: evicted last
    except OSError:
        pass
    return data


def _chunk_files(root: str):
    """(mtime, path, size) of every cached chunk under ``root`` (temporary files and locks excluded)."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(".tmp") or name.startswith(".evict"):
                continue
            path = os.path.join(dirpath, name)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            yield stat.st_mtime, path, stat.st_size


def _remove(path: str) -> bool:
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False
