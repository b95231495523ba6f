"""The local data cache: object data in parts, striped over cache targets, bounded, LRU-evicted.

``Cache`` is the interface the rest of the daemon uses; it owns no state and does no work of its own. It builds
and wires three parts, in ``lustrefs.data`` (as Mountpoint for S3 splits its ``data_cache`` and ``prefetch``):

- ``DiskParts`` (``lustrefs.data.parts``): layout over the targets, the index (``cache_parts``) and LRU order,
  pins, capacity and eviction (also on a full target disk), and every part file;
- ``Fetcher`` (``lustrefs.data.fetch``): single-flight ranged GETs of runs of parts, the in-memory set of recent
  parts, reads of object versions, prefetch and warm-up;
- ``LocalData`` (``lustrefs.data.local``): reads of ``FileData``, the local parts of dirty files (write,
  materialize, truncate, sync, adopt) and forgetting a file's data (drop, release).

Await points: those of the methods it delegates to (reads, writes, materialize, sync, fetch_all, run).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import trio

from lustrefs.data.fetch import SMALL_READ, Fetcher
from lustrefs.data.local import LocalData
from lustrefs.data.model import Buffer, CacheStats, FileData, ObjectVersion, first_error
from lustrefs.data.parts import DiskParts
from lustrefs.s3.repository import ObjectStore
from lustrefs.store.cacheparts import LOCAL, PartKey

__all__ = [
    "LOCAL",
    "SMALL_READ",
    "Buffer",
    "Cache",
    "CacheStats",
    "FileData",
    "ObjectVersion",
    "PartKey",
    "first_error",
]


class Cache:
    """Bounded on-disk cache of object data. Owned by the trio thread; disk writes go to worker threads."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        repo: ObjectStore,
        targets: list[Path],
        capacity: int,
        chunk_size: int,
        part_size: int,
        max_get: int = 8 * 1024 * 1024,
        recent_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.targets = targets
        self.capacity = capacity
        self.chunk_size = chunk_size
        self.part_size = part_size
        self.stats = CacheStats()
        self.disk = DiskParts(conn, targets, capacity, chunk_size, part_size, self.stats)
        self.fetcher = Fetcher(self.disk, repo, self.stats, max_get, recent_bytes)
        self.local = LocalData(self.disk, self.fetcher, self.stats)
        self.disk.on_drop = self.fetcher.forget  # a part dropped from disk is not served from memory either

    # ----------------------------------------------------------------------------------------- layout

    def target_of(self, part: int) -> int:
        return self.disk.target_of(part)

    def path_of(self, key: PartKey) -> Path:
        return self.disk.path_of(key)

    # ----------------------------------------------------------------------------------------- life cycle

    def load(self) -> None:
        """Load the index and make disk and index agree (drop files without rows and rows without files)."""
        self.disk.load()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host background prefetches until cancelled."""
        await self.fetcher.run(task_status=task_status)

    def flush(self) -> None:
        """Persist the LRU order of parts read since the last flush."""
        self.disk.flush()

    # ----------------------------------------------------------------------------------------- reading

    async def read(self, f: FileData, off: int, length: int) -> Buffer:
        """``length`` bytes of file ``f`` at ``off`` (fewer at end of file), fetching missing source parts."""
        return await self.local.read(f, off, length)

    async def read_bytes(self, f: FileData, off: int, length: int) -> bytes:
        """:meth:`read` as ``bytes`` (for callers that keep or upload the data)."""
        return bytes(await self.local.read(f, off, length))

    async def read_source(self, obj: ObjectVersion, off: int, length: int) -> Buffer:
        """``length`` bytes of the object version ``obj`` at ``off``, fetching missing parts."""
        return await self.fetcher.read_source(obj, off, length)

    def prefetch(self, obj: ObjectVersion, off: int, end: int) -> None:
        """Start fetching ``[off, end)`` of ``obj`` in the background (parts not present or in flight)."""
        self.fetcher.prefetch(obj, off, end)

    def warm(self, obj: ObjectVersion, off: int, end: int) -> None:
        """Start reading the parts of ``[off, end)`` that are on disk (not in memory) into the page cache."""
        self.fetcher.warm(obj, off, end)

    async def fetch_all(self, obj: ObjectVersion, parts_at_once: int = 64) -> None:
        """Bring every part of ``obj`` into the cache, ``parts_at_once`` at a time (hsm_restore)."""
        await self.fetcher.fetch_all(obj, parts_at_once)

    # ----------------------------------------------------------------------------------------- local data

    async def write(self, f: FileData, off: int, data: bytes) -> None:
        """Write ``data`` at ``off`` into local parts (``OSError(ENOSPC)`` when dirty data leaves no room)."""
        await self.local.write(f, off, data)

    async def materialize(self, f: FileData) -> None:
        """Copy every part of the file's content that is not local yet into local parts."""
        await self.local.materialize(f)

    def truncate(self, f: FileData, size: int) -> None:
        """Cut the local parts of ``f`` to ``size`` bytes (clean data is clipped by the caller's src_limit)."""
        self.local.truncate(f, size)

    async def sync(self, ino: int) -> None:
        """fsync the local parts of ``ino`` (in a worker thread)."""
        await self.local.sync(ino)

    def adopt(self, ino: int, old: ObjectVersion | None, new: ObjectVersion) -> None:
        """After an export: whole local parts, and old clean parts still valid, become clean parts of ``new``."""
        self.local.adopt(ino, old, new)

    def drop_version(self, ino: int, etag: str) -> None:
        """Forget the cached data of one object version of ``ino`` (replaced by a newer one)."""
        self.local.drop_version(ino, etag)

    def drop_inode(self, ino: int) -> None:
        """Forget every part of ``ino`` (the file is gone)."""
        self.local.drop_inode(ino)

    def release(self, ino: int) -> int:
        """Drop the clean parts of ``ino`` except those being read; local data stays. Returns the bytes freed."""
        return self.local.release(ino)

    # ----------------------------------------------------------------------------------------- accounting

    def cached_bytes(self, ino: int, etag: str | None = None) -> int:
        """Bytes of ``ino`` in the cache: of object version ``etag`` and local data, or (None) of any version.
        Parts fetched and still being written to disk count."""
        on_disk = self.disk.bytes_of(ino, *(() if etag is None else (etag, LOCAL)))
        return on_disk + self.fetcher.unwritten_bytes(ino, etag)

    def inodes_with_clean_parts(self) -> list[int]:
        """Files with fetched data of an object version in the cache."""
        return self.disk.inodes_with_clean_parts()

    def local_bytes(self) -> int:
        return self.disk.local_bytes()

    def usage_by_target(self) -> list[int]:
        """Bytes cached on each target."""
        return self.disk.usage_by_target()

    @property
    def used(self) -> int:
        """Bytes of parts on disk."""
        return self.disk.used

    @property
    def writing(self) -> int:
        """Bytes of parts fetched and still being written to disk."""
        return self.fetcher.writing

    @property
    def held(self) -> int:
        """Bytes the cache holds: parts on disk and parts being written."""
        return self.disk.used + self.fetcher.writing
