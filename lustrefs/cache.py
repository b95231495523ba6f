"""The local data cache: object data in parts, striped over cache targets, bounded, LRU-evicted.

Data of one object version is cut into parts of ``part_size`` bytes (a part never spans two chunks, since the
chunk size, ``ImportedFileChunkSize``, is a whole number of parts). Chunk N of a file lives on cache target
N mod (number of targets) — the local striped cache. Each part is one file, written under a temporary name
and renamed into place, so a half-written part never looks present; a part file whose size is not the
recorded one is treated as missing. The index (``cache_parts``) is in SQLite and survives a restart. A target
disk that fills up before the capacity is reached (ENOSPC) makes room by evicting the clean parts stored on it.
Concurrent readers of a missing part share one download; parts being read are pinned against eviction.

Fetched data is served from memory first: the parts of recent GETs stay in a bounded in-memory set
(``recent_bytes``) from the moment the GET returns, so readers never wait for the disk write nor read the
part back. Clean parts of 256 KiB or more are written with ``O_DIRECT`` where the file system allows it, in
a worker thread: the data does not pass through the page cache a second time (the FUSE file's pages already
hold it), which halves the kernel's copying per byte; smaller runs (small files) are written on the trio
thread, cheaper than a thread hop. A part on disk is read on the trio thread when the page cache holds it
(``RWF_NOWAIT``), else in a worker thread; the read-ahead warms the parts ahead of a reader with
``POSIX_FADV_WILLNEED``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from . import db
from .repository import ObjectStore, RepositoryError

log = logging.getLogger(__name__)

PartKey = tuple[int, str, int]  # (ino, etag, part index)
SMALL_READ = 128 * 1024  # reads up to this size into an absent part get their own exact GET
Buffer = bytes | bytearray | memoryview  # what reads return: memoryviews of fetched data are answered without a copy


@dataclass(frozen=True)
class ObjectVersion:
    """What a read is pinned to: one version (ETag) of one object."""

    ino: int
    key: str
    etag: str
    size: int


LOCAL = ""  # the "ETag" of local data: parts written here, authoritative while the file is dirty


@dataclass(frozen=True)
class FileData:
    """What reads and writes of one file work on: local parts over the file's clean data in S3.

    Byte ``i`` of the file is, in order of precedence: the local part holding it (``local``), the source object
    when ``i < source.size`` (``source.size`` is the number of valid bytes, less than the object after a
    truncate), else zero.
    """

    ino: int
    size: int
    source: ObjectVersion | None
    local: bool


@dataclass
class _Fetch:
    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None


@dataclass
class CacheStats:
    hits: int = 0  # parts read that were present
    misses: int = 0  # parts that had to be fetched
    bytes_fetched: int = 0
    evictions: int = 0
    direct_reads: int = 0  # small reads answered by their own GET while their part was fetched
    reads: int = 0  # reads of file data (FUSE read requests and exports)
    read_bytes: int = 0
    memory_hits: int = 0  # parts read from the in-memory set of recent GETs


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
        if chunk_size % part_size:
            raise ValueError("the chunk size must be a multiple of the part size")
        self.conn = conn
        self.repo = repo
        self.targets = targets
        self.capacity = capacity
        self.chunk_size = chunk_size
        self.part_size = part_size
        self.stats = CacheStats()
        self.used = 0
        self._lru: collections.OrderedDict[PartKey, int] = collections.OrderedDict()  # part -> size
        self._by_ino: dict[int, set[PartKey]] = {}  # the parts of each inode (per-file work never scans _lru)
        self._clock = 0
        self._touched: set[PartKey] = set()
        self._pins: collections.Counter[PartKey] = collections.Counter()
        self._fetches: dict[PartKey, _Fetch] = {}
        self.max_get = max_get  # bytes one ranged GET may cover (several parts)
        self._disk = trio.CapacityLimiter(4)
        self._nursery: trio.Nursery | None = None
        self._reserved = 0  # bytes of fetches in flight
        # Parts of recent GETs, served from memory. Those not yet written to disk (_unwritten) are not in _lru
        # and stay here until written; the others are dropped oldest first beyond recent_bytes.
        self._recent: collections.OrderedDict[PartKey, memoryview] = collections.OrderedDict()
        self._recent_size = 0
        self._unwritten: set[PartKey] = set()
        self.recent_bytes = recent_bytes

    # ----------------------------------------------------------------------------------------- layout

    def target_of(self, part: int) -> int:
        """The cache target holding ``part``: its chunk number modulo the number of targets."""
        return (part * self.part_size // self.chunk_size) % len(self.targets)

    def path_of(self, key: PartKey) -> Path:
        ino, etag, part = key
        version = hashlib.sha1(etag.encode()).hexdigest()[:16]
        return self.targets[self.target_of(part)] / f"{ino % 256:02x}" / f"{ino}.{version}.{part}"

    # ----------------------------------------------------------------------------------------- start-up

    def load(self) -> None:
        """Load the index and make disk and index agree (drop files without rows and rows without files)."""
        rows = self.conn.execute("SELECT ino, etag, part, size, last_use FROM cache_parts ORDER BY last_use")
        indexed: dict[Path, PartKey] = {}
        for ino, etag, part, size, last_use in rows:
            key = (ino, etag, part)
            self._index(key, size)
            self._clock = max(self._clock, last_use)
            indexed[self.path_of(key)] = key
        for target in self.targets:
            for sub in target.glob("[0-9a-f][0-9a-f]"):
                for path in sub.iterdir():
                    if path not in indexed:
                        path.unlink(missing_ok=True)  # orphan or temporary file from a crash
        for path, key in indexed.items():
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = None
            if key[1] == LOCAL and size is not None:
                if size != self._lru[key]:  # writes after the last commit: the file on disk is the data
                    self._resize(key, size)
            elif size != self._lru[key]:
                self._drop(key)
        self.used = sum(self._lru.values())

    # ----------------------------------------------------------------------------------------- reading

    def _parts_of(self, off: int, end: int) -> range:
        return range(off // self.part_size, (end - 1) // self.part_size + 1)

    async def read(self, f: FileData, off: int, length: int) -> Buffer:
        """``length`` bytes of file ``f`` at ``off`` (fewer at end of file), fetching missing source parts."""
        end = min(off + length, f.size)
        if off >= end:
            return b""
        self.stats.reads += 1
        self.stats.read_bytes += end - off
        if f.source is not None and end - off > SMALL_READ:
            self.prefetch(f.source, off, min(end, f.source.size))  # concurrent runs, not one part at a time
        pieces: list[Buffer] = []
        pos = off
        for p in self._parts_of(off, end):
            start = p * self.part_size
            hi = min(end, start + self.part_size)
            if f.local and (f.ino, LOCAL, p) in self._lru:
                pieces.append(await self._read_local(f.ino, p, pos - start, hi - start))
            elif f.source is not None and pos < f.source.size:
                src_hi = min(hi, f.source.size)
                pieces.append(await self.read_source(f.source, pos, src_hi - pos))
                pieces.append(bytes(hi - src_hi))
            else:
                pieces.append(bytes(hi - pos))
            pos = hi
        return _joined(pieces)

    async def read_bytes(self, f: FileData, off: int, length: int) -> bytes:
        """:meth:`read` as ``bytes`` (for callers that keep or upload the data)."""
        return bytes(await self.read(f, off, length))

    def _available(self, key: PartKey) -> bool:
        """Whether ``key`` can be read now, from memory or from disk."""
        return key in self._lru or key in self._recent

    async def read_source(self, obj: ObjectVersion, off: int, length: int) -> Buffer:
        """``length`` bytes of the object version ``obj`` at ``off``, fetching missing parts."""
        end = min(off + length, obj.size)
        if off >= end:
            return b""
        keys = [(obj.ino, obj.etag, p) for p in self._parts_of(off, end)]
        nobody_has_it = all(not self._available(k) and k not in self._fetches for k in keys)
        part_bytes = min(self.part_size, obj.size - keys[0][2] * self.part_size)
        if self._nursery is not None and end - off <= SMALL_READ < part_bytes and nobody_has_it:
            # A small read nobody is fetching yet: answer it with its own small GET now (first-byte
            # latency), then bring the whole part into the cache in the background (started after the small
            # GET, so that the two do not compete for the endpoint and the CPU).
            self.stats.misses += len(keys)
            self.stats.direct_reads += 1
            data = await self.repo.get_range(obj.key, obj.etag, off, end)
            self.prefetch(obj, off, end)
            return data
        with self._pinned(keys):
            missing = [k for k in keys if not self._available(k)]
            self.stats.hits += len(keys) - len(missing)
            self.stats.misses += len(missing)
            if missing:
                await self._ensure(obj, [k[2] for k in missing])
            pieces = []
            for key in keys:
                start = key[2] * self.part_size
                pieces.append(await self._read_part(obj, key, max(off, start) - start, end - start))
        return _joined(pieces)

    def prefetch(self, obj: ObjectVersion, off: int, end: int) -> None:
        """Start fetching ``[off, end)`` of ``obj`` in the background (parts not present or in flight)."""
        end = min(end, obj.size)
        if off >= end or self._nursery is None:
            return
        for run in self._runs(obj, self._absent(obj, self._parts_of(off, end))):
            self._nursery.start_soon(self._prefetch_run, obj, run, self._register(obj, run))

    def warm(self, obj: ObjectVersion, off: int, end: int) -> None:
        """Start reading the parts of ``[off, end)`` that are on disk (not in memory) into the page cache."""
        keys = [(obj.ino, obj.etag, p) for p in self._parts_of(off, min(end, obj.size))] if off < end else []
        _will_need([self.path_of(k) for k in keys if k in self._lru and k not in self._recent])

    async def _prefetch_run(self, obj: ObjectVersion, run: list[int], fetch: _Fetch) -> None:
        try:
            await self._fetch_run(obj, run, fetch)
        except Exception as exc:  # the reader that needs the data fetches it again and reports the error
            log.debug("prefetch of %s parts %s failed: %s", obj.key, run, exc)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host background prefetches until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def _read_part(self, obj: ObjectVersion, key: PartKey, lo: int, hi: int) -> Buffer:
        """Bytes ``[lo, hi)`` of part ``key`` (``hi`` is clipped to the part), from memory or disk."""
        for _ in range(3):
            piece = self._recent.get(key)
            if piece is not None:
                self._recent.move_to_end(key)
                self.stats.memory_hits += 1
                if key in self._lru:
                    self._touch(key)
                return piece[lo:hi]
            if key in self._lru:
                hi = min(hi, self._lru[key])
                self._touch(key)
                with contextlib.suppress(FileNotFoundError):
                    data = _pread_cached(self.path_of(key), lo, hi)  # no thread hop when the page cache has it
                    if data is None:
                        data = await trio.to_thread.run_sync(_pread, self.path_of(key), lo, hi, limiter=self._disk)
                    if len(data) == hi - lo:
                        return data
                log.warning("cache part %s was missing or short on disk; fetching it again", key)
                self._drop(key)
            await self._ensure(obj, [key[2]])
        raise RepositoryError(f"part {key[2]} of {obj.key} could not be kept in the cache")

    def _runs(self, obj: ObjectVersion, parts: list[int]) -> list[list[int]]:
        """Group sorted part numbers into contiguous runs of at most ``max_get`` bytes (one GET each)."""
        runs: list[list[int]] = []
        per_get = max(self.max_get // self.part_size, 1)
        for p in parts:
            if runs and runs[-1][-1] == p - 1 and len(runs[-1]) < per_get:
                runs[-1].append(p)
            else:
                runs.append([p])
        return runs

    def _absent(self, obj: ObjectVersion, parts: range | list[int]) -> list[int]:
        """The parts neither present nor being fetched."""
        return [p for p in parts if not self._available(k := (obj.ino, obj.etag, p)) and k not in self._fetches]

    def _register(self, obj: ObjectVersion, run: list[int]) -> _Fetch:
        """Mark ``run`` as being fetched, before any await, so no one else starts fetching it."""
        fetch = _Fetch()
        for p in run:
            self._fetches[(obj.ino, obj.etag, p)] = fetch
        return fetch

    async def _ensure(self, obj: ObjectVersion, parts: list[int]) -> None:
        """Make ``parts`` available: fetch the absent ones in runs, concurrently, and wait for every fetch of
        them in flight (each ends when its data is in memory; the disk write goes on in the background)."""
        runs = [(run, self._register(obj, run)) for run in self._runs(obj, self._absent(obj, parts))]
        waits = {id(f): f for p in parts if (f := self._fetches.get((obj.ino, obj.etag, p))) is not None}
        if self._nursery is not None:
            for run, fetch in runs:
                self._nursery.start_soon(self._prefetch_run, obj, run, fetch)
        elif runs:  # the cache is not running (start-up, shut-down): fetch here
            try:
                async with trio.open_nursery() as nursery:
                    for run, fetch in runs:
                        nursery.start_soon(self._fetch_run, obj, run, fetch)
            except BaseExceptionGroup as group:
                raise first_error(group) from None
        for fetch in waits.values():
            await fetch.done.wait()
            if fetch.error is not None:
                raise fetch.error

    async def _fetch_run(self, obj: ObjectVersion, run: list[int], fetch: _Fetch) -> None:
        """Fetch contiguous parts, registered as ``fetch``, with one ranged GET; readers get them from memory
        as soon as the GET returns, and they are written to disk after that."""
        keys = [(obj.ino, obj.etag, p) for p in run]
        start = run[0] * self.part_size
        end = min((run[-1] + 1) * self.part_size, obj.size)
        kept = False  # the parts stay readable: indexed on disk, or in memory only when the disk refused them
        self._reserved += end - start  # counted until indexed, so concurrent fetches cannot overfill
        try:
            try:
                self._make_room(end - start)
                view = memoryview(await self.repo.get_range(obj.key, obj.etag, start, end))
            except BaseException as exc:
                fetch.error = exc if isinstance(exc, Exception) else RepositoryError("fetch cancelled")
                raise
            finally:
                self._finish(keys, fetch)
            self.stats.bytes_fetched += len(view)
            pieces = [view[i * self.part_size : (i + 1) * self.part_size] for i in range(len(keys))]
            for key, piece in zip(keys, pieces, strict=True):
                self._unwritten.add(key)
                self._remember(key, piece)
            writes = [(self.path_of(k), piece) for k, piece in zip(keys, pieces, strict=True)]
            large = end - start >= _DIRECT_MIN  # a small file: a page-cache write costs less than a thread hop
            try:
                await self._with_room(run, end - start, _write_parts, writes, large, thread=large)
            except OSError as exc:  # served from memory until trimmed, fetched again after that
                log.warning("could not write parts %s of %s to the cache: %s", run, obj.key, exc)
                for (path, _), key in zip(writes, keys, strict=True):
                    if key not in self._lru:  # those of the run written before the failure
                        path.unlink(missing_ok=True)
                kept = True
                return
            with db.transaction(self.conn):
                for (path, piece), key in zip(writes, keys, strict=True):
                    if key in self._unwritten:
                        self._add(key, len(piece))
                    else:  # released or dropped while it was being written
                        path.unlink(missing_ok=True)
            kept = True
        finally:
            self._reserved -= end - start
            for key in keys:
                self._unwritten.discard(key)
                if not kept:
                    self._forget(key)
            self._trim_recent()

    def _finish(self, keys: list[PartKey], fetch: _Fetch) -> None:
        """End the fetch registered as ``fetch``: its waiters go on (to memory, or to its error)."""
        for key in keys:
            if self._fetches.get(key) is fetch:
                del self._fetches[key]
        fetch.done.set()

    def _remember(self, key: PartKey, piece: memoryview) -> None:
        self._forget(key)
        self._recent[key] = piece
        self._recent_size += len(piece)

    def _forget(self, key: PartKey) -> None:
        piece = self._recent.pop(key, None)
        if piece is not None:
            self._recent_size -= len(piece)

    def _trim_recent(self) -> None:
        """Drop the oldest written, unpinned parts from memory beyond ``recent_bytes``."""
        excess, victims = self._recent_size - self.recent_bytes, []
        for key, piece in self._recent.items():
            if excess <= 0:
                break
            if key not in self._unwritten and key not in self._pins:
                victims.append(key)
                excess -= len(piece)
        for key in victims:
            self._forget(key)

    # ----------------------------------------------------------------------------------------- local data

    async def _read_local(self, ino: int, part: int, lo: int, hi: int) -> bytes:
        with open(self.path_of((ino, LOCAL, part)), "rb") as f:
            data = os.pread(f.fileno(), hi - lo, lo)
        return data + bytes(hi - lo - len(data))  # a local part shorter than the range reads as zeros after

    async def write(self, f: FileData, off: int, data: bytes) -> None:
        """Write ``data`` at ``off`` into local parts, copying only the touched parts' clean data first.

        Raises ``OSError(ENOSPC)`` when dirty data leaves no room. The kernel serialises writes to one inode.
        """
        end = off + len(data)
        for p in self._parts_of(off, end):
            key = (f.ino, LOCAL, p)
            start = p * self.part_size
            if key not in self._lru:
                await self._materialize(f, p)
            lo, hi = max(off, start) - start, min(end, start + self.part_size) - start
            growth = max(0, hi - self._lru[key])
            if growth:
                self._reserve(growth)
            path = self.path_of(key)
            try:
                await self._with_room([p], growth, _pwrite, path, data[start + lo - off : start + hi - off], lo)
            except OSError:
                if growth:
                    os.truncate(path, self._lru[key])  # what the failed write appended is neither data nor counted
                raise
            if growth:
                self._resize(key, hi)

    async def materialize(self, f: FileData) -> None:
        """Copy every part of the file's content that is not local yet into local parts (its source object is
        about to be overwritten or deleted)."""
        for p in self._parts_of(0, f.size) if f.size else range(0):
            if (f.ino, LOCAL, p) not in self._lru:
                await self._materialize(f, p)

    async def _materialize(self, f: FileData, part: int) -> None:
        """Create the local part ``part`` from the file's current content (source bytes, or nothing)."""
        start = part * self.part_size
        base = b""
        if f.source is not None and start < min(f.source.size, f.size):
            base = await self.read_source(f.source, start, min(self.part_size, f.source.size - start, f.size - start))
        self._reserve(len(base))
        key = (f.ino, LOCAL, part)
        await self._with_room([part], len(base), _write_parts, [(self.path_of(key), base)], thread=True)
        self._add(key, len(base))

    async def _with_room(
        self, parts: Sequence[int], size: int, write: Callable[..., None], *args: Any, thread: bool = False
    ) -> None:
        """``write(*args)``, which writes ``size`` bytes into files of ``parts`` (in a worker thread if
        ``thread``). While their disk is full (ENOSPC), evict clean parts stored on it and try again; ENOSPC
        once none is left."""
        while True:
            try:
                if thread:
                    await trio.to_thread.run_sync(write, *args, limiter=self._disk)
                else:
                    write(*args)
                return
            except OSError as exc:
                if exc.errno != errno.ENOSPC or not self._evict_from_disk(parts, size):
                    raise

    def _evict_from_disk(self, parts: Sequence[int], size: int) -> bool:
        """Evict clean, unpinned parts on the disk(s) holding ``parts``, least recently used first, until
        ``size`` bytes (at least one part) are freed. Returns whether any part was evicted."""
        devices = {os.stat(self.targets[self.target_of(p)]).st_dev for p in parts}
        on_disk = {i for i, target in enumerate(self.targets) if os.stat(target).st_dev in devices}
        victims, freed = [], 0
        for key, part_size in self._lru.items():
            if freed >= max(size, 1):
                break
            if key[1] != LOCAL and key not in self._pins and self.target_of(key[2]) in on_disk:
                victims.append(key)
                freed += part_size
        with db.transaction(self.conn):
            for key in victims:
                self._drop(key)
        self.stats.evictions += len(victims)
        if victims:
            log.info("a cache disk is full: evicted %d clean parts (%d bytes)", len(victims), freed)
        return bool(victims)

    def _reserve(self, size: int) -> None:
        """Make room for ``size`` more bytes by evicting clean data; ENOSPC if dirty data fills the cache."""
        self._make_room(size)
        if self.used + size > self.capacity:
            raise OSError(errno.ENOSPC, "the cache is full of data not yet exported")

    def _resize(self, key: PartKey, size: int) -> None:
        self.used += size - self._lru[key]
        self._lru[key] = size
        self.conn.execute("UPDATE cache_parts SET size = ? WHERE ino = ? AND etag = ? AND part = ?", (size, *key))

    def truncate(self, f: FileData, size: int) -> None:
        """Cut the local parts of ``f`` to ``size`` bytes (clean data is clipped by the caller's src_limit)."""
        with db.transaction(self.conn):
            for key in [k for k in self._keys_of(f.ino, LOCAL) if k[2] * self.part_size >= size]:
                self._drop(key)
            key = (f.ino, LOCAL, size // self.part_size)
            within = size % self.part_size
            if key in self._lru and self._lru[key] > within:
                os.truncate(self.path_of(key), within)
                self._resize(key, within)

    async def sync(self, ino: int) -> None:
        """fsync the local parts of ``ino`` (in a worker thread)."""
        paths = [self.path_of(k) for k in self._keys_of(ino, LOCAL)]
        await trio.to_thread.run_sync(_fsync_all, paths, limiter=self._disk)

    def adopt(self, ino: int, old: ObjectVersion | None, new: ObjectVersion) -> None:
        """After an export: whole local parts, and old clean parts still valid, become clean parts of ``new``."""
        with db.transaction(self.conn):
            keys = self._keys_of(ino, LOCAL, old.etag if old else LOCAL)
            for key in sorted(keys, key=lambda k: k[1] != LOCAL):  # local data first: it is the newer data
                p = key[2]
                whole = min(self.part_size, new.size - p * self.part_size)
                valid = key[1] == LOCAL or (old is not None and p * self.part_size + self._lru[key] <= old.size)
                target = (ino, new.etag, p)
                if valid and whole > 0 and self._lru[key] == whole and target not in self._lru:
                    os.replace(self.path_of(key), self.path_of(target))
                    self.conn.execute(
                        "UPDATE cache_parts SET etag = ? WHERE ino = ? AND etag = ? AND part = ?", (new.etag, *key)
                    )
                    size = self._lru.pop(key)
                    self._by_ino[ino].discard(key)
                    self._index(target, size)
                    self._touched.discard(key)
                else:
                    self._drop(key)

    def drop_version(self, ino: int, etag: str) -> None:
        """Forget the cached data of one object version of ``ino`` (replaced by a newer one)."""
        self._discard_unwritten(self._unwritten_of(ino, etag))
        with db.transaction(self.conn):
            for key in self._keys_of(ino, etag):
                self._drop(key)

    def drop_inode(self, ino: int) -> None:
        """Forget every part of ``ino`` (the file is gone)."""
        self._discard_unwritten(self._unwritten_of(ino))
        with db.transaction(self.conn):
            for key in self._keys_of(ino):
                self._drop(key)

    def local_bytes(self) -> int:
        return sum(size for (_, etag, _), size in self._lru.items() if etag == LOCAL)

    # ----------------------------------------------------------------------------------------- HSM (lustrefs.hsm)

    def cached_bytes(self, ino: int, etag: str | None = None) -> int:
        """Bytes of ``ino`` in the cache: of object version ``etag`` and local data, or (None) of any version.
        Parts fetched and still being written to disk count."""
        on_disk = sum(self._lru[k] for k in self._keys_of(ino, *(() if etag is None else (etag, LOCAL))))
        return on_disk + sum(len(self._recent[k]) for k in self._unwritten_of(ino, etag))

    def _unwritten_of(self, ino: int, etag: str | None = None) -> list[PartKey]:
        """The parts of ``ino`` (of version ``etag``, if given) fetched and still being written to disk."""
        return [k for k in self._unwritten if k[0] == ino and etag in (None, k[1])]

    def _discard_unwritten(self, keys: list[PartKey]) -> int:
        """Make parts being written be dropped when written; returns their bytes."""
        freed = 0
        for key in keys:
            freed += len(self._recent[key])
            self._unwritten.discard(key)
            self._forget(key)
        return freed

    @property
    def writing(self) -> int:
        """Bytes of parts fetched and still being written to disk."""
        return sum(len(self._recent[k]) for k in self._unwritten)

    @property
    def held(self) -> int:
        """Bytes the cache holds: parts on disk and parts being written."""
        return self.used + self.writing

    def release(self, ino: int) -> int:
        """Drop the clean parts of ``ino`` except those being read; local data stays. Returns the bytes freed."""
        freed = self._discard_unwritten([k for k in self._unwritten_of(ino) if k not in self._pins])
        with db.transaction(self.conn):
            for key in self._keys_of(ino):
                if key[1] != LOCAL and key not in self._pins:
                    freed += self._lru[key]
                    self._drop(key)
        return freed

    async def fetch_all(self, obj: ObjectVersion, parts_at_once: int = 64) -> None:
        """Bring every part of ``obj`` into the cache, ``parts_at_once`` at a time (hsm_restore)."""
        parts = self._parts_of(0, obj.size) if obj.size else range(0)
        for i in range(0, len(parts), parts_at_once):
            await self._ensure(obj, list(parts[i : i + parts_at_once]))

    # ----------------------------------------------------------------------------------------- bookkeeping

    @contextlib.contextmanager
    def _pinned(self, keys: list[PartKey]) -> Iterator[None]:
        self._pins.update(keys)
        try:
            yield
        finally:
            self._pins.subtract(keys)
            for key in keys:
                if self._pins[key] <= 0:
                    del self._pins[key]

    def _index(self, key: PartKey, size: int) -> None:
        self._lru[key] = size
        self._by_ino.setdefault(key[0], set()).add(key)

    def _keys_of(self, ino: int, *etags: str) -> list[PartKey]:
        """The cached parts of ``ino`` (of the given versions only, if any)."""
        return [k for k in self._by_ino.get(ino, ()) if not etags or k[1] in etags]

    def _add(self, key: PartKey, size: int) -> None:
        self._clock += 1
        self._index(key, size)
        self.used += size
        self.conn.execute(
            "INSERT OR REPLACE INTO cache_parts (ino, etag, part, size, last_use) VALUES (?, ?, ?, ?, ?)",
            (*key, size, self._clock),
        )

    def _touch(self, key: PartKey) -> None:
        self._lru.move_to_end(key)
        self._touched.add(key)

    def _drop(self, key: PartKey) -> None:
        size = self._lru.pop(key, None)
        if size is not None:
            self.used -= size
            keys = self._by_ino[key[0]]
            keys.discard(key)
            if not keys:
                del self._by_ino[key[0]]
        self._touched.discard(key)
        self._unwritten.discard(key)
        self._forget(key)
        self.conn.execute("DELETE FROM cache_parts WHERE ino = ? AND etag = ? AND part = ?", key)
        self.path_of(key).unlink(missing_ok=True)

    def _make_room(self, size: int) -> None:
        """Evict least-recently-used unpinned parts until ``size`` more bytes fit (or nothing more can go)."""
        victims, excess = [], self.used + self._reserved + size - self.capacity
        for key, part_size in self._lru.items():
            if excess <= 0:
                break
            if key not in self._pins and key[1] != LOCAL:
                victims.append(key)
                excess -= part_size
        with db.transaction(self.conn):
            for key in victims:
                self._drop(key)
        self.stats.evictions += len(victims)

    def flush(self) -> None:
        """Persist the LRU order of parts read since the last flush."""
        if not self._touched:
            return
        order = {key: i for i, key in enumerate(self._lru)}
        base = self._clock
        with db.transaction(self.conn):
            self.conn.executemany(
                "UPDATE cache_parts SET last_use = ? WHERE ino = ? AND etag = ? AND part = ?",
                [(base + order[k] + 1, *k) for k in self._touched if k in order],
            )
        self._clock = base + len(order) + 1
        self._touched.clear()

    def usage_by_target(self) -> list[int]:
        """Bytes cached on each target."""
        out = [0] * len(self.targets)
        for (_, _, part), size in self._lru.items():
            out[self.target_of(part)] += size
        return out


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first leaf of a nursery's exception group (callers map one error to one errno)."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def _fsync_all(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if paths:
        for parent in {p.parent for p in paths}:
            fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


_ALIGN = 4096  # O_DIRECT alignment of buffers, offsets and lengths (covers 512- and 4096-byte sectors)
_DIRECT_MIN = 256 * 1024  # smaller parts go through the page cache: an O_DIRECT write waits for the device
_scratch = threading.local()  # per worker thread: an aligned buffer for O_DIRECT writes


def _write_parts(pieces: Sequence[tuple[Path, Buffer]], direct: bool = False) -> None:
    """Write each part via a temporary file and a rename, so a part file is whole or absent (worker thread).

    ``direct``: write the whole 4 KiB blocks of parts of 256 KiB or more with ``O_DIRECT`` (bypassing the page
    cache) where the file system supports it, the tail with a normal write. A failed write leaves no temporary
    file behind (on a full disk it would take the room the caller makes).
    """
    for path, data in pieces:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            done = _write_direct(fd, view) if direct and len(view) >= _DIRECT_MIN else 0
            while done < len(view):
                done += os.write(fd, view[done:])
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        os.replace(tmp, path)


def _pwrite(path: Path, data: Buffer, off: int) -> None:
    """Write all of ``data`` at ``off`` into an existing part file."""
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], off + done)
    finally:
        os.close(fd)


def _write_direct(fd: int, view: memoryview) -> int:
    """Write the whole aligned blocks of ``view`` at offset 0 with ``O_DIRECT``; the bytes written (0 if the
    file system refuses ``O_DIRECT``). Leaves ``fd`` without ``O_DIRECT``."""
    blocks = len(view) // _ALIGN * _ALIGN
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return 0
    buf = getattr(_scratch, "buf", None)
    if buf is None:
        buf = _scratch.buf = mmap.mmap(-1, 1024 * 1024)  # page-aligned, reused: no page faults per write
    done = 0
    try:
        while done < blocks:
            n = min(len(buf), blocks - done)
            buf[:n] = view[done : done + n]
            written = os.write(fd, memoryview(buf)[:n])
            done += written
            if written != n:
                break  # a short O_DIRECT write: the rest goes through the page cache
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        os.lseek(fd, done, os.SEEK_SET)  # O_DIRECT refused here (some file systems accept only the flag)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return done


def _pread(path: Path, lo: int, hi: int) -> bytes:
    """Bytes ``[lo, hi)`` of a part file (worker thread)."""
    with open(path, "rb") as f:
        return os.pread(f.fileno(), hi - lo, lo)


def _pread_cached(path: Path, lo: int, hi: int) -> bytearray | None:
    """Bytes ``[lo, hi)`` of a part file if the page cache holds all of them, else None: never waits for the
    disk (``RWF_NOWAIT``), so the trio thread may call it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(hi - lo)
        try:
            n = os.preadv(fd, [buf], lo, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:  # RWF_NOWAIT not supported here (tmpfs: EOPNOTSUPP): read in a worker thread
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return None
            raise
        return buf if n == len(buf) else None
    finally:
        os.close(fd)


def _will_need(paths: list[Path]) -> None:
    """Ask the kernel to read these part files into the page cache; it starts the reads and does not wait."""
    for path in paths:
        with contextlib.suppress(OSError):  # advice only: a part gone or a file system without it changes nothing
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)


def _joined(pieces: list[Buffer]) -> Buffer:
    """One buffer of ``pieces``, without a copy when there is only one."""
    pieces = [p for p in pieces if len(p)]
    if len(pieces) == 1:
        return pieces[0]
    return b"".join(pieces)
