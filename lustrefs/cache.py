"""The local data cache: object data in parts, striped over cache targets, bounded, LRU-evicted.

Data of one object version is cut into parts of ``part_size`` bytes (a part never spans two chunks, since the
chunk size, ``ImportedFileChunkSize``, is a whole number of parts). Chunk N of a file lives on cache target
N mod (number of targets) — the local striped cache. Each part is one file, written under a temporary name
and renamed into place, so a half-written part never looks present; a part file whose size is not the
recorded one is treated as missing. The index (``cache_parts``) is in SQLite and survives a restart.
Concurrent readers of a missing part share one download; parts being read are pinned against eviction.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from . import db
from .repository import Repository, RepositoryError

log = logging.getLogger(__name__)

PartKey = tuple[int, str, int]  # (ino, etag, part index)


@dataclass(frozen=True)
class ObjectVersion:
    """What a read is pinned to: one version (ETag) of one object."""

    ino: int
    key: str
    etag: str
    size: int


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


class Cache:
    """Bounded on-disk cache of object data. Owned by the trio thread; disk writes go to worker threads."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        repo: Repository,
        targets: list[Path],
        capacity: int,
        chunk_size: int,
        part_size: int,
        max_get: int = 8 * 1024 * 1024,
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
        self._clock = 0
        self._touched: set[PartKey] = set()
        self._pins: collections.Counter[PartKey] = collections.Counter()
        self._fetches: dict[PartKey, _Fetch] = {}
        self.max_get = max_get  # bytes one ranged GET may cover (several parts)
        self._disk = trio.CapacityLimiter(4)
        self._nursery: trio.Nursery | None = None

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
            self._lru[key] = size
            self._clock = max(self._clock, last_use)
            indexed[self.path_of(key)] = key
        for target in self.targets:
            for sub in target.glob("[0-9a-f][0-9a-f]"):
                for path in sub.iterdir():
                    if path not in indexed:
                        path.unlink(missing_ok=True)  # orphan or temporary file from a crash
        for path, key in indexed.items():
            try:
                ok = path.stat().st_size == self._lru[key]
            except FileNotFoundError:
                ok = False
            if not ok:
                self._drop(key)
        self.used = sum(self._lru.values())

    # ----------------------------------------------------------------------------------------- reading

    def _parts(self, obj: ObjectVersion, off: int, end: int) -> range:
        return range(off // self.part_size, (end - 1) // self.part_size + 1)

    async def read(self, obj: ObjectVersion, off: int, length: int) -> bytes:
        """``length`` bytes of ``obj`` at ``off`` (fewer at end of file), fetching missing parts."""
        end = min(off + length, obj.size)
        if off >= end:
            return b""
        keys = [(obj.ino, obj.etag, p) for p in self._parts(obj, off, end)]
        with self._pinned(keys):
            missing = [k for k in keys if k not in self._lru]
            self.stats.hits += len(keys) - len(missing)
            if missing:
                await self._ensure(obj, [k[2] for k in missing])
            out = bytearray()
            for key in keys:
                start = key[2] * self.part_size
                lo, hi = max(off, start) - start, min(end, start + self._lru[key]) - start
                out += await self._read_part(obj, key, lo, hi)
                self._touch(key)
        return bytes(out)

    def prefetch(self, obj: ObjectVersion, off: int, end: int) -> None:
        """Start fetching ``[off, end)`` of ``obj`` in the background (parts not present or in flight)."""
        end = min(end, obj.size)
        if off >= end or self._nursery is None:
            return
        for run in self._runs(obj, self._absent(obj, self._parts(obj, off, end))):
            self._nursery.start_soon(self._prefetch_run, obj, run, self._register(obj, run))

    async def _prefetch_run(self, obj: ObjectVersion, run: list[int], fetch: _Fetch) -> None:
        try:
            await self._fetch_run(obj, run, fetch)
        except Exception as exc:  # the reader that needs the data fetches it again and reports the error
            log.debug("prefetch of %s parts %s failed: %s", obj.key, run, exc)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host background prefetches until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def _read_part(self, obj: ObjectVersion, key: PartKey, lo: int, hi: int) -> bytes:
        try:
            with open(self.path_of(key), "rb") as f:
                data = os.pread(f.fileno(), hi - lo, lo)
            if len(data) == hi - lo:
                return data
        except FileNotFoundError:
            pass
        log.warning("cache part %s was missing or short on disk; fetching it again", key)
        self._drop(key)
        await self._ensure(obj, [key[2]])
        with open(self.path_of(key), "rb") as f:
            return os.pread(f.fileno(), hi - lo, lo)

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
        return [
            p for p in parts if (obj.ino, obj.etag, p) not in self._lru and (obj.ino, obj.etag, p) not in self._fetches
        ]

    def _register(self, obj: ObjectVersion, run: list[int]) -> _Fetch:
        """Mark ``run`` as being fetched, before any await, so no one else starts fetching it."""
        fetch = _Fetch()
        for p in run:
            self._fetches[(obj.ino, obj.etag, p)] = fetch
        return fetch

    async def _ensure(self, obj: ObjectVersion, parts: list[int]) -> None:
        """Make ``parts`` present: wait for those in flight, fetch the others in runs, concurrently."""
        waits = {id(f): f for p in parts if (f := self._fetches.get((obj.ino, obj.etag, p))) is not None}
        runs = [(run, self._register(obj, run)) for run in self._runs(obj, self._absent(obj, parts))]
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
        """Fetch contiguous parts, registered as ``fetch``, with one ranged GET."""
        keys = [(obj.ino, obj.etag, p) for p in run]
        try:
            start = run[0] * self.part_size
            end = min((run[-1] + 1) * self.part_size, obj.size)
            data = await self.repo.get_range(obj.key, obj.etag, start, end)
            self.stats.misses += len(run)
            self.stats.bytes_fetched += len(data)
            self._make_room(len(data))
            pieces = [
                (self.path_of(k), data[i * self.part_size : (i + 1) * self.part_size]) for i, k in enumerate(keys)
            ]
            await trio.to_thread.run_sync(_write_parts, pieces, limiter=self._disk)
            with db.transaction(self.conn):
                for key, (_, piece) in zip(keys, pieces, strict=True):
                    self._add(key, len(piece))
        except BaseException as exc:
            fetch.error = exc if isinstance(exc, Exception) else RepositoryError("fetch cancelled")
            raise
        finally:
            for key in keys:
                if self._fetches.get(key) is fetch:
                    del self._fetches[key]
            fetch.done.set()

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

    def _add(self, key: PartKey, size: int) -> None:
        self._clock += 1
        self._lru[key] = size
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
        self._touched.discard(key)
        self.conn.execute("DELETE FROM cache_parts WHERE ino = ? AND etag = ? AND part = ?", key)
        self.path_of(key).unlink(missing_ok=True)

    def _make_room(self, size: int) -> None:
        """Evict least-recently-used unpinned parts until ``size`` more bytes fit (or nothing more can go)."""
        victims, excess = [], self.used + size - self.capacity
        for key, part_size in self._lru.items():
            if excess <= 0:
                break
            if key not in self._pins:
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


def _write_parts(pieces: list[tuple[Path, bytes]]) -> None:
    """Write each part via a temporary file and a rename, so a part file is whole or absent (worker thread)."""
    for path, data in pieces:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
