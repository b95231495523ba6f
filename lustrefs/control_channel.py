"""The daemon's side of the commands that reach it through the mount: ``user.lustrefs.*`` extended attributes.

``getxattr(path, "user.lustrefs.<name>")`` reads state, ``setxattr(path, "user.lustrefs.<name>", value)``
requests an action. Any user can use them on any file they can see; actions on another user's file need root.

=====================  ========  =====================================================================
name                   on        meaning
=====================  ========  =====================================================================
``stats``              root      get: JSON counters of the mount (cache, requests, dirty data, tasks…)
``hsm_state``          file      get: JSON ``{"flags", "archive_id"}`` (Lustre's hsm_states bits)
``hsm_action``         file      get: JSON ``{"action", "state", "bytes"}`` (NOOP, ARCHIVE, RESTORE)
``hsm_archive``        file      set: export the file now; returns when it is exported
``hsm_release``        file      set: drop the cached data of an archived, unchanged file
``hsm_restore``        file      set: fetch the file's data into the cache in the background
``task``               root      set: a new data repository task (JSON built by the CLI)
``task_cancel``        root      set: the id of a task to cancel
``error``              any       get: the message of the last action on this inode that failed
=====================  ========  =====================================================================
"""

from __future__ import annotations

import errno
import json
from typing import Any

import cachetools
import pyfuse3
import trio

from . import stats
from .cache import Cache
from .hsm import ActionError, Hsm
from .importer import Importer
from .namespace import ORPHAN, ROOT_INODE, Namespace
from .tasks import TaskRunner
from .writeback import Writeback

PREFIX = b"user.lustrefs."


class Control:
    """Answers ``user.lustrefs.*`` attributes; acts through the namespace, cache, exporter and importer."""

    def __init__(self, ns: Namespace, cache: Cache, writeback: Writeback, importer: Importer | None = None) -> None:
        self.ns = ns
        self.cache = cache
        self.writeback = writeback
        self.importer = importer
        self.hsm = Hsm(ns, cache, writeback)
        self.tasks = TaskRunner(ns, writeback, self.hsm, importer)
        self.errors: cachetools.LRUCache[int, str] = cachetools.LRUCache(maxsize=10_000)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run background restores and data repository tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.hsm.run)
            await nursery.start(self.tasks.run)
            task_status.started()

    def names(self, ino: int) -> list[bytes]:
        """The attribute names listed on ``ino`` (not the per-file ones: copying tools would copy them)."""
        return [PREFIX + b"stats"] if ino == ROOT_INODE else []

    async def get(self, ino: int, name: bytes, ctx: Any) -> bytes:
        """The value of ``user.lustrefs.<name>`` on ``ino``."""
        if name == b"stats" and ino == ROOT_INODE:
            return json.dumps(self.snapshot()).encode()
        if name == b"hsm_state":
            return json.dumps(self.hsm.state(ino)).encode()
        if name == b"hsm_action":
            return json.dumps(self.hsm.action(ino)).encode()
        if name == b"error" and ino in self.errors:
            return self.errors[ino].encode()
        raise pyfuse3.FUSEError(errno.ENODATA)

    def snapshot(self) -> dict[str, Any]:
        """The mount's counters (``lustrefs stats``)."""
        snapshot = stats.snapshot(self.ns, self.cache)
        snapshot["file_system_id"] = self.ns.events.file_system_id
        snapshot["export_queue"] = self.writeback.queue_length()
        dirty = self.ns.conn.execute("SELECT count(*) FROM inodes WHERE dirty != 0 AND parent != ?", (ORPHAN,))
        snapshot["dirty"] = {"entries": dirty.fetchone()[0], "bytes": self.cache.local_bytes()}
        snapshot["hsm"] = {"archiving": len(self.hsm.archiving), "restoring": len(self.hsm.restoring)}
        snapshot["tasks"] = self.tasks.status()
        if self.importer is not None:
            snapshot["import"] = self.importer.status()
        return snapshot

    async def set(self, ino: int, name: bytes, value: bytes, ctx: Any) -> None:
        """Perform the action ``user.lustrefs.<name>`` on ``ino``; a refusal's message is kept for ``error``."""
        try:
            if name in (b"hsm_archive", b"hsm_release", b"hsm_restore"):
                self._owner_or_root(ino, ctx, name.decode().removeprefix("hsm_"))
                if name == b"hsm_archive":
                    await self.hsm.archive(ino)
                elif name == b"hsm_release":
                    self.hsm.release(ino)
                else:
                    self.hsm.restore(ino)
            elif name in (b"task", b"task_cancel") and ino == ROOT_INODE:
                self._owner_or_root(ino, ctx, "manage data repository tasks on")
                (self.tasks.submit if name == b"task" else self.tasks.cancel)(value)
            else:
                raise pyfuse3.FUSEError(errno.ENOTSUP)
        except ActionError as exc:
            self.errors[ino] = str(exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        self.errors.pop(ino, None)

    def _owner_or_root(self, ino: int, ctx: Any, what: str) -> None:
        """FSx: only root may act on another user's file."""
        if ctx.uid != 0 and ctx.uid != self.ns.get(ino)["uid"]:
            raise ActionError(errno.EPERM, "AccessDenied", f"only root or the owner may {what} this file")
