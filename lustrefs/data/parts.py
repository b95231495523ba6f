"""The parts on disk: layout, index, LRU order, pins, capacity and eviction, and every part file.

Data of one object version is cut into parts of ``part_size`` bytes (a part never spans two chunks, since the
chunk size, ``ImportedFileChunkSize``, is a whole number of parts). Chunk N of a file lives on cache target
N mod (number of targets) — the local striped cache. Each part is one file, written under a temporary name
and renamed into place, so a half-written part never looks present; a part file whose size is not the
recorded one is treated as missing. The index (``cache_parts``, through ``CachePartStore``: this module is its
only user in the daemon) is in SQLite and survives a restart; the LRU order is kept in memory and persisted by
:meth:`DiskParts.flush`. A target disk that fills up before the capacity is reached (ENOSPC) makes room by
evicting the clean parts stored on it. Pinned parts (being read) are never evicted; local parts (etag
``LOCAL``) are never evicted either.

Owns: ``_lru`` (part -> size, least recently used first), ``_by_ino``, ``used``, the pins, the bytes reserved by
fetches in flight, the LRU clock, the part files and their rows. Await points: :meth:`DiskParts.read` (a read in
a worker thread when the page cache does not hold the range), :meth:`DiskParts.write_parts` and
:meth:`DiskParts.write_into` (whole-part writes in a worker thread when asked), :meth:`DiskParts.sync`. Every
other method runs to completion on the trio thread. A part dropped here is reported to ``on_drop`` (the
fetcher forgets its copy in memory).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import trio

from lustrefs.data import diskio
from lustrefs.data.model import Buffer, CacheStats
from lustrefs.store import db
from lustrefs.store.cacheparts import LOCAL, CachePartStore, PartKey

log = logging.getLogger(__name__)


class DiskParts:
    """The bounded, LRU-ordered set of part files over the cache targets, and their index."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        targets: list[Path],
        capacity: int,
        chunk_size: int,
        part_size: int,
        stats: CacheStats,
    ) -> None:
        if chunk_size % part_size:
            raise ValueError("the chunk size must be a multiple of the part size")
        self.targets = targets
        self.capacity = capacity
        self.chunk_size = chunk_size
        self.part_size = part_size
        self.stats = stats
        self.used = 0
        self.on_drop: Callable[[PartKey], None] = lambda key: None  # told of every part dropped
        self._conn = conn
        self._rows = CachePartStore(conn)  # the index on disk; _lru and _by_ino mirror it in memory
        self._lru: collections.OrderedDict[PartKey, int] = collections.OrderedDict()  # part -> size
        self._by_ino: dict[int, set[PartKey]] = {}  # the parts of each inode (per-file work never scans _lru)
        self._clock = 0
        self._touched: set[PartKey] = set()
        self._pins: collections.Counter[PartKey] = collections.Counter()
        self._reserved = 0  # bytes of fetches in flight
        self._disk = trio.CapacityLimiter(4)

    # ----------------------------------------------------------------------------------------- layout

    def target_of(self, part: int) -> int:
        """The cache target holding ``part``: its chunk number modulo the number of targets."""
        return (part * self.part_size // self.chunk_size) % len(self.targets)

    def path_of(self, key: PartKey) -> Path:
        ino, etag, part = key
        version = hashlib.sha1(etag.encode()).hexdigest()[:16]
        return self.targets[self.target_of(part)] / f"{ino % 256:02x}" / f"{ino}.{version}.{part}"

    def parts_of(self, off: int, end: int) -> range:
        """The part numbers covering bytes ``[off, end)`` (``end > off``)."""
        return range(off // self.part_size, (end - 1) // self.part_size + 1)

    # ----------------------------------------------------------------------------------------- start-up

    def load(self) -> None:
        """Load the index and make disk and index agree (drop files without rows and rows without files)."""
        indexed: dict[Path, PartKey] = {}
        for key, size, last_use in self._rows.all():
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
                self.drop(key)
        self.used = sum(self._lru.values())

    # ----------------------------------------------------------------------------------------- queries

    def __contains__(self, key: PartKey) -> bool:
        return key in self._lru

    def __iter__(self) -> Iterator[PartKey]:
        """Every indexed part, least recently used first (a snapshot)."""
        return iter(list(self._lru))

    def size(self, key: PartKey) -> int:
        return self._lru[key]

    def keys_of(self, ino: int, *etags: str) -> list[PartKey]:
        """The cached parts of ``ino`` (of the given versions only, if any)."""
        return [k for k in self._by_ino.get(ino, ()) if not etags or k[1] in etags]

    def bytes_of(self, ino: int, *etags: str) -> int:
        """Bytes on disk of ``ino`` (of the given versions only, if any)."""
        return sum(self._lru[k] for k in self.keys_of(ino, *etags))

    def inodes_with_clean_parts(self) -> list[int]:
        """Files with fetched data of an object version in the cache."""
        return sorted({ino for ino, keys in self._by_ino.items() if any(k[1] != LOCAL for k in keys)})

    def local_bytes(self) -> int:
        return sum(size for (_, etag, _), size in self._lru.items() if etag == LOCAL)

    def usage_by_target(self) -> list[int]:
        """Bytes cached on each target."""
        out = [0] * len(self.targets)
        for (_, _, part), size in self._lru.items():
            out[self.target_of(part)] += size
        return out

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One SQLite transaction around several index changes (nested uses join the outer one)."""
        return db.transaction(self._conn)

    # ----------------------------------------------------------------------------------------- pins, room

    @contextlib.contextmanager
    def pinned(self, keys: list[PartKey]) -> Iterator[None]:
        """Keep ``keys`` from eviction (and from release) while the block runs."""
        self._pins.update(keys)
        try:
            yield
        finally:
            self._pins.subtract(keys)
            for key in keys:
                if self._pins[key] <= 0:
                    del self._pins[key]

    def is_pinned(self, key: PartKey) -> bool:
        return key in self._pins

    @contextlib.contextmanager
    def in_flight(self, size: int) -> Iterator[None]:
        """Count ``size`` bytes of a fetch as used while the block runs, so concurrent fetches cannot overfill."""
        self._reserved += size
        try:
            yield
        finally:
            self._reserved -= size

    def make_room(self, size: int) -> None:
        """Evict least-recently-used unpinned parts until ``size`` more bytes fit (or nothing more can go)."""
        victims, excess = [], self.used + self._reserved + size - self.capacity
        for key, part_size in self._lru.items():
            if excess <= 0:
                break
            if key not in self._pins and key[1] != LOCAL:
                victims.append(key)
                excess -= part_size
        with self.transaction():
            for key in victims:
                self.drop(key)
        self.stats.evictions += len(victims)

    def reserve(self, size: int) -> None:
        """Make room for ``size`` more bytes by evicting clean data; ENOSPC if dirty data fills the cache."""
        self.make_room(size)
        if self.used + size > self.capacity:
            raise OSError(errno.ENOSPC, "the cache is full of data not yet exported")

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
        with self.transaction():
            for key in victims:
                self.drop(key)
        self.stats.evictions += len(victims)
        if victims:
            log.info("a cache disk is full: evicted %d clean parts (%d bytes)", len(victims), freed)
        return bool(victims)

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

    # ----------------------------------------------------------------------------------------- part files

    async def read(self, key: PartKey, lo: int, hi: int) -> Buffer | None:
        """Bytes ``[lo, hi)`` of the indexed part ``key`` (``hi`` clipped to it), made most recently used; None
        when its file is missing or short, which drops it."""
        hi = min(hi, self._lru[key])
        self.touch(key)
        with contextlib.suppress(FileNotFoundError):
            data = diskio.pread_cached(self.path_of(key), lo, hi)  # no thread hop when the page cache has it
            if data is None:
                data = await trio.to_thread.run_sync(diskio.pread, self.path_of(key), lo, hi, limiter=self._disk)
            if len(data) == hi - lo:
                return data
        log.warning("cache part %s was missing or short on disk; fetching it again", key)
        self.drop(key)
        return None

    def read_padded(self, key: PartKey, lo: int, hi: int) -> bytes:
        """Bytes ``[lo, hi)`` of a local part on the trio thread, zeros past the end of its file."""
        with open(self.path_of(key), "rb") as f:
            data = os.pread(f.fileno(), hi - lo, lo)
        return data + bytes(hi - lo - len(data))

    def warm(self, keys: list[PartKey]) -> None:
        """Start reading the indexed parts among ``keys`` into the page cache (no waiting)."""
        diskio.will_need([self.path_of(k) for k in keys if k in self._lru])

    async def write_parts(
        self, pieces: list[tuple[PartKey, Buffer]], size: int, *, direct: bool = False, thread: bool = True
    ) -> None:
        """Write whole part files (not indexed: see :meth:`add`) of ``size`` bytes in all, making room on a full
        disk; in a worker thread if ``thread``, with ``O_DIRECT`` if ``direct``."""
        writes = [(self.path_of(k), data) for k, data in pieces]
        await self._with_room([k[2] for k, _ in pieces], size, diskio.write_parts, writes, direct, thread=thread)

    async def write_into(self, key: PartKey, data: Buffer, lo: int) -> None:
        """Write ``data`` at ``lo`` into the indexed part ``key`` on the trio thread; its growth is reserved
        first (ENOSPC when dirty data fills the cache) and indexed after."""
        hi = lo + len(data)
        growth = max(0, hi - self._lru[key])
        if growth:
            self.reserve(growth)
        path = self.path_of(key)
        try:
            await self._with_room([key[2]], growth, diskio.pwrite, path, data, lo)
        except OSError:
            if growth:
                os.truncate(path, self._lru[key])  # what the failed write appended is neither data nor counted
            raise
        if growth:
            self._resize(key, hi)

    def cut(self, key: PartKey, size: int) -> None:
        """Truncate the indexed part ``key`` to ``size`` bytes if it is longer."""
        if key in self._lru and self._lru[key] > size:
            os.truncate(self.path_of(key), size)
            self._resize(key, size)

    def retag(self, key: PartKey, etag: str) -> None:
        """The part ``key`` becomes the same part of version ``etag``: its file and row are renamed."""
        target = (key[0], etag, key[2])
        os.replace(self.path_of(key), self.path_of(target))
        self._rows.retag(key, etag)
        size = self._lru.pop(key)
        self._by_ino[key[0]].discard(key)
        self._index(target, size)
        self._touched.discard(key)

    def remove_file(self, key: PartKey) -> None:
        """Remove the file of a part that is not kept (written, then released or refused)."""
        self.path_of(key).unlink(missing_ok=True)

    async def sync(self, keys: list[PartKey]) -> None:
        """fsync the files of ``keys`` and their directories (in a worker thread)."""
        paths = [self.path_of(k) for k in keys]
        await trio.to_thread.run_sync(diskio.fsync_all, paths, limiter=self._disk)

    # ----------------------------------------------------------------------------------------- bookkeeping

    def _index(self, key: PartKey, size: int) -> None:
        self._lru[key] = size
        self._by_ino.setdefault(key[0], set()).add(key)

    def add(self, key: PartKey, size: int) -> None:
        """Index the part written at ``key`` as the most recently used."""
        self._clock += 1
        self._index(key, size)
        self.used += size
        self._rows.add(key, size, self._clock)

    def _resize(self, key: PartKey, size: int) -> None:
        self.used += size - self._lru[key]
        self._lru[key] = size
        self._rows.resize(key, size)

    def touch(self, key: PartKey) -> None:
        """Make the part ``key``, if indexed, the most recently used."""
        if key in self._lru:
            self._lru.move_to_end(key)
            self._touched.add(key)

    def drop(self, key: PartKey) -> None:
        """Forget the part ``key``: its row, its file, and (through ``on_drop``) its copy in memory."""
        size = self._lru.pop(key, None)
        if size is not None:
            self.used -= size
            keys = self._by_ino[key[0]]
            keys.discard(key)
            if not keys:
                del self._by_ino[key[0]]
        self._touched.discard(key)
        self.on_drop(key)
        self._rows.remove(key)
        self.path_of(key).unlink(missing_ok=True)

    def drop_all(self, ino: int, *etags: str) -> None:
        """Drop every part of ``ino`` (of the given versions only, if any), in one transaction."""
        with self.transaction():
            for key in self.keys_of(ino, *etags):
                self.drop(key)

    def release(self, ino: int) -> int:
        """Drop the clean, unpinned parts of ``ino``; returns their bytes."""
        freed = 0
        with self.transaction():
            for key in self.keys_of(ino):
                if key[1] != LOCAL and key not in self._pins:
                    freed += self._lru[key]
                    self.drop(key)
        return freed

    def flush(self) -> None:
        """Persist the LRU order of parts read since the last flush."""
        if not self._touched:
            return
        order = {key: i for i, key in enumerate(self._lru)}
        base = self._clock
        with self.transaction():
            self._rows.set_last_use([(k, base + order[k] + 1) for k in self._touched if k in order])
        self._clock = base + len(order) + 1
        self._touched.clear()
