"""Fetching object data into the cache: single-flight ranged GETs of runs of parts, and recent parts in memory.

Concurrent readers of a missing part share one download (``_fetches``: part -> the fetch in flight, registered
before any await); parts being read are pinned against eviction. A small read (a random reader) into a part
nobody fetches gets its own exact GET; the whole part is fetched only when a second small read lands in it
(``_read_directly``). Missing parts are fetched in contiguous runs of at most ``max_get`` bytes, one GET each,
concurrently. Fetched data is served from memory first: the parts of recent GETs stay in a bounded in-memory set
(``_recent``, ``recent_bytes``) from the moment the GET returns, so readers never wait for the disk write nor read
the part back; those not yet on disk (``_unwritten``) are not indexed and stay in memory until written. Clean
parts of 256 KiB or more are written with ``O_DIRECT`` where the file system allows it, in a worker thread (the
FUSE file's pages already hold the data); smaller runs (small files) are written on the trio thread, cheaper than
a thread hop. The read-ahead warms the parts ahead of a reader that are on disk with ``POSIX_FADV_WILLNEED``.

Owns: ``_fetches``, ``_recent``, ``_unwritten``, ``_read_directly``, the prefetch nursery. The parts on disk, their
pins and the room for a fetch are ``DiskParts``'s. Await points: :meth:`Fetcher.read_source` (a direct GET, waiting
for fetches, reading parts from disk), :meth:`Fetcher.fetch_all`, :meth:`Fetcher.run` (hosts the background
fetches), and inside a fetch the GET and the disk write.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

import cachetools
import trio

from lustrefs.data import diskio
from lustrefs.data.model import Buffer, CacheStats, ObjectVersion, first_error, joined
from lustrefs.data.parts import DiskParts
from lustrefs.s3.repository import ObjectStore, RepositoryError
from lustrefs.store.cacheparts import PartKey

log = logging.getLogger(__name__)

SMALL_READ = 128 * 1024  # reads up to this size into an absent part get their own exact GET
DIRECT_MEMORY = 65_536  # parts remembered as read by a small GET (the second one there caches the part)


@dataclass
class _Fetch:
    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None


class Fetcher:
    """Single-flight fetches of object parts, the in-memory set of recent parts, and reads of object versions."""

    def __init__(self, disk: DiskParts, repo: ObjectStore, stats: CacheStats, max_get: int, recent_bytes: int) -> None:
        self.disk = disk
        self.repo = repo
        self.stats = stats
        self.part_size = disk.part_size
        self.max_get = max_get  # bytes one ranged GET may cover (several parts)
        self.recent_bytes = recent_bytes
        self._fetches: dict[PartKey, _Fetch] = {}
        self._nursery: trio.Nursery | None = None
        # Parts of recent GETs, served from memory. Those not yet written to disk (_unwritten) are not indexed
        # and stay here until written; the others are dropped oldest first beyond recent_bytes.
        self._recent: collections.OrderedDict[PartKey, memoryview] = collections.OrderedDict()
        self._recent_size = 0
        self._unwritten: set[PartKey] = set()
        # Parts a small read got its own GET in: a second small read there fetches the whole part.
        self._read_directly: cachetools.LRUCache[PartKey, bool] = cachetools.LRUCache(maxsize=DIRECT_MEMORY)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host background prefetches until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    # ----------------------------------------------------------------------------------------- reading

    def _available(self, key: PartKey) -> bool:
        """Whether ``key`` can be read now, from memory or from disk."""
        return key in self.disk or key in self._recent

    async def read_source(self, obj: ObjectVersion, off: int, length: int) -> Buffer:
        """``length`` bytes of the object version ``obj`` at ``off``, fetching missing parts."""
        end = min(off + length, obj.size)
        if off >= end:
            return b""
        keys = [(obj.ino, obj.etag, p) for p in self.disk.parts_of(off, end)]
        nobody_has_it = all(not self._available(k) and k not in self._fetches for k in keys)
        part_bytes = min(self.part_size, obj.size - keys[0][2] * self.part_size)
        if self._nursery is not None and end - off <= SMALL_READ < part_bytes and nobody_has_it:
            # A small read nobody is fetching yet: answer it with its own small GET now (first-byte
            # latency), then bring the whole part into the cache in the background (started after the small
            # GET, so that the two do not compete for the endpoint and the CPU).
            self.stats.misses += len(keys)
            self.stats.direct_reads += 1
            data = await self.repo.get_range(obj.key, obj.etag, off, end)
            if any(k in self._read_directly for k in keys):
                self.prefetch(obj, off, end)  # read there before: a hot part, worth its GET
            else:  # a random reader costs one small GET, not a whole part competing with its next read
                self._read_directly.update(dict.fromkeys(keys, True))
            return data
        with self.disk.pinned(keys):
            missing = [k for k in keys if not self._available(k)]
            self.stats.hits += len(keys) - len(missing)
            self.stats.misses += len(missing)
            if missing:
                await self._ensure(obj, [k[2] for k in missing])
            pieces = []
            for key in keys:
                start = key[2] * self.part_size
                pieces.append(await self._read_part(obj, key, max(off, start) - start, end - start))
        return joined(pieces)

    def prefetch(self, obj: ObjectVersion, off: int, end: int) -> None:
        """Start fetching ``[off, end)`` of ``obj`` in the background (parts not present or in flight)."""
        end = min(end, obj.size)
        if off >= end or self._nursery is None:
            return
        for run in self._runs(self._absent(obj, self.disk.parts_of(off, end))):
            self._nursery.start_soon(self._prefetch_run, obj, run, self._register(obj, run))

    def warm(self, obj: ObjectVersion, off: int, end: int) -> None:
        """Start reading the parts of ``[off, end)`` that are on disk (not in memory) into the page cache."""
        keys = [(obj.ino, obj.etag, p) for p in self.disk.parts_of(off, min(end, obj.size))] if off < end else []
        self.disk.warm([k for k in keys if k not in self._recent])

    async def fetch_all(self, obj: ObjectVersion, parts_at_once: int = 64) -> None:
        """Bring every part of ``obj`` into the cache, ``parts_at_once`` at a time (hsm_restore)."""
        parts = self.disk.parts_of(0, obj.size) if obj.size else range(0)
        for i in range(0, len(parts), parts_at_once):
            await self._ensure(obj, list(parts[i : i + parts_at_once]))

    async def _read_part(self, obj: ObjectVersion, key: PartKey, lo: int, hi: int) -> Buffer:
        """Bytes ``[lo, hi)`` of part ``key`` (``hi`` is clipped to the part), from memory or disk."""
        for _ in range(3):
            piece = self._recent.get(key)
            if piece is not None:
                self._recent.move_to_end(key)
                self.stats.memory_hits += 1
                self.disk.touch(key)
                return piece[lo:hi]
            if key in self.disk:
                data = await self.disk.read(key, lo, hi)
                if data is not None:
                    return data
            await self._ensure(obj, [key[2]])
        raise RepositoryError(f"part {key[2]} of {obj.key} could not be kept in the cache")

    # ----------------------------------------------------------------------------------------- fetching

    def _runs(self, parts: list[int]) -> list[list[int]]:
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
        runs = [(run, self._register(obj, run)) for run in self._runs(self._absent(obj, parts))]
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

    async def _prefetch_run(self, obj: ObjectVersion, run: list[int], fetch: _Fetch) -> None:
        try:
            await self._fetch_run(obj, run, fetch)
        except Exception as exc:  # the reader that needs the data fetches it again and reports the error
            log.debug("prefetch of %s parts %s failed: %s", obj.key, run, exc)

    async def _fetch_run(self, obj: ObjectVersion, run: list[int], fetch: _Fetch) -> None:
        """Fetch contiguous parts, registered as ``fetch``, with one ranged GET; readers get them from memory
        as soon as the GET returns, and they are written to disk after that."""
        keys = [(obj.ino, obj.etag, p) for p in run]
        start = run[0] * self.part_size
        end = min((run[-1] + 1) * self.part_size, obj.size)
        kept = False  # the parts stay readable: indexed on disk, or in memory only when the disk refused them
        with self.disk.in_flight(end - start):  # counted until indexed
            try:
                try:
                    self.disk.make_room(0)  # room for what in_flight counts, the run itself, not twice that
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
                large = end - start >= diskio.DIRECT_MIN  # small file: a page-cache write costs less than a thread hop
                writes = list(zip(keys, pieces, strict=True))
                try:
                    await self.disk.write_parts(writes, end - start, direct=large, thread=large)
                except OSError as exc:  # served from memory until trimmed, fetched again after that
                    log.warning("could not write parts %s of %s to the cache: %s", run, obj.key, exc)
                    for key in keys:
                        if key not in self.disk:  # those of the run written before the failure
                            self.disk.remove_file(key)
                    kept = True
                    return
                with self.disk.transaction():
                    for key, piece in writes:
                        if key in self._unwritten:
                            self.disk.add(key, len(piece))
                        else:  # released or dropped while it was being written
                            self.disk.remove_file(key)
                kept = True
            finally:
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

    # ----------------------------------------------------------------------------------------- memory

    def _remember(self, key: PartKey, piece: memoryview) -> None:
        self._forget(key)
        self._recent[key] = piece
        self._recent_size += len(piece)

    def _forget(self, key: PartKey) -> None:
        piece = self._recent.pop(key, None)
        if piece is not None:
            self._recent_size -= len(piece)

    def forget(self, key: PartKey) -> None:
        """Drop ``key`` from memory, and from disk once written (a part dropped: ``DiskParts.on_drop``)."""
        self._unwritten.discard(key)
        self._forget(key)

    def _trim_recent(self) -> None:
        """Drop the oldest written, unpinned parts from memory beyond ``recent_bytes``."""
        excess, victims = self._recent_size - self.recent_bytes, []
        for key, piece in self._recent.items():
            if excess <= 0:
                break
            if key not in self._unwritten and not self.disk.is_pinned(key):
                victims.append(key)
                excess -= len(piece)
        for key in victims:
            self._forget(key)

    def unwritten_of(self, ino: int, etag: str | None = None) -> list[PartKey]:
        """The parts of ``ino`` (of version ``etag``, if given) fetched and still being written to disk."""
        return [k for k in self._unwritten if k[0] == ino and etag in (None, k[1])]

    def unwritten_bytes(self, ino: int, etag: str | None = None) -> int:
        """Bytes of :meth:`unwritten_of`."""
        return sum(len(self._recent[k]) for k in self.unwritten_of(ino, etag))

    def discard_unwritten(self, keys: list[PartKey]) -> int:
        """Make parts being written be dropped when written; returns their bytes."""
        freed = 0
        for key in keys:
            freed += len(self._recent[key])
            self.forget(key)
        return freed

    @property
    def writing(self) -> int:
        """Bytes of parts fetched and still being written to disk."""
        return sum(len(self._recent[k]) for k in self._unwritten)
