"""The composition root: one object that builds a mount's graph explicitly and runs its background tasks.

``Core`` takes what the daemon (or a test) provides from outside — the state database connection, the data
repository, the event log and the ``Settings`` — and builds, in order: the namespace, the cache, the exporter,
the kernel notifier, the importer, the HSM and task services, the control channel and the FUSE ``Operations``.
Components that call each other both ways get their callbacks at construction (closures over this object), never
set afterwards. ``run`` owns the nursery of every background task; ``export_all`` is the unmount's export.
lustrefs.daemon.process adds the process around it (FUSE session, signals, logs, exit status); tests/inproc.py runs the
same graph on an in-memory repository without FUSE.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from lustrefs.daemon.control_channel import Control
from lustrefs.daemon.fs import Operations
from lustrefs.daemon.hsm import Hsm
from lustrefs.daemon.tasks import TaskRunner
from lustrefs.data.cache import Cache
from lustrefs.data.prefetch import Prefetcher
from lustrefs.events import EventLog
from lustrefs.s3.repository import ObjectStore
from lustrefs.sync.exporter import EVENTS, ExportTarget, Writeback
from lustrefs.sync.importer import Importer, Notifier
from lustrefs.tree.loader import Defaults
from lustrefs.tree.namespace import Namespace

FILES_AHEAD = 16  # small files of a directory prefetched after the one opened


@dataclass(frozen=True)
class Settings:
    """What a mount's core is built from (the file system's record and the mount options, resolved)."""

    import_prefix: str
    export_prefix: str
    cache_targets: list[Path]
    cache_capacity: int
    chunk_size: int
    part_size: int
    import_state_file: Path  # where the importer reports its lifecycle (repository-state.json)
    defaults: Defaults = field(default_factory=Defaults)
    posix_metadata: bool = True
    devices: bool = False  # objects describing device nodes are imported as devices (root, not nodev)
    max_connections: int = 16  # HEAD workers
    export_delay: float = 3.0
    export_policy: Callable[[], frozenset[str]] = lambda: frozenset(EVENTS)
    upload_part: int = 8 * 1024 * 1024
    import_policy: Callable[[], str] = lambda: "NONE"
    poll_interval: float = 60.0
    read_ahead: int = 64 * 1024 * 1024
    attr_timeout: float = 1.0
    negative_timeout: float = 1.0


class Core:
    """A mount's components, wired once; ``ops`` answers FUSE requests."""

    def __init__(self, conn: sqlite3.Connection, repo: ObjectStore, events: EventLog, settings: Settings) -> None:
        target = ExportTarget.of(settings.import_prefix, settings.export_prefix)
        self.ns = Namespace(
            conn,
            repo,
            events,
            settings.import_prefix,
            settings.defaults,
            settings.posix_metadata,
            settings.max_connections,
            settings.devices,
            export_is_import=target.base == "",
            on_purge=lambda ino: self.cache.drop_inode(ino),
            on_change=lambda ino, delay: self.writeback.schedule(ino, delay),
            on_closed=lambda ino: self.importer.closed(ino),
        )
        self.cache = Cache(
            conn, repo, settings.cache_targets, settings.cache_capacity, settings.chunk_size, settings.part_size
        )
        self.cache.load()
        self.writeback = Writeback(
            self.ns,
            self.cache,
            repo,
            events,
            target,
            settings.export_policy,
            settings.export_delay,
            upload_part=settings.upload_part,
        )
        self.ns.purge_orphans()  # inodes unlinked while open in an earlier run (their data goes with them)
        self.notifier = Notifier(self.ns)
        self.importer = Importer(
            self.ns,
            self.cache,
            repo,
            events,
            self.notifier,
            settings.import_policy,
            settings.import_state_file,
            settings.poll_interval,
        )
        self.hsm = Hsm(self.ns, self.cache, self.writeback)
        self.tasks = TaskRunner(self.ns, self.writeback, self.hsm, self.importer)
        self.control = Control(self.ns, self.cache, self.writeback, self.hsm, self.tasks, self.importer)
        prefetcher = Prefetcher(self.cache, settings.read_ahead, small_file=settings.part_size, files_ahead=FILES_AHEAD)
        self.ops = Operations(
            self.ns,
            self.cache,
            prefetcher,
            self.writeback,
            self.control,
            settings.attr_timeout,
            settings.negative_timeout,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every background task until cancelled (started in dependency order)."""
        async with trio.open_nursery() as nursery:
            for service in (self.ns, self.cache, self.writeback, self.notifier, self.importer, self.control):
                await nursery.start(service.run)
            task_status.started()

    async def export_all(self, timeout: float) -> list[tuple[str, str]]:
        """The unmount's export: everything dirty, for at most ``timeout`` seconds; returns what is left."""
        return await self.writeback.flush(timeout)
