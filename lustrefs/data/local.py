"""File data: reads of a ``FileData`` (local parts over the source object), the local parts of dirty files
(copy-on-write, truncate, fsync, adoption after an export), and forgetting a file's data.

Byte ``i`` of a file is read from its local part (etag ``LOCAL``) when there is one, else from the source object
below ``source.size``, else it is zero. A write copies only the touched parts' clean data into local parts
first; local parts are never evicted, and a write that finds no room for them gets ``ENOSPC``. After an export,
``adopt`` turns the parts that hold the new object's data into clean parts of it (a rename, no download).

Owns no state of its own: it combines the parts on disk (``DiskParts``) and the fetcher (``Fetcher``), and is
the one place that drops a file's parts on disk and in memory together. Await points: :meth:`LocalData.read`
(source parts being fetched or read), :meth:`LocalData.write` and :meth:`LocalData.materialize` (the source
data of a part, the first write of a local part in a worker thread), :meth:`LocalData.sync` (fsync in a worker
thread). Truncate, adopt, drop and release run to completion on the trio thread.
"""

from __future__ import annotations

from lustrefs.data.fetch import SMALL_READ, Fetcher
from lustrefs.data.model import Buffer, CacheStats, FileData, ObjectVersion, joined
from lustrefs.data.parts import DiskParts
from lustrefs.store.cacheparts import LOCAL


class LocalData:
    """Reads and writes of files' data, and the life cycle of their parts."""

    def __init__(self, disk: DiskParts, fetcher: Fetcher, stats: CacheStats) -> None:
        self.disk = disk
        self.fetcher = fetcher
        self.stats = stats
        self.part_size = disk.part_size

    # ----------------------------------------------------------------------------------------- reading

    async def read(self, f: FileData, off: int, length: int) -> Buffer:
        """``length`` bytes of file ``f`` at ``off`` (fewer at end of file), fetching missing source parts."""
        end = min(off + length, f.size)
        if off >= end:
            return b""
        self.stats.reads += 1
        self.stats.read_bytes += end - off
        if f.source is not None and end - off > SMALL_READ:
            self.fetcher.prefetch(f.source, off, min(end, f.source.size))  # concurrent runs, not one at a time
        pieces: list[Buffer] = []
        pos = off
        for p in self.disk.parts_of(off, end):
            start = p * self.part_size
            hi = min(end, start + self.part_size)
            if f.local and (f.ino, LOCAL, p) in self.disk:
                pieces.append(self.disk.read_padded((f.ino, LOCAL, p), pos - start, hi - start))
            elif f.source is not None and pos < f.source.size:
                src_hi = min(hi, f.source.size)
                pieces.append(await self.fetcher.read_source(f.source, pos, src_hi - pos))
                pieces.append(bytes(hi - src_hi))
            else:
                pieces.append(bytes(hi - pos))
            pos = hi
        return joined(pieces)

    # ----------------------------------------------------------------------------------------- local parts

    async def write(self, f: FileData, off: int, data: bytes) -> None:
        """Write ``data`` at ``off`` into local parts, copying only the touched parts' clean data first.

        Raises ``OSError(ENOSPC)`` when dirty data leaves no room. The kernel serialises writes to one inode.
        """
        end = off + len(data)
        for p in self.disk.parts_of(off, end):
            key = (f.ino, LOCAL, p)
            start = p * self.part_size
            if key not in self.disk:
                await self._materialize(f, p)
            lo, hi = max(off, start) - start, min(end, start + self.part_size) - start
            await self.disk.write_into(key, data[start + lo - off : start + hi - off], lo)

    async def materialize(self, f: FileData) -> None:
        """Copy every part of the file's content that is not local yet into local parts (its source object is
        about to be overwritten or deleted)."""
        for p in self.disk.parts_of(0, f.size) if f.size else range(0):
            if (f.ino, LOCAL, p) not in self.disk:
                await self._materialize(f, p)

    async def _materialize(self, f: FileData, part: int) -> None:
        """Create the local part ``part`` from the file's current content (source bytes, or nothing)."""
        start = part * self.part_size
        base: Buffer = b""
        if f.source is not None and start < min(f.source.size, f.size):
            size = min(self.part_size, f.source.size - start, f.size - start)
            base = await self.fetcher.read_source(f.source, start, size)
        self.disk.reserve(len(base))
        key = (f.ino, LOCAL, part)
        await self.disk.write_parts([(key, base)], len(base))
        self.disk.add(key, len(base))

    def truncate(self, f: FileData, size: int) -> None:
        """Cut the local parts of ``f`` to ``size`` bytes (clean data is clipped by the caller's src_limit)."""
        with self.disk.transaction():
            for key in [k for k in self.disk.keys_of(f.ino, LOCAL) if k[2] * self.part_size >= size]:
                self.disk.drop(key)
            self.disk.cut((f.ino, LOCAL, size // self.part_size), size % self.part_size)

    async def sync(self, ino: int) -> None:
        """fsync the local parts of ``ino`` (in a worker thread)."""
        await self.disk.sync(self.disk.keys_of(ino, LOCAL))

    def adopt(self, ino: int, old: ObjectVersion | None, new: ObjectVersion) -> None:
        """After an export: whole local parts, and old clean parts still valid, become clean parts of ``new``."""
        with self.disk.transaction():
            keys = self.disk.keys_of(ino, LOCAL, old.etag if old else LOCAL)
            for key in sorted(keys, key=lambda k: k[1] != LOCAL):  # local data first: it is the newer data
                p = key[2]
                size = self.disk.size(key)
                whole = min(self.part_size, new.size - p * self.part_size)
                valid = key[1] == LOCAL or (old is not None and p * self.part_size + size <= old.size)
                if valid and whole > 0 and size == whole and (ino, new.etag, p) not in self.disk:
                    self.disk.retag(key, new.etag)
                else:
                    self.disk.drop(key)

    # ----------------------------------------------------------------------------------------- forgetting

    def drop_version(self, ino: int, etag: str) -> None:
        """Forget the cached data of one object version of ``ino`` (replaced by a newer one)."""
        self.fetcher.discard_unwritten(self.fetcher.unwritten_of(ino, etag))
        self.disk.drop_all(ino, etag)

    def drop_inode(self, ino: int) -> None:
        """Forget every part of ``ino`` (the file is gone)."""
        self.fetcher.discard_unwritten(self.fetcher.unwritten_of(ino))
        self.disk.drop_all(ino)

    def release(self, ino: int) -> int:
        """Drop the clean parts of ``ino`` except those being read; local data stays. Returns the bytes freed."""
        unpinned = [k for k in self.fetcher.unwritten_of(ino) if not self.disk.is_pinned(k)]
        return self.fetcher.discard_unwritten(unpinned) + self.disk.release(ino)
