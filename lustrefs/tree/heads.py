"""The HEAD pool: reading each entry's POSIX metadata (``x-amz-meta-file-*``) from its object, once per version.

A listing gives names, sizes and ETags; the attributes need a HEAD per object. Entries are queued as they are
listed, and a bounded pool of workers HEADs them in the background; ``ensure`` of one entry (a lookup, getattr or
readdir entry) waits only for that entry, or issues its HEAD at once; a readdir page starts the HEADs of all its
entries at once (``start``). Concurrent callers share one HEAD. The attributes are stored with the ETag they
belong to (``meta_etag``), so each object version is HEADed once.

Await points: ``repo.head`` only. State: the in-flight HEADs and the queue (the trio thread's).
"""

from __future__ import annotations

import contextlib
import logging
import math
import stat
import time
from dataclasses import dataclass, field

import trio

from lustrefs import metadata
from lustrefs.errors import NoEntry
from lustrefs.events import EventLog
from lustrefs.s3.repository import AccessDenied, NotFound, ObjectInfo, ObjectStore, RepositoryError
from lustrefs.store.inodes import Inode, InodeStore

log = logging.getLogger(__name__)


@dataclass
class _Head:
    """A HEAD in flight for one inode; waiters read ``error`` after ``done`` is set."""

    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None


class MetadataLoader:
    """Applies objects' POSIX metadata to their inodes (``posix_metadata=off``: nothing is queued)."""

    def __init__(
        self,
        inodes: InodeStore,
        repo: ObjectStore,
        events: EventLog,
        enabled: bool = True,
        workers: int = 16,
        devices: bool = False,
    ) -> None:
        self.inodes = inodes
        self.devices = devices  # objects describing device nodes become devices (the mount is not nodev)
        self.repo = repo
        self.events = events
        self.enabled = enabled
        self.workers = workers
        self._heads: dict[int, _Head] = {}
        self._nursery: trio.Nursery | None = None  # hosts the workers and the HEADs of readdir pages
        self._send, self._recv = trio.open_memory_channel[int](math.inf)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until cancelled; entries left without metadata by an earlier run are queued first."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for _ in range(self.workers):
                    nursery.start_soon(self._worker)
                for ino in self.inodes.awaiting_head():
                    self._send.send_nowait(ino)
                task_status.started()
        finally:
            self._nursery = None

    def start(self, inos: list[int]) -> None:
        """HEAD these entries now, all at once (a readdir page; the endpoint limiter bounds the requests)."""
        if self.enabled and self._nursery is not None:
            for ino in inos:
                if ino not in self._heads:
                    self._nursery.start_soon(self._ensure_quietly, ino)

    def queue(self, ino: int) -> None:
        """HEAD ``ino`` in the background."""
        if self.enabled:
            self._send.send_nowait(ino)

    async def _worker(self) -> None:
        async for ino in self._recv:
            await self._ensure_quietly(ino)

    async def _ensure_quietly(self, ino: int) -> None:
        with contextlib.suppress(Exception):  # logged by ensure; the getattr that needs it tries again
            await self.ensure(ino)

    async def ensure(self, ino: int) -> None:
        """Apply the POSIX metadata of ``ino`` (one HEAD, shared by concurrent callers). Raises NoEntry."""
        head = self._heads.get(ino)
        if head is not None:
            await head.done.wait()
            if head.error is not None:
                raise head.error
            return
        row = self.inodes.find(ino)
        if row is None:
            raise NoEntry(ino)
        if row.meta_etag is not None:
            return
        head = self._heads[ino] = _Head()
        try:
            try:
                info = await self.repo.head(row.key)
            except NotFound:
                info = None
            except AccessDenied as exc:
                self.events.emit("ERROR", "S3AccessDenied", str(exc), key=row.key)
                info = None
            self.apply(row, info)
        except Exception as exc:
            if not isinstance(exc, RepositoryError):
                log.exception("metadata of %r", row.key)
            else:
                log.warning("metadata of %r: %s", row.key, exc)
            head.error = exc
            raise
        finally:
            del self._heads[ino]
            head.done.set()

    def apply(self, row: Inode, info: ObjectInfo | None) -> None:
        """Store the attributes from a HEAD (None: no object, e.g. an implied directory)."""
        is_dir = stat.S_ISDIR(row.mode)
        if info is None:
            # An implied directory, or a file deleted since it was listed: keep the listing's attributes.
            self.inodes.set_meta_implied(row.ino)
            return
        pm = metadata.from_user_metadata(info.metadata or {})
        mode, rdev = row.mode, 0
        if pm.mode is not None:
            kind = self._kind(row, pm, info)
            mode = kind | (pm.mode & 0o7777)
            rdev = (pm.rdev or 0) if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        mtime = pm.mtime_ns if pm.mtime_ns is not None else (row.mtime_ns if is_dir else info.mtime_ns)
        self.inodes.apply_meta(
            row.ino,
            mode=mode,
            rdev=rdev,
            owner=(pm.uid if pm.uid is not None else row.uid, pm.gid if pm.gid is not None else row.gid),
            mtime_ns=mtime,
            atime_ns=pm.atime_ns if pm.atime_ns is not None else mtime,
            size=0 if is_dir else info.size,
            etag=None if is_dir else info.etag,
            meta_etag=info.etag,
            ctime_ns=time.time_ns(),
        )

    def _kind(self, row: Inode, pm: metadata.PosixMeta, info: ObjectInfo) -> int:
        """The file type an object stands for: a key ending in '/' is a directory whatever the type bits say; a
        FIFO or socket is one if its zero-length object says so; a device only if the mount allows devices and
        its number is given, else it is imported as the regular file its object is (an event says why)."""
        assert pm.mode is not None
        wanted = stat.S_IFMT(pm.mode)
        if stat.S_ISDIR(row.mode):
            return stat.S_IFDIR
        if wanted == stat.S_IFLNK or (wanted in (stat.S_IFIFO, stat.S_IFSOCK) and info.size == 0):
            return wanted
        if wanted in (stat.S_IFCHR, stat.S_IFBLK) and info.size == 0:
            if self.devices and pm.rdev is not None:
                return wanted
            why = "the mount does not allow devices (nodev)" if not self.devices else "it has no x-amz-meta-file-rdev"
            self.events.emit(
                "WARN",
                "S3ObjectDeviceNotCreated",
                f"S3 object {info.key} describes a device node; it is imported as a regular file because {why}.",
                key=info.key,
            )
        return stat.S_IFREG
