"""A lustrefs daemon in the test's own trio run, on an in-memory repository: the core without FUSE.

``Daemon`` builds the same graph as the daemon process (``lustrefs.daemon.core.Core``) on a state directory that
outlives it. ``crash()`` stops it the way ``kill -9`` would: its database connection is closed first (an open
transaction is lost), its repository client stops reaching the bucket, and its tasks are abandoned; a new ``Daemon``
on the same directory is the next mount.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyfuse3
import trio
from memrepo import Bucket, MemoryRepository

from lustrefs.associations import Association, Associations
from lustrefs.constants import ROOT_INODE, STAGING_NAME
from lustrefs.daemon.core import AssociationSource, ClusterLink, Core, Settings
from lustrefs.events import EventLog
from lustrefs.s3.repository import NotFound
from lustrefs.s3.routing import RoutedStore
from lustrefs.store import db, pg
from lustrefs.sync.importer import LEGACY_EVENTS

MIB = 1024 * 1024
FS_ID = "fs-0123456789abcdef0"


@dataclass
class Ctx:
    """What pyfuse3 passes handlers about the caller."""

    uid: int = 0
    gid: int = 0
    pid: int = os.getpid()
    umask: int = 0o022


@dataclass
class Fields:
    """pyfuse3.SetattrFields, whose attributes Python cannot set."""

    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False


@dataclass
class Links:
    """The data repository associations of an in-process file system (a daemon process keeps them in the file
    system's record): ``items`` is what the record says now; the daemon reports lifecycles back here."""

    buckets: dict[str, Bucket]
    items: list[Association] = field(default_factory=list)
    failures: dict[str, str | None] = field(default_factory=dict)  # FailureDetails reported, by association

    async def read(self) -> list[Association]:
        return list(self.items)

    async def report(self, dra_id: str, lifecycle: str, failure: str | None) -> None:
        self.items = [replace(a, lifecycle=lifecycle) if a.id == dra_id else a for a in self.items]
        self.failures[dra_id] = failure

    async def forget(self, dra_id: str) -> None:
        self.items = [a for a in self.items if a.id != dra_id]

    def lifecycle(self, dra_id: str) -> str | None:
        return next((a.lifecycle for a in self.items if a.id == dra_id), None)

    def store_for(self, bucket: str) -> MemoryRepository:
        """A client of ``bucket``; a bucket that does not exist answers NoSuchBucket."""
        repo = MemoryRepository(self.buckets.get(bucket) or Bucket(bucket), self.buckets)
        if bucket not in self.buckets:
            repo.refuse = NotFound(f"s3://{bucket}: NoSuchBucket")
        return repo


class Daemon:
    """One mount's core: ``await d.start(nursery)``, then ``d.ops`` answers FUSE requests."""

    def __init__(
        self,
        home: Path,
        store: Bucket,
        import_prefix: str = "",
        export_prefix: str | None = None,
        delay: float = 0.0,
        part_size: int = MIB,
        capacity: int = 256 * MIB,
        policy: frozenset[str] = frozenset({"NEW", "CHANGED", "DELETED"}),
        import_policy: str = "NONE",
        devices: bool = True,
        cluster: str | None = None,
        links: Links | None = None,
    ) -> None:
        """``cluster``: the conninfo of a PostgreSQL database: a host of a cluster (the home's name is its name)."""
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        (home / "cache").mkdir(exist_ok=True)
        self.links, self.import_policy = links, import_policy
        self.repo: MemoryRepository | RoutedStore = MemoryRepository(store)
        source = None
        if links is not None:  # a file system with associations: keys are paths, routed to their buckets
            self.repo = RoutedStore(Associations.routed(links.items), links.store_for)
            import_prefix, export_prefix = "", ""
            source = AssociationSource(links.read, links.report, links.forget)
        link = None
        if cluster is None:
            self.conn: db.Connection = db.connect(home / "state.db")
            self.local = None
        else:
            self.conn = pg.connect(cluster, FS_ID)
            self.local = db.connect(home / "cache.db", local=True)
            link = ClusterLink(cluster, FS_ID, home.name, f"{STAGING_NAME}/{FS_ID}/")
        routed = self.repo.association_of if isinstance(self.repo, RoutedStore) else None
        self.events = EventLog(home / "events.jsonl", FS_ID, routed)
        self.policy = policy
        settings = Settings(
            import_prefix=import_prefix,
            export_prefix=import_prefix if export_prefix is None else export_prefix,
            cache_targets=[home / "cache"],
            cache_capacity=capacity,
            chunk_size=4 * part_size,
            part_size=part_size,
            import_state_file=home / "import.json",
            export_delay=delay,
            export_policy=self._export_events,
            upload_part=MIB,
            import_policy=self._import_events,
            poll_interval=3600.0,  # polled by the test (``importer.poll()``), not on a timer
            read_ahead=0,
            devices=devices,
            cluster=link,
            associations=source,
        )
        self.core = Core(self.conn, self.repo, self.events, settings, self.local)
        self.ns, self.cache, self.writeback = self.core.ns, self.core.cache, self.core.writeback
        self.importer, self.ops = self.core.importer, self.core.ops
        self._scope = trio.CancelScope()
        self._ended = trio.Event()
        self.crashed = False

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the background tasks in ``nursery`` (abandoned by ``crash``, ended by ``stop``)."""
        started = trio.Event()

        async def run() -> None:
            try:
                await serve()
            finally:
                self._ended.set()

        async def serve() -> None:
            with self._scope:
                try:
                    async with trio.open_nursery() as inner:
                        await inner.start(self.core.run)
                        started.set()
                except BaseException:
                    if not self.crashed:
                        raise  # after a crash, whatever the abandoned tasks ran into is the dead process's

        nursery.start_soon(run)
        await started.wait()

    async def crash(self) -> None:
        """``kill -9``: nothing more reaches the database or the bucket."""
        self.crashed = True
        for repo in self.repo.stores if isinstance(self.repo, RoutedStore) else [self.repo]:
            repo.kill()  # type: ignore[attr-defined]
        self._close()
        self._scope.cancel()
        self.events.close()
        await trio.lowlevel.checkpoint()

    async def stop(self, export_timeout: float = 10.0) -> list[tuple[str, str]]:
        """Unmount: export what is dirty (at most ``export_timeout``), stop, close. Returns what is left."""
        left = await self.core.export_all(export_timeout)
        self._scope.cancel()
        await self._ended.wait()
        self.cache.flush()
        self._close()
        self.events.close()
        return left

    def _export_events(self, key: str) -> frozenset[str] | None:
        return self.policy if self.links is None else Associations.routed(self.links.items).export_events(key)

    def _import_events(self, dir_key: str | None) -> frozenset[str]:
        if self.links is None:
            return LEGACY_EVENTS[self.import_policy]
        return Associations.live(self.links.items).import_events(dir_key)

    def _close(self) -> None:
        self.conn.close()
        if self.local is not None:
            self.local.close()

    async def leading(self, timeout: float = 10.0) -> None:
        """Wait until this host of a cluster leads (bounded)."""
        assert self.core.cluster is not None
        with trio.fail_after(timeout):
            await self.core.cluster.became_leader.wait()

    async def listening(self, timeout: float = 10.0) -> None:
        """Wait until this host of a cluster receives the other hosts' changes (bounded)."""
        assert self.core.cluster is not None
        with trio.fail_after(timeout):
            await self.core.cluster.listening.wait()

    # ------------------------------------------------------------------------------------- POSIX helpers

    async def resolve(self, path: str) -> int:
        """The inode of ``path`` (relative to the root, '' for the root)."""
        ino = ROOT_INODE
        for part in filter(None, path.split("/")):
            attrs = await self.ops.lookup(ino, part.encode(), Ctx())
            if attrs.st_ino == 0:
                raise FileNotFoundError(errno.ENOENT, path)
            ino = attrs.st_ino
        return ino

    async def parent_of(self, path: str) -> tuple[int, bytes]:
        head, _, name = path.rpartition("/")
        return await self.resolve(head), name.encode()

    async def write_file(self, path: str, data: bytes, close: bool = True) -> int:
        """Create (or truncate) ``path`` and write ``data``; returns the open handle if ``close`` is False."""
        parent, name = await self.parent_of(path)
        try:
            ino = await self.resolve(path)
            fh = (await self.ops.open(ino, os.O_WRONLY | os.O_TRUNC, Ctx())).fh
        except FileNotFoundError:
            info, _ = await self.ops.create(parent, name, 0o644, os.O_WRONLY, Ctx())
            fh = info.fh
        if data:
            await self.ops.write(fh, 0, data)
        if close:
            await self.close(fh)
        return fh

    async def close(self, fh: int) -> None:
        """close(2) of the last descriptor of ``fh``: FLUSH (refused by the embedded engine: ENOSYS), RELEASE."""
        try:
            await self.ops.flush(fh)
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOSYS:
                raise
        await self.ops.release(fh)

    async def read_file(self, path: str) -> bytes:
        ino = await self.resolve(path)
        fh = (await self.ops.open(ino, os.O_RDONLY, Ctx())).fh
        try:
            return await self.read_handle(fh, ino)
        finally:
            await self.ops.release(fh)

    async def read_handle(self, fh: int, ino: int) -> bytes:
        size = (await self.ops.getattr(ino, Ctx())).st_size
        return bytes(await self.ops.read(fh, 0, size)) if size else b""

    async def mkdir(self, path: str) -> None:
        parent, name = await self.parent_of(path)
        await self.ops.mkdir(parent, name, 0o755, Ctx())

    async def unlink(self, path: str) -> None:
        ino = await self.resolve(path)
        parent, name = await self.parent_of(path)
        await self.ops.unlink(parent, name, Ctx())
        await self._evicted(ino)

    async def rmdir(self, path: str) -> None:
        ino = await self.resolve(path)
        parent, name = await self.parent_of(path)
        await self.ops.rmdir(parent, name, Ctx())
        await self._evicted(ino)

    async def _evicted(self, ino: int) -> None:
        """The kernel drops an unlinked inode's dentry and forgets it (it still counts open handles itself)."""
        count = self.ns.lookup_counts.get(ino, 0)
        if count:
            await self.ops.forget([(ino, count)])

    async def rename(self, old: str, new: str) -> None:
        p1, n1 = await self.parent_of(old)
        p2, n2 = await self.parent_of(new)
        await self.ops.rename(p1, n1, p2, n2, 0, Ctx())

    async def symlink(self, path: str, target: str) -> None:
        parent, name = await self.parent_of(path)
        await self.ops.symlink(parent, name, target.encode(), Ctx())

    async def chmod(self, path: str, mode: int) -> None:
        ino = await self.resolve(path)
        attr = pyfuse3.EntryAttributes()
        attr.st_mode = mode
        await self.ops.setattr(ino, attr, Fields(update_mode=True), None, Ctx())

    async def settled(self, timeout: float = 10.0) -> None:
        """Wait until nothing is left to export: no dirty live entry (but those another host of a cluster holds),
        no intent, no pending delete (bounded)."""
        ledger = self.ns.exports
        with trio.fail_after(timeout):
            while (
                self.writeback.queue_length()
                or ledger.dirty_inodes(self.ns.host)
                or ledger.intents()
                or ledger.any_pending_delete()
            ):
                await trio.sleep(0.01)


Test = Callable[[trio.Nursery], Awaitable[None]]


def run(test: Test, timeout: float = 60.0) -> None:
    """Run ``test(nursery)`` in trio, bounded; daemons it starts live in ``nursery``."""

    async def main() -> None:
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                await test(nursery)
                nursery.cancel_scope.cancel()

    trio.run(main)
