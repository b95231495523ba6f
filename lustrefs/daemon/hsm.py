"""HSM state and actions of files, as Lustre's ``lfs hsm_*`` commands show and request them on FSx.

States follow FSx: an imported file not read yet is ``released exists archived``; once any of its data is
cached, ``exists archived``; changed locally, ``exists dirty archived`` (``exists dirty`` for a new file
never exported); exported again, ``exists archived``. ``archive`` exports a file now and waits for it,
``release`` drops the cached data of a clean archived file, ``restore`` fetches a file's data in the
background. This is the daemon's side; the CLI's (requests through the mount, ``lfs`` output) is
lustrefs.client.hsm.
"""

from __future__ import annotations

import errno
import logging
import stat
from typing import TYPE_CHECKING, Any

import trio

from lustrefs.constants import HS_ARCHIVED, HS_DIRTY, HS_EXISTS, HS_RELEASED
from lustrefs.data.cache import ObjectVersion, first_error
from lustrefs.s3.repository import VersionChanged
from lustrefs.store.inodes import Inode

if TYPE_CHECKING:

    from lustrefs.data.cache import Cache
    from lustrefs.sync.exporter import Writeback
    from lustrefs.tree.namespace import Namespace

log = logging.getLogger(__name__)

ARCHIVE_ID = 1  # FSx shows archive_id:1 for every file with a copy in S3
MAX_ARCHIVE_ATTEMPTS = 3  # an archive retried while the file keeps changing under it
RESTORES_AT_ONCE = 8
ARCHIVE_ERRNO = {"ResourceBusy": errno.EBUSY, "PathSizeTooLong": errno.ENAMETOOLONG, "FileSizeTooLarge": errno.EFBIG}


class ActionError(Exception):
    """An action requested through the mount that failed: the errno to answer, FSx's code, a message."""

    def __init__(self, err: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.errno = err
        self.code = code
        self.message = message


def flags_of(row: Inode, cached: int) -> int:
    """The HSM flags of an inode row; ``cached`` is how many bytes of its current data are in the cache."""
    is_dir = stat.S_ISDIR(row.mode)
    dirty = row.dirty != 0
    archived = row.etag is not None or row.exported_key is not None or (is_dir and row.key != "")
    flags = HS_EXISTS | HS_ARCHIVED if archived else 0
    if dirty:
        flags |= HS_EXISTS | HS_DIRTY  # a new file never exported shows "exists dirty", as FSx documents it
    if archived and not dirty and stat.S_ISREG(row.mode) and row.size > 0 and cached == 0:
        flags |= HS_RELEASED
    return flags


class Hsm:
    """The daemon's side of the HSM commands: state, archive, release, restore, and what is in progress."""

    def __init__(self, ns: Namespace, cache: Cache, writeback: Writeback) -> None:
        self.ns = ns
        self.cache = cache
        self.writeback = writeback
        self.archiving: dict[int, int] = {}  # ino -> archive requests in progress
        self.restoring: set[int] = set()
        self._nursery: trio.Nursery | None = None
        self._restores = trio.CapacityLimiter(RESTORES_AT_ONCE)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host background restores until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def cached(self, row: Inode) -> int:
        """Bytes of the file's current data in the cache (its object version, or local data)."""
        return self.cache.cached_bytes(row.ino, row.etag or "")

    def cached_inodes(self) -> list[int]:
        """Files with fetched (clean) data in the cache: what a release task looks at."""
        return self.cache.inodes_with_clean_parts()

    def state(self, ino: int) -> dict[str, int]:
        """``{"flags", "archive_id"}`` of ``ino``."""
        row = self.ns.get(ino)
        flags = flags_of(row, self.cached(row))
        return {"flags": flags, "archive_id": ARCHIVE_ID if flags & HS_EXISTS else 0}

    def action(self, ino: int) -> dict[str, Any]:
        """The HSM action in progress on ``ino``: ``{"action", "state", "bytes"}`` (action NOOP if none)."""
        if ino in self.archiving or self.writeback.is_running(ino):
            return {"action": "ARCHIVE", "state": "running", "bytes": 0}
        if ino in self.restoring:
            return {"action": "RESTORE", "state": "running", "bytes": self.cached(self.ns.get(ino))}
        if self.writeback.is_waiting(ino) and self.ns.get(ino).dirty:
            return {"action": "ARCHIVE", "state": "waiting", "bytes": 0}  # queued for (auto-)export
        return {"action": "NOOP", "state": "", "bytes": 0}

    def _regular(self, ino: int) -> Inode:
        row = self.ns.get(ino)
        if not stat.S_ISREG(row.mode):
            raise ActionError(errno.EINVAL, "BadRequest", "not a regular file")
        return row

    async def archive(self, ino: int) -> None:
        """Export the file now and wait for it (``hsm_archive``); raises ActionError with FSx's code on failure."""
        self._regular(ino)
        self.archiving[ino] = self.archiving.get(ino, 0) + 1
        try:
            failure = await self.writeback.export_now(ino, MAX_ARCHIVE_ATTEMPTS)
        finally:
            left = self.archiving.pop(ino) - 1
            if left:
                self.archiving[ino] = left
        if failure is not None:
            raise ActionError(ARCHIVE_ERRNO.get(failure.code, errno.EIO), failure.code, failure.message)

    def release(self, ino: int) -> int:
        """Drop the cached data of a clean archived file (``hsm_release``); returns the bytes freed."""
        row = self._regular(ino)
        flags = flags_of(row, 0)
        if flags & HS_DIRTY:
            raise ActionError(errno.EBUSY, "ResourceBusy", "the file has changes not exported yet; archive it first")
        if not flags & HS_ARCHIVED:
            raise ActionError(errno.EINVAL, "BadRequest", "the file has no copy in S3")
        if ino in self.ns.open_counts or ino in self.restoring:
            raise ActionError(errno.EBUSY, "ResourceBusy", "the file is in use")
        return self.cache.release(ino)

    def restore(self, ino: int) -> None:
        """Start fetching the whole file into the cache in the background (``hsm_restore``)."""
        row = self._regular(ino)
        if row.dirty or row.etag is None or row.src_limit == 0 or ino in self.restoring:
            return  # nothing in S3 to restore from, or already on its way
        obj = ObjectVersion(ino, row.key, row.etag, row.src_limit)
        if self._nursery is None:
            self.cache.prefetch(obj, 0, obj.size)
            return
        self.restoring.add(ino)
        self._nursery.start_soon(self._restore, obj)

    async def _restore(self, obj: ObjectVersion) -> None:
        try:
            async with self._restores:
                try:
                    await self.cache.fetch_all(obj)
                except BaseException as exc:
                    gone = first_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
                    loader = self.ns.loader
                    if not (isinstance(gone, VersionChanged) and await loader.reload_unread(obj.ino, obj.etag)):
                        raise
                    row = self.ns.get(obj.ino)  # the object was replaced before it was read: restore the new one
                    await self.cache.fetch_all(ObjectVersion(obj.ino, row.key, row.etag, row.src_limit))
        except Exception as exc:
            err = first_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
            code = getattr(err, "code", "InternalError")
            self.ns.events.emit("ERROR", code, f"Restore of {obj.key} failed: {err}", key=obj.key)
        finally:
            self.restoring.discard(obj.ino)
