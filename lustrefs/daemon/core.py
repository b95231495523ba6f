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

import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from lustrefs.associations import Association
from lustrefs.daemon.control_channel import Control
from lustrefs.daemon.fs import Operations
from lustrefs.daemon.hsm import Hsm
from lustrefs.daemon.tasks import TaskRunner
from lustrefs.data.cache import Cache
from lustrefs.data.prefetch import Prefetcher
from lustrefs.events import EventLog
from lustrefs.s3.repository import ObjectStore
from lustrefs.s3.routing import RoutedStore
from lustrefs.store import db
from lustrefs.sync.cluster import Cluster
from lustrefs.sync.exporter import EVENTS, ExportTarget, Writeback
from lustrefs.sync.importer import Importer, Notifier
from lustrefs.sync.linker import Linker
from lustrefs.sync.s3events import EventQueue
from lustrefs.tree.loader import Defaults
from lustrefs.tree.namespace import Namespace

log = logging.getLogger(__name__)

FILES_AHEAD = 16  # small files of a directory prefetched after the one opened


@dataclass(frozen=True)
class ClusterLink:
    """The cluster engine's part of a mount: the database, this host's name, the staging prefix."""

    conninfo: str
    fs_id: str
    host: str
    staging_prefix: str


@dataclass(frozen=True)
class AssociationSource:
    """Where a file system with data repository associations finds them and records their lifecycle."""

    read: Callable[[], Awaitable[list[Association]]]
    report: Callable[[str, str, str | None], Awaitable[None]]  # (id, lifecycle, failure message)
    forget: Callable[[str], Awaitable[None]]  # a deleted association leaves the record


@dataclass(frozen=True)
class EventSource:
    """An SQS queue receiving the buckets' S3 event notifications (event-driven import)."""

    client: Any  # a boto3 SQS client (lustrefs.sync.s3events.make_client)
    url: str
    locate: Callable[[str, str], str | None]  # (bucket, key) -> the key the file system shows it at, or None


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
    export_policy: Callable[[str], frozenset[str] | None] = lambda key: frozenset(EVENTS)  # None: not exported
    upload_part: int = 8 * 1024 * 1024
    import_policy: Callable[[str | None], frozenset[str]] = lambda dir_key: frozenset()  # None: any directory
    poll_interval: float = 60.0
    read_ahead: int = 64 * 1024 * 1024
    attr_timeout: float = 1.0
    negative_timeout: float = 1.0
    cluster: ClusterLink | None = None  # None: the embedded engine
    associations: AssociationSource | None = None  # None: the legacy link (the repository is its bucket's)
    events: EventSource | None = None  # None: the import polls only


class Core:
    """A mount's components, wired once; ``ops`` answers FUSE requests."""

    def __init__(
        self,
        conn: db.Connection,
        repo: ObjectStore,
        events: EventLog,
        settings: Settings,
        cache_conn: sqlite3.Connection | None = None,
    ) -> None:
        """``conn`` holds the namespace; ``cache_conn`` the cache index (the cluster engine's local SQLite file;
        default: ``conn``, the embedded engine's one file)."""
        target = ExportTarget.of(settings.import_prefix, settings.export_prefix)
        link = settings.cluster
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
            host=link.host if link else None,
            version=(lambda: conn.generation) if link else None,  # type: ignore[union-attr]
        )
        index = conn if cache_conn is None else cache_conn
        assert isinstance(index, sqlite3.Connection), "the cache index is always in a local SQLite file"
        self.cache = Cache(
            index, repo, settings.cache_targets, settings.cache_capacity, settings.chunk_size, settings.part_size
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
            staging_prefix=link.staging_prefix if link else None,
            leads=lambda: self.leading,
            ask_leader=lambda ino: conn.ask_export(ino),  # type: ignore[union-attr]
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
            **({"locate": settings.events.locate} if settings.events else {}),
        )
        self.queue = None
        if settings.events is not None:
            self.queue = EventQueue(
                settings.events.client, settings.events.url, self.importer.apply_events, trio.CapacityLimiter(1)
            )
        self.cluster = None
        if link is not None:
            self.cluster = Cluster(
                link.conninfo,
                link.fs_id,
                self.ns,
                self.notifier,
                self._lead,
                lambda ino: self.writeback.schedule(ino, settings.export_delay),
                self.writeback.request,
                lambda: conn.session,  # type: ignore[union-attr]
                conn.changed,  # type: ignore[union-attr]
            )
        self.linker = None
        if settings.associations is not None:
            assert isinstance(repo, RoutedStore), "associations route requests through a RoutedStore"
            source = settings.associations
            self.linker = Linker(
                self.ns, self.writeback, self.notifier, repo, source.read, source.report, source.forget,
                lambda: self.leading,
            )  # fmt: skip
        self.hsm = Hsm(self.ns, self.cache, self.writeback)
        self.tasks = TaskRunner(self.ns, self.writeback, self.hsm, self.importer)
        self.control = Control(
            self.ns, self.cache, self.writeback, self.hsm, self.tasks, self.importer, self._stats
        )
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
        """Run every background task until cancelled (started in dependency order). In a cluster, the exporter
        and the importer run on the leader only, while it leads."""
        async with trio.open_nursery() as nursery:
            for service in (self.ns, self.cache, self.notifier, self.control):
                await nursery.start(service.run)
            if self.linker is not None:
                await nursery.start(self.linker.run)
            if self.cluster is None:
                await self._lead(nursery)
            else:
                await nursery.start(self.cluster.run)
                nursery.start_soon(self._stage_left)
            task_status.started()

    async def _stage_left(self) -> None:
        """Cluster engine, at start-up: what this host held when it stopped (written, not closed: a crash) goes
        to shared storage now."""
        for path, why in await self.writeback.stage_held():
            log.error("%s: %s (kept in this host's cache; staged at its next close)", path, why)

    async def _lead(self, nursery: trio.Nursery | None = None) -> None:
        """The services that run once per file system (until cancelled, when started by the cluster)."""
        async with contextlib.AsyncExitStack() as stack:
            if nursery is None:
                nursery = await stack.enter_async_context(trio.open_nursery())
            for service in (self.writeback, self.importer, self.queue):
                if service is not None:
                    await nursery.start(service.run)

    def _stats(self) -> dict[str, Any]:
        """The parts of ``lustrefs stats`` that only some mounts have: the cluster role, the event queue."""
        out: dict[str, Any] = {}
        if self.cluster is not None:
            out["cluster"] = {"host": self.ns.host, "leading": self.cluster.leading}
        if self.queue is not None:
            out["event_queue"] = self.queue.status()
        return out

    @property
    def leading(self) -> bool:
        """Whether this mount runs the exporter and the importer (always, with the embedded engine)."""
        return self.cluster is None or self.cluster.leading

    async def export_all(self, timeout: float) -> list[tuple[str, str]]:
        """The unmount's export: everything dirty, for at most ``timeout`` seconds; returns what is left. A
        cluster's host puts what it holds in shared storage; its leader then exports (the next one, if not)."""
        left = await self.writeback.stage_held()
        if not self.leading:
            return left
        return left + await self.writeback.flush(timeout)
