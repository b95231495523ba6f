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
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio
from memrepo import Bucket, MemoryRepository

from lustrefs.constants import ROOT_INODE
from lustrefs.daemon.core import Core, Settings
from lustrefs.events import EventLog
from lustrefs.store import db

MIB = 1024 * 1024


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
    ) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        (home / "cache").mkdir(exist_ok=True)
        self.repo = MemoryRepository(store)
        self.conn = db.connect(home / "state.db")
        self.events = EventLog(home / "events.jsonl", "fs-0123456789abcdef0")
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
            export_policy=lambda: self.policy,
            upload_part=MIB,
            import_policy=lambda: import_policy,
            poll_interval=3600.0,  # polled by the test (``importer.poll()``), not on a timer
            read_ahead=0,
            devices=devices,
        )
        self.core = Core(self.conn, self.repo, self.events, settings)
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
        self.repo.kill()
        self.conn.close()
        self._scope.cancel()
        self.events.close()
        await trio.lowlevel.checkpoint()

    async def stop(self, export_timeout: float = 10.0) -> list[tuple[str, str]]:
        """Unmount: export what is dirty (at most ``export_timeout``), stop, close. Returns what is left."""
        left = await self.core.export_all(export_timeout)
        self._scope.cancel()
        await self._ended.wait()
        self.cache.flush()
        self.conn.close()
        self.events.close()
        return left

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
            await self.ops.release(fh)
        return fh

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
        """Wait until nothing is left to export: no dirty live entry, no intent, no pending delete (bounded)."""
        ledger = self.ns.exports
        with trio.fail_after(timeout):
            while (
                self.writeback.queue_length()
                or ledger.count_dirty()
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
