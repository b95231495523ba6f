"""Data repository associations applied to a mounted file system, without a remount.

``Linker`` reads the file system's associations (its record, re-read every ``INTERVAL``) and keeps the tree and
the routing of requests (lustrefs.s3.routing) in step with them, moving each through FSx's lifecycle:

- ``CREATING``: its directory is made (or listed again from the new prefix); with BatchImportMetaDataOnCreate the
  whole subtree is listed; then ``AVAILABLE``, or ``MISCONFIGURED`` with FailureDetails when its bucket cannot be
  listed (retried at every look until it can).
- ``UPDATING`` (new policies or chunk size, applied by the routing at once): ``AVAILABLE``.
- ``DELETING``: unless its data in the file system is deleted, every entry below it that is not exported yet is
  exported first (whatever its export policy: local data is never dropped silently), with the deletions it
  queued; then its subtree leaves the tree (nothing is deleted in S3) and the association leaves the record.

Only the host that runs the exporter (the embedded daemon, or a cluster's leader) changes lifecycles and the
tree; every host routes requests by the associations it last read.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from lustrefs.associations import Association, Associations
from lustrefs.constants import ROOT_INODE
from lustrefs.s3.repository import AccessDenied, NotFound, RepositoryError
from lustrefs.s3.routing import RoutedStore
from lustrefs.sync.exporter import Writeback
from lustrefs.sync.importer import Notifier
from lustrefs.tree.namespace import Namespace

log = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between looks at the record's associations


class Linker:
    """Applies the associations of the record to the tree and the routing."""

    def __init__(
        self,
        ns: Namespace,
        writeback: Writeback,
        notifier: Notifier,
        router: RoutedStore,
        read: Callable[[], Awaitable[list[Association]]],
        report: Callable[[str, str, str | None], Awaitable[None]],
        forget: Callable[[str], Awaitable[None]],
        leads: Callable[[], bool],
    ) -> None:
        self.ns = ns
        self.writeback = writeback
        self.notifier = notifier
        self.router = router
        self.read = read  # the record's associations now
        self.report = report  # (association id, lifecycle, failure message): written to the record
        self.forget = forget  # a deleted association leaves the record
        self.leads = leads
        self.applied: dict[str, Association] = {}  # what the routing and the tree show
        self.gone: set[str] = set()  # deleted here: a record read before the deletion must not bring them back

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.step()
        task_status.started()
        while True:
            await trio.sleep(INTERVAL)
            await self.step()

    async def step(self) -> None:
        """One look at the record: route by the live associations, move lifecycles on (the leader)."""
        try:
            wanted = await self.read()
        except Exception as exc:  # the record cannot be read now: keep the last state, try again
            log.warning("associations: cannot read the file system's record: %s", exc)
            return
        wanted = [a for a in wanted if a.id not in self.gone]
        self.router.update(Associations.routed(wanted))
        if not self.leads():
            return
        for a in wanted:
            try:
                if a.lifecycle == "DELETING":
                    await self._delete(a)
                elif a.lifecycle in ("CREATING", "MISCONFIGURED") or a.id not in self.applied:
                    if await self._create(a):
                        self.applied[a.id] = a
                else:
                    if a.lifecycle == "UPDATING":
                        await self.report(a.id, "AVAILABLE", None)
                    self.applied[a.id] = a
            except Exception:  # e.g. the record cannot be written now: the next look tries again
                log.exception("association %s", a.id)

    async def _create(self, a: Association) -> bool:
        """Make or re-list its directory and report it AVAILABLE; whether that was done."""
        try:
            await self.router.any_key(a.root)  # the bucket can be listed
            ino = self.ns.link_directory(a.root)
            self.notifier.inode(ino)
            if a.lifecycle == "CREATING" and a.batch_import:
                await self.ns.load_subtree(ino)
        except (AccessDenied, NotFound) as exc:
            if a.lifecycle != "MISCONFIGURED":
                await self.report(a.id, "MISCONFIGURED", f"Cannot list {a.url}: {exc}")
            return False
        except (RepositoryError, OSError) as exc:  # unavailable now: the next look tries again
            log.warning("association %s: %s", a.id, exc)
            return False
        if a.lifecycle != "AVAILABLE":
            await self.report(a.id, "AVAILABLE", None)
        return True

    async def _delete(self, a: Association) -> None:
        top = self.ns.find_key(a.root)  # the root itself for an association at "/"
        if top is not None and not a.delete_data and not await self._exported(top.ino, a.root):
            return  # the next look tries again: never removed before its data is in S3
        self.router.update(Associations(b for b in self.router.map.all if b.id != a.id))  # no listing shows it
        if top is not None:
            removed = self.ns.inodes.children(top.ino) if top.ino == ROOT_INODE else [top]
            for row in removed:
                for gone in self.ns.unlink_directory(row.ino):
                    self.notifier.inode(gone)
                self.notifier.entry(row.parent, row.name)
        self.applied.pop(a.id, None)
        self.gone.add(a.id)
        await self.forget(a.id)

    async def _exported(self, ino: int, root: str) -> bool:
        """Export every entry below directory ``ino`` (key ``root``) that is not exported yet, and the deletions
        queued below it."""
        for name in self.ns.dirty_below(ino):
            failure = await self.writeback.export_now(name)
            if failure is not None:
                log.warning("association directory %d: not deleted yet, an export failed: %s", ino, failure)
                return False
        return await self.writeback.deletions_done(root)
