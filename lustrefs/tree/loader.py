"""Loading the tree from S3: lazy directory listings, targeted lookups, and entries that appear or change in S3.

A directory's entries are loaded the first time it is looked up in or listed, one ``ListObjectsV2`` page per
transaction (lustrefs.tree.listing), in a background task so that a lookup waits only until the listing has passed its
name. A single name in a directory not listed yet is resolved with one small LIST; the second such lookup starts
the directory's listing in the background. Each new entry's POSIX metadata is queued for the HEAD pool
(lustrefs.tree.heads). The importer adds, re-imports and (through the namespace) removes entries with the primitives
at the end.

Await points: LIST requests (listings, targeted lookups), the HEAD of ``reload_unread``. State: the listings in
progress and the re-import counters (in memory); everything else is in the inode store.
"""

from __future__ import annotations

import contextlib
import logging
import stat
import time
from dataclasses import dataclass, field

import cachetools
import trio

from lustrefs import paths
from lustrefs.constants import ROOT_INODE
from lustrefs.errors import NoEntry
from lustrefs.events import EventLog
from lustrefs.s3.repository import NotFound, ObjectInfo, ObjectStore, RepositoryError
from lustrefs.store import db
from lustrefs.store.exports import DATA
from lustrefs.store.inodes import IMPLIED, Inode, InodeStore, NameTaken
from lustrefs.tree import listing
from lustrefs.tree.heads import MetadataLoader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Defaults:
    """Attributes of entries whose objects carry no POSIX metadata (mount options uid, gid, *_mode)."""

    uid: int = 0
    gid: int = 0
    file_mode: int = 0o755
    dir_mode: int = 0o755


@dataclass
class _Listing:
    """A directory listing in progress: how far it got (an S3 key) and a wake-up for waiters."""

    progress: str = ""
    done: bool = False
    error: Exception | None = None
    changed: trio.Event = field(default_factory=trio.Event)

    def advance(self, progress: str | None = None) -> None:
        if progress is not None:
            self.progress = max(self.progress, progress)
        self.changed.set()
        self.changed = trio.Event()


class TreeLoader:
    """Brings S3's view of directories into the inode store."""

    def __init__(
        self,
        inodes: InodeStore,
        meta: MetadataLoader,
        repo: ObjectStore,
        events: EventLog,
        import_prefix: str,
        defaults: Defaults,
        posix_metadata: bool = True,
        background_listings: int = 8,
        export_is_import: bool = False,
    ) -> None:
        self.inodes = inodes
        self.meta = meta
        self.repo = repo
        self.events = events
        self.import_prefix = import_prefix
        self.defaults = defaults
        self.posix_metadata = posix_metadata
        self.export_is_import = export_is_import  # imported keys are export keys (objects replaced on export)
        self.reimports: dict[int, int] = {}  # ino -> times its object was re-imported (pins open handles)
        self._listings: dict[int, _Listing] = {}
        # Unlisted directories that had one targeted lookup: the second starts their listing in the background.
        self._looked_up_once: cachetools.LRUCache[int, bool] = cachetools.LRUCache(maxsize=10_000)
        self._nursery: trio.Nursery | None = None
        self._background_listings = trio.CapacityLimiter(background_listings)
        self._ensure_root()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host listings and the HEAD workers until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.meta.run)
            task_status.started()

    def reimport_count(self, ino: int) -> int:
        """How often the object of ``ino`` was re-imported (a handle opened before reads what it opened)."""
        return self.reimports.get(ino, 0)

    def is_listing(self, ino: int) -> bool:
        """Whether the directory's listing is in progress."""
        return ino in self._listings

    def _ensure_root(self) -> None:
        if self.inodes.find(ROOT_INODE) is None:
            with contextlib.suppress(NameTaken):  # another host of the cluster made it meanwhile
                self.insert(
                    ROOT_INODE, "", stat.S_IFDIR | self.defaults.dir_mode, "", meta_etag=IMPLIED, ino=ROOT_INODE
                )

    def insert(
        self,
        parent: int,
        name: str,
        mode: int,
        key: str,
        *,
        size: int = 0,
        mtime_ns: int | None = None,
        etag: str | None = None,
        meta_etag: str | None = None,
        ino: int | None = None,
        owner: tuple[int, int] | None = None,
        rdev: int = 0,
    ) -> int:
        """Insert an inode (owner: the mount's default unless given); returns its number."""
        now = time.time_ns()
        imported = etag is not None or key.endswith("/")
        return self.inodes.insert(
            parent=parent,
            name=name,
            mode=mode,
            owner=owner or (self.defaults.uid, self.defaults.gid),
            key=key,
            size=size,
            mtime_ns=now if mtime_ns is None else mtime_ns,
            ctime_ns=now,
            etag=etag,
            src_limit=size if etag is not None else 0,
            meta_etag=meta_etag,
            exported_key=key if imported and self.export_is_import else None,  # the object there is the export
            import_etag=(etag or IMPLIED) if imported else None,
            ino=ino,
            rdev=rdev,
        )

    async def lookup_unlisted(self, dir_row: Inode, name: str) -> None:
        """Resolve one name of a directory not listed yet with one LIST, not a listing of the whole directory."""
        spec = paths.listing_for(dir_row.key, self.import_prefix)
        key = dir_row.key + name
        if spec is None or spec.only_child is not None or not key.startswith(spec.prefix):
            await self.wait_listed(dir_row, until=None)
            return
        assert self._nursery is not None
        if self._looked_up_once.pop(dir_row.ino, False):  # a second name: a scan of it is likely, list it
            self._nursery.start_soon(self._list_in_background, dir_row.ino)
        else:  # opening one file by its path costs one LIST per directory, and nothing in the background
            self._looked_up_once[dir_row.ino] = True
        page = await self.repo.list_page(key, None, max_keys=100)
        if key + "/" in page.prefixes:
            found: tuple[list[str], list[ObjectInfo]] = ([key + "/"], [])  # a directory wins over a file
        elif page.next_token is None or max(page.prefixes + [o.key for o in page.objects]) > key + "/":
            found = ([], [o for o in page.objects if o.key == key])
        else:  # the page ended before the place of "name/": fall back to the directory listing
            await self.wait_listed(dir_row, until=key + "/")
            return
        with db.transaction(self.inodes.conn):
            self._store_entries(dir_row.ino, listing.entries(spec, *found, self._skip))

    async def wait_listed(self, dir_row: Inode, until: str | None) -> None:
        """Wait until the directory is listed completely, or (``until`` given) past that key."""
        ino = dir_row.ino
        progress = self._listings.get(ino)
        if progress is None:
            progress = self._listings[ino] = _Listing()
            assert self._nursery is not None, "Namespace.run() is not running"
            self._nursery.start_soon(self._list_dir, ino, dir_row.key, progress)
        while not progress.done and (until is None or progress.progress < until):
            await progress.changed.wait()
        if progress.error is not None:
            raise progress.error

    def list_subdirs_ahead(self, parent: int) -> None:
        """A directory is being read: list its subdirectories in the background (a walk will want them)."""
        assert self._nursery is not None
        for ino in self.inodes.unlisted_subdirs(parent):
            self._nursery.start_soon(self._list_in_background, ino)

    async def _list_in_background(self, ino: int) -> None:
        async with self._background_listings:
            row = self._get(ino)
            if row.listed or ino in self._listings:
                return
            with contextlib.suppress(Exception):  # logged by _list_dir; a foreground request retries
                await self.wait_listed(row, until=None)

    async def _list_dir(self, ino: int, dir_key: str, progress: _Listing) -> None:
        try:
            spec = paths.listing_for(dir_key, self.import_prefix)
            if spec is not None and spec.only_child is not None:
                if problem := paths.entry_problem(dir_key, spec.only_child):
                    self._skip(dir_key + spec.only_child + "/", problem)
                elif await self.repo.any_key(spec.prefix):
                    with db.transaction(self.inodes.conn):
                        self._add_dir(ino, spec.only_child, dir_key + spec.only_child + "/")
            elif spec is not None:

                def store(page: listing.Entries) -> None:
                    with db.transaction(self.inodes.conn):
                        self._store_entries(ino, page)
                    progress.advance(page.last_key)

                await listing.each_page(self.repo, spec, store, self._skip)
            self.inodes.set_listed(ino)
        except RepositoryError as exc:
            log.warning("listing of %r failed: %s", dir_key, exc)
            progress.error = exc
        except Exception as exc:
            log.exception("listing of %r failed", dir_key)
            progress.error = exc
        finally:
            progress.done = True
            progress.advance()
            del self._listings[ino]

    def _store_entries(self, parent: int, page: listing.Entries) -> None:
        """Insert one listing page's entries (in the caller's transaction). A directory wins over a file of the
        same name, whichever page brings it."""
        for name, prefix in page.dirs:
            existing = self.inodes.child(parent, name)
            if existing is None:
                self._add_dir(parent, name, prefix)
            elif not existing.is_dir:
                self._type_mismatch(existing.key)
                meta = None if self.posix_metadata else IMPLIED
                self.inodes.make_dir(existing.ino, stat.S_IFDIR | self.defaults.dir_mode, prefix, meta, time.time_ns())
                self.meta.queue(existing.ino)
        for name, obj in page.files:
            existing = self.inodes.child(parent, name)
            if existing is not None:
                if existing.is_dir:
                    self._type_mismatch(obj.key)
                continue
            self.add_imported_file(parent, name, obj)

    def _add_dir(self, parent: int, name: str, key: str) -> None:
        meta = None if self.posix_metadata else IMPLIED
        self.meta.queue(self.insert(parent, name, stat.S_IFDIR | self.defaults.dir_mode, key, meta_etag=meta))

    def _skip(self, key: str, problem: str) -> None:
        """A key or common prefix that cannot be an entry (paths.entry_problem says why) is left out."""
        self.events.emit(
            "WARN",
            "S3ObjectPathNotPosixCompliant",
            f"Skipped S3 object with key {key} in S3 bucket {self.repo.bucket}: {problem}.",
            key=key,
        )

    def _type_mismatch(self, key: str) -> None:
        self.events.emit(
            "WARN",
            "S3ObjectTypeMismatch",
            f"Failed to import S3 object with key {key} in S3 bucket {self.repo.bucket} because an S3 object"
            " with the same name has already been imported into the file system.",
            key=key,
        )

    def add_imported_dir(self, parent: int, name: str, key: str) -> None:
        """A directory that appeared in S3 (in the caller's transaction); loaded lazily like the others."""
        self._add_dir(parent, name, key)

    def add_imported_file(self, parent: int, name: str, obj: ObjectInfo) -> None:
        """A file that appeared in S3 (in the caller's transaction); its metadata is HEADed in the background."""
        ino = self.insert(
            parent,
            name,
            stat.S_IFREG | self.defaults.file_mode,
            obj.key,
            size=obj.size,
            mtime_ns=obj.mtime_ns,
            etag=obj.etag,
            meta_etag=None if self.posix_metadata else obj.etag,
        )
        self.meta.queue(ino)

    async def reload_unread(self, ino: int, etag: str) -> bool:
        """The object version ``etag`` of a clean file is gone from S3 before any of it was read: take the
        object now at its key, as a lazy load would (new size, version and attributes; an event). Returns
        whether there is a new version to read."""
        row = self._get(ino)
        if row.etag != etag or row.dirty & DATA:
            return row.etag != etag  # already replaced meanwhile
        try:
            info = await self.repo.head(row.key)
        except NotFound:
            return False
        row = self._get(ino)
        if info.etag == etag or row.etag != etag or row.dirty & DATA:
            return row.etag != etag
        with db.transaction(self.inodes.conn):
            self.reimport_file(ino, info)
            if self.posix_metadata:
                self.meta.apply(self._get(ino), info)
        self.events.emit(
            "WARN",
            "S3ObjectChangedBeforeRead",
            f"S3 object {row.key} in S3 bucket {self.repo.bucket} changed before its data was read; the file"
            " now shows the current object.",
            key=row.key,
        )
        return True

    def reimport_file(self, ino: int, obj: ObjectInfo) -> None:
        """The object of a clean file changed in S3: take its size and version; metadata is HEADed again."""
        self.reimports[ino] = self.reimports.get(ino, 0) + 1
        meta = None if self.posix_metadata else obj.etag
        self.inodes.reimport(ino, obj.key, obj.etag, obj.size, obj.mtime_ns, time.time_ns(), meta)
        self.meta.queue(ino)

    def _get(self, ino: int) -> Inode:
        row = self.inodes.find(ino)
        if row is None:
            raise NoEntry(ino)
        return row
