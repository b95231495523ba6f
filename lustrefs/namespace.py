"""The POSIX namespace, loaded lazily from S3 listings and kept in SQLite.

A directory's entries are loaded the first time it is looked up in or listed, one ``ListObjectsV2`` page per
transaction, in a background task so that a lookup waits only until the listing has passed its name. The
POSIX metadata of each entry (``x-amz-meta-file-*``) needs a HEAD: a bounded pool of workers issues them for
a directory's new entries as it is listed, and ``lookup``/``getattr`` of one entry wait only for that entry
(or issue its HEAD at once). The metadata is stored with the ETag it belongs to, so each object version is
HEADed once. All state lives in SQLite; the in-memory maps hold only work in progress.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cachetools
import trio

from . import db, metadata, paths
from .cache import first_error
from .events import EventLog
from .exports import DATA, META, ORPHAN, ExportLedger
from .repository import AccessDenied, NotFound, ObjectInfo, ObjectStore, Page, RepositoryError

log = logging.getLogger(__name__)

ROOT_INODE = 1
# The control file's inode (paths.CONTROL_NAME at the root, served by lustrefs.control_channel): the largest
# rowid SQLite allows, which AUTOINCREMENT never hands out (it fails with SQLITE_FULL instead).
CONTROL_INODE = 2**63 - 1
IMPLIED = ""  # meta_etag of a directory that has no marker object (nothing to HEAD)
_S_IFMT = 0o170000  # the file type bits of st_mode


class NoEntry(Exception):
    """The inode or name does not exist (ENOENT)."""


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


@dataclass
class _Head:
    """A HEAD in flight for one inode; waiters read ``error`` after ``done`` is set."""

    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None


class Namespace:
    """Inodes, names and attributes; the only writer of the ``inodes`` table."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        repo: ObjectStore,
        events: EventLog,
        import_prefix: str,
        defaults: Defaults,
        posix_metadata: bool = True,
        head_workers: int = 16,
        background_listings: int = 8,
        export_is_import: bool = False,
    ) -> None:
        self.conn = conn
        self.conn.row_factory = sqlite3.Row
        self.exports = ExportLedger(conn)  # the export state of entries is written there, nowhere else
        self.repo = repo
        self.events = events
        self.import_prefix = import_prefix
        self.defaults = defaults
        self.posix_metadata = posix_metadata
        self.head_workers = head_workers
        self.export_is_import = export_is_import  # imported keys are export keys (objects replaced on export)
        self.open_counts: dict[int, int] = {}
        self.reimports: dict[int, int] = {}  # ino -> times its object was re-imported (pins open handles)
        self.on_purge: Callable[[int], None] = lambda ino: None  # drops the data of a deleted inode
        self.on_change: Callable[[int, float], None] = lambda ino, delay: None  # an entry needs exporting
        self.on_closed: Callable[[int], None] = lambda ino: None  # the last file handle of an inode closed
        self.lookup_counts: dict[int, int] = {}
        self._listings: dict[int, _Listing] = {}
        # Unlisted directories that had one targeted lookup: the second starts their listing in the background.
        self._looked_up_once: cachetools.LRUCache[int, bool] = cachetools.LRUCache(maxsize=10_000)
        self._heads: dict[int, _Head] = {}
        self._head_send, self._head_recv = trio.open_memory_channel[int](math.inf)
        self._nursery: trio.Nursery | None = None
        self._background_listings = trio.CapacityLimiter(background_listings)
        self._ensure_root()

    # ----------------------------------------------------------------------------------------- set-up

    def _ensure_root(self) -> None:
        if self.conn.execute("SELECT 1 FROM inodes WHERE ino = ?", (ROOT_INODE,)).fetchone() is None:
            self._insert(ROOT_INODE, "", stat.S_IFDIR | self.defaults.dir_mode, "", meta_etag=IMPLIED, ino=ROOT_INODE)

    def _insert(
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
        dirty: int = 0,
    ) -> int:
        """Insert an inode (owner: the mount's default unless given); returns its number."""
        now = time.time_ns()
        mtime = now if mtime_ns is None else mtime_ns
        uid, gid = owner or (self.defaults.uid, self.defaults.gid)
        imported = etag is not None or key.endswith("/")
        exported = key if imported and self.export_is_import else None
        cur = self.conn.execute(
            "INSERT INTO inodes (ino, parent, name, mode, uid, gid, size, mtime_ns, atime_ns, ctime_ns, key, etag,"
            " src_limit, meta_etag, dirty, exported_key, import_etag)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                ino,
                parent,
                name,
                mode,
                uid,
                gid,
                size,
                mtime,
                mtime,
                now,
                key,
                etag,
                size if etag is not None else 0,
                meta_etag,
                dirty,
                exported,
                (etag or IMPLIED) if imported else None,
            ),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the background work (listings, HEAD workers) until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(self.head_workers):
                nursery.start_soon(self._head_worker)
            pending = [r[0] for r in self.conn.execute("SELECT ino FROM inodes WHERE meta_etag IS NULL")]
            for ino in pending:
                self._head_send.send_nowait(ino)
            task_status.started()

    # ----------------------------------------------------------------------------------------- queries

    def get(self, ino: int) -> sqlite3.Row:
        row = self.conn.execute("SELECT * FROM inodes WHERE ino = ?", (ino,)).fetchone()
        if row is None:
            raise NoEntry(ino)
        return row

    def find(self, ino: int) -> sqlite3.Row | None:
        """The inode's row, or None if it is gone."""
        return self.conn.execute("SELECT * FROM inodes WHERE ino = ?", (ino,)).fetchone()

    def _child(self, parent: int, name: str) -> sqlite3.Row | None:
        return self.conn.execute(
            "SELECT * FROM inodes WHERE parent = ? AND name = ? AND ino != ?", (parent, name, ROOT_INODE)
        ).fetchone()

    def count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM inodes").fetchone()[0]

    async def getattr(self, ino: int) -> sqlite3.Row:
        """The inode's row, with its POSIX metadata applied (waits for its HEAD if needed)."""
        row = self.get(ino)
        if row["meta_etag"] is None:
            await self._ensure_meta(ino)
            row = self.get(ino)
        return row

    async def lookup(self, parent: int, name: str) -> sqlite3.Row:
        """The entry ``name`` of directory ``parent``; loads only what it needs from S3. Raises NoEntry."""
        dir_row = self.get(parent)
        if not stat.S_ISDIR(dir_row["mode"]):
            raise NotADirectoryError(parent)
        row = self._child(parent, name)
        if dir_row["ino"] in self._listings:
            # A later page may still turn a file of this name into a directory: wait until it is past.
            await self._wait_listed(dir_row, until=dir_row["key"] + name + "/")
            row = self._child(parent, name)
        elif row is None and not dir_row["listed"]:
            await self._lookup_unlisted(dir_row, name)
            row = self._child(parent, name)
        if row is None:
            raise NoEntry(name)
        return await self.getattr(row["ino"])

    async def _lookup_unlisted(self, dir_row: sqlite3.Row, name: str) -> None:
        """Resolve one name of a directory not listed yet with one LIST, not a listing of the whole directory."""
        spec = paths.listing_for(dir_row["key"], self.import_prefix)
        key = dir_row["key"] + name
        if spec is None or spec.only_child is not None or not key.startswith(spec.prefix):
            await self._wait_listed(dir_row, until=None)
            return
        assert self._nursery is not None
        if self._looked_up_once.pop(dir_row["ino"], False):  # a second name: a scan of it is likely, list it
            self._nursery.start_soon(self._list_in_background, dir_row["ino"])
        else:  # opening one file by its path costs one LIST per directory, and nothing in the background
            self._looked_up_once[dir_row["ino"]] = True
        page = await self.repo.list_page(key, None, max_keys=100)
        if key + "/" in page.prefixes:
            found: tuple[list[str], list[ObjectInfo]] = ([key + "/"], [])  # a directory wins over a file
        elif page.next_token is None or max(page.prefixes + [o.key for o in page.objects]) > key + "/":
            found = ([], [o for o in page.objects if o.key == key])
        else:  # the page ended before the place of "name/": fall back to the directory listing
            await self._wait_listed(dir_row, until=key + "/")
            return
        with db.transaction(self.conn):
            self._apply_page(dir_row["ino"], spec, *found)

    async def entries(self, parent: int, after: int, limit: int = 256) -> list[sqlite3.Row]:
        """Up to ``limit`` entries of a directory with inode numbers above ``after``, metadata applied."""
        dir_row = self.get(parent)
        if not stat.S_ISDIR(dir_row["mode"]):
            raise NotADirectoryError(parent)
        if not dir_row["listed"]:
            await self._wait_listed(dir_row, until=None)
        if after == 0:
            self._list_subdirs_ahead(parent)
        rows = self.conn.execute(
            "SELECT * FROM inodes WHERE parent = ? AND ino > ? AND ino != ? AND NOT (parent = ? AND name = ?)"
            " ORDER BY ino LIMIT ?",
            (parent, after, ROOT_INODE, ROOT_INODE, paths.CONTROL_NAME, limit),  # hidden by the control file
        ).fetchall()
        pending = [r["ino"] for r in rows if r["meta_etag"] is None]
        if pending:
            try:
                async with trio.open_nursery() as nursery:
                    for ino in pending:
                        nursery.start_soon(self._ensure_meta, ino)
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            rows = [self.get(r["ino"]) for r in rows]
        return rows

    def files_after(self, parent: int, ino: int, limit: int) -> list[sqlite3.Row]:
        """The next ``limit`` regular files of a directory after ``ino``, in listing order."""
        return self.conn.execute(
            "SELECT ino, key, etag, src_limit, dirty FROM inodes WHERE parent = ? AND ino > ? AND (mode & ?) = ?"
            " ORDER BY ino LIMIT ?",
            (parent, ino, _S_IFMT, stat.S_IFREG, limit),
        ).fetchall()

    async def readlink(self, ino: int) -> str:
        row = await self.getattr(ino)
        if not stat.S_ISLNK(row["mode"]):
            raise OSError(22, "not a symbolic link")
        if row["target"] is None:
            body = await self.repo.get_object(row["key"], row["etag"])
            target = body.decode("utf-8", "surrogateescape")
            self.conn.execute("UPDATE inodes SET target = ?, size = ? WHERE ino = ?", (target, len(body), ino))
            return target
        return row["target"]

    # ----------------------------------------------------------------------------------------- lookup counts

    def remember(self, ino: int) -> None:
        """The kernel learnt of ``ino`` once more (lookup, readdirplus entry)."""
        self.lookup_counts[ino] = self.lookup_counts.get(ino, 0) + 1

    def forget(self, ino: int, n: int) -> None:
        left = self.lookup_counts.get(ino, 0) - n
        if left > 0:
            self.lookup_counts[ino] = left
        else:
            self.lookup_counts.pop(ino, None)
            self._purge_if_unused(ino)

    def opened(self, ino: int) -> None:
        self.open_counts[ino] = self.open_counts.get(ino, 0) + 1

    def closed(self, ino: int) -> None:
        left = self.open_counts.get(ino, 0) - 1
        if left > 0:
            self.open_counts[ino] = left
        else:
            self.open_counts.pop(ino, None)
            self.on_closed(ino)
            self._purge_if_unused(ino)

    def _purge_if_unused(self, ino: int) -> None:
        """Delete an unlinked inode once the kernel forgot it and no file handle uses it."""
        if ino in self.lookup_counts or ino in self.open_counts:
            return
        row = self.conn.execute("SELECT parent FROM inodes WHERE ino = ?", (ino,)).fetchone()
        if row is not None and row[0] == ORPHAN:
            self.conn.execute("DELETE FROM inodes WHERE ino = ?", (ino,))
            self.on_purge(ino)

    def purge_orphans(self) -> None:
        """At start-up: inodes unlinked while open in a previous run are gone for good."""
        for (ino,) in self.conn.execute("SELECT ino FROM inodes WHERE parent = ?", (ORPHAN,)).fetchall():
            self._purge_if_unused(ino)

    # ----------------------------------------------------------------------------------------- listing

    async def _wait_listed(self, dir_row: sqlite3.Row, until: str | None) -> None:
        """Wait until the directory is listed completely, or (``until`` given) past that key."""
        ino = dir_row["ino"]
        listing = self._listings.get(ino)
        if listing is None:
            listing = self._listings[ino] = _Listing()
            assert self._nursery is not None, "Namespace.run() is not running"
            self._nursery.start_soon(self._list_dir, ino, dir_row["key"], listing)
        while not listing.done and (until is None or listing.progress < until):
            await listing.changed.wait()
        if listing.error is not None:
            raise listing.error

    def _list_subdirs_ahead(self, parent: int) -> None:
        """A directory is being read: list its subdirectories in the background (a walk will want them)."""
        assert self._nursery is not None
        for row in self.conn.execute(
            "SELECT ino FROM inodes WHERE parent = ? AND listed = 0 AND (mode & ?) = ? AND ino != ?",
            (parent, _S_IFMT, stat.S_IFDIR, ROOT_INODE),
        ):
            self._nursery.start_soon(self._list_in_background, row[0])

    async def _list_in_background(self, ino: int) -> None:
        async with self._background_listings:
            row = self.get(ino)
            if row["listed"] or ino in self._listings:
                return
            with contextlib.suppress(Exception):  # logged by _list_dir; a foreground request retries
                await self._wait_listed(row, until=None)

    async def _list_dir(self, ino: int, dir_key: str, listing: _Listing) -> None:
        try:
            spec = paths.listing_for(dir_key, self.import_prefix)
            if spec is not None and spec.only_child is not None:
                if problem := paths.entry_problem(dir_key, spec.only_child):
                    self._skip(dir_key + spec.only_child + "/", problem)
                elif await self.repo.any_key(spec.prefix):
                    with db.transaction(self.conn):
                        self._add_dir(ino, spec.only_child, dir_key + spec.only_child + "/")
            elif spec is not None:
                page: Page | None = await self.repo.list_page(spec.prefix, None)
                while page is not None:
                    page = await self._apply_while_fetching_next(ino, spec, page, listing)
            self.conn.execute("UPDATE inodes SET listed = 1 WHERE ino = ?", (ino,))
        except RepositoryError as exc:
            log.warning("listing of %r failed: %s", dir_key, exc)
            listing.error = exc
        except Exception as exc:
            log.exception("listing of %r failed", dir_key)
            listing.error = exc
        finally:
            listing.done = True
            listing.advance()
            del self._listings[ino]

    async def _apply_while_fetching_next(
        self, ino: int, spec: paths.Listing, page: Page, listing: _Listing
    ) -> Page | None:
        """Store one listing page while the next one is requested (the endpoint works while this thread does);
        returns the next page, or None after the last."""
        following: list[Page] = []

        async def fetch(token: str) -> None:
            following.append(await self.repo.list_page(spec.prefix, token))

        try:
            async with trio.open_nursery() as nursery:
                if page.next_token is not None:
                    nursery.start_soon(fetch, page.next_token)
                    await trio.sleep(0)  # let the request reach its worker thread before the page is stored
                with db.transaction(self.conn):
                    self._apply_page(ino, spec, page.prefixes, page.objects)
                keys = page.prefixes + [o.key for o in page.objects]
                listing.advance(max(keys) if keys else None)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        return following[0] if following else None

    def _apply_page(self, parent: int, spec: paths.Listing, prefixes: list[str], objects: list[ObjectInfo]) -> None:
        """Insert one listing page (in the caller's transaction). Directories win over files of the same name."""
        for prefix in prefixes:
            name = spec.child_name(prefix)
            if problem := paths.entry_problem(spec.dir_prefix, name):
                self._skip(prefix, problem)
                continue
            existing = self._child(parent, name)
            if existing is None:
                self._add_dir(parent, name, prefix)
            elif not stat.S_ISDIR(existing["mode"]):
                self._type_mismatch(existing["key"])
                self.conn.execute(
                    "UPDATE inodes SET mode = ?, size = 0, key = ?, etag = NULL, meta_etag = ?, target = NULL,"
                    " ctime_ns = ? WHERE ino = ?",
                    (
                        stat.S_IFDIR | self.defaults.dir_mode,
                        prefix,
                        None if self.posix_metadata else IMPLIED,
                        time.time_ns(),
                        existing["ino"],
                    ),
                )
                self._queue_head(existing["ino"])
        for obj in objects:
            if obj.key.endswith("/"):
                continue  # the directory's own marker object: its metadata is read by the parent's HEAD
            name = spec.child_name(obj.key)
            if problem := paths.entry_problem(spec.dir_prefix, name):
                self._skip(obj.key, problem)
                continue
            existing = self._child(parent, name)
            if existing is not None:
                if stat.S_ISDIR(existing["mode"]):
                    self._type_mismatch(obj.key)
                continue
            self.add_imported_file(parent, name, obj)

    def _add_dir(self, parent: int, name: str, key: str) -> None:
        meta = None if self.posix_metadata else IMPLIED
        self._queue_head(self._insert(parent, name, stat.S_IFDIR | self.defaults.dir_mode, key, meta_etag=meta))

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

    # ----------------------------------------------------------------------------------------- metadata

    def _queue_head(self, ino: int) -> None:
        if self.posix_metadata:
            self._head_send.send_nowait(ino)

    async def _head_worker(self) -> None:
        async for ino in self._head_recv:
            with contextlib.suppress(Exception):  # logged by _ensure_meta; a later getattr tries again
                await self._ensure_meta(ino)

    async def _ensure_meta(self, ino: int) -> None:
        """Apply the POSIX metadata of ``ino`` (one HEAD, shared by concurrent callers)."""
        head = self._heads.get(ino)
        if head is not None:
            await head.done.wait()
            if head.error is not None:
                raise head.error
            return
        row = self.get(ino)
        if row["meta_etag"] is not None:
            return
        head = self._heads[ino] = _Head()
        try:
            try:
                info = await self.repo.head(row["key"])
            except NotFound:
                info = None
            except AccessDenied as exc:
                self.events.emit("ERROR", "S3AccessDenied", str(exc), key=row["key"])
                info = None
            self._apply_meta(row, info)
        except Exception as exc:
            if not isinstance(exc, RepositoryError):
                log.exception("metadata of %r", row["key"])
            else:
                log.warning("metadata of %r: %s", row["key"], exc)
            head.error = exc
            raise
        finally:
            del self._heads[ino]
            head.done.set()

    def _apply_meta(self, row: sqlite3.Row, info: ObjectInfo | None) -> None:
        """Store the attributes from a HEAD (None: no object, e.g. an implied directory)."""
        is_dir = stat.S_ISDIR(row["mode"])
        if info is None:
            # An implied directory, or a file deleted since it was listed: keep the listing's attributes.
            self.conn.execute("UPDATE inodes SET meta_etag = ? WHERE ino = ?", (IMPLIED, row["ino"]))
            return
        pm = metadata.from_user_metadata(info.metadata or {})
        mode = row["mode"]
        if pm.mode is not None:
            if is_dir:
                kind = stat.S_IFDIR  # a key ending in '/' is a directory whatever the type bits say
            elif stat.S_ISLNK(pm.mode):
                kind = stat.S_IFLNK
            else:
                kind = stat.S_IFREG
            mode = kind | (pm.mode & 0o7777)
        mtime = pm.mtime_ns if pm.mtime_ns is not None else (row["mtime_ns"] if is_dir else info.mtime_ns)
        self.conn.execute(
            "UPDATE inodes SET mode = ?, uid = ?, gid = ?, mtime_ns = ?, atime_ns = ?, size = ?, etag = ?,"
            " meta_etag = ?, ctime_ns = ?, src_limit = ? WHERE ino = ?",
            (
                mode,
                pm.uid if pm.uid is not None else row["uid"],
                pm.gid if pm.gid is not None else row["gid"],
                mtime,
                pm.atime_ns if pm.atime_ns is not None else mtime,
                0 if is_dir else info.size,
                None if is_dir else info.etag,
                info.etag,
                time.time_ns(),
                0 if is_dir else info.size,
                row["ino"],
            ),
        )

    # ----------------------------------------------------------------------------------------- local changes

    async def _writable_dir(self, parent: int) -> sqlite3.Row:
        """A directory about to change: it must be listed completely first, or S3 could bring names back."""
        row = self.get(parent)
        if not stat.S_ISDIR(row["mode"]):
            raise NotADirectoryError(parent)
        if not row["listed"]:
            await self._wait_listed(row, until=None)
        return self.get(parent)

    def _touch_dir(self, ino: int) -> None:
        now = time.time_ns()
        self.conn.execute("UPDATE inodes SET mtime_ns = ?, ctime_ns = ? WHERE ino = ?", (now, now, ino))

    def mark_dirty(self, ino: int, flags: int, delay: float = 0.0) -> None:
        """Record that ``ino`` needs exporting (in the caller's transaction) and tell the exporter."""
        self.exports.mark_dirty(ino, flags)
        self.on_change(ino, delay)

    async def create(
        self, parent: int, name: str, mode: int, owner: tuple[int, int], target: str | None = None
    ) -> sqlite3.Row:
        """A new file, directory or symlink (``target``); owned by ``owner``, setgid directories honoured."""
        _check_new_name(parent, name)
        dir_row = await self._writable_dir(parent)
        if self._child(parent, name) is not None:
            raise FileExistsError(name)
        uid, gid = owner
        if dir_row["mode"] & stat.S_ISGID:
            gid = dir_row["gid"]
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        with db.transaction(self.conn):
            ino = self._insert(
                parent,
                name,
                mode,
                "",
                size=len(os.fsencode(target)) if target is not None else 0,
                meta_etag=IMPLIED,
                owner=(uid, gid),
            )
            self.conn.execute("DELETE FROM whiteouts WHERE parent = ? AND name = ?", (parent, name))
            if stat.S_ISDIR(mode):
                self.conn.execute("UPDATE inodes SET listed = 1 WHERE ino = ?", (ino,))
            if target is not None:
                self.conn.execute("UPDATE inodes SET target = ? WHERE ino = ?", (target, ino))
            self.mark_dirty(ino, META | (DATA if stat.S_ISREG(mode) else 0))
            self._touch_dir(parent)
        return self.get(ino)

    async def unlink(self, parent: int, name: str, want_dir: bool) -> None:
        """Remove a name (``rmdir`` with ``want_dir``); its object is deleted from the export prefix."""
        _check_not_reserved(parent, name)
        await self._writable_dir(parent)
        row = self._child(parent, name)
        if row is None:
            raise NoEntry(name)
        is_dir = stat.S_ISDIR(row["mode"])
        if want_dir and not is_dir:
            raise NotADirectoryError(name)
        if not want_dir and is_dir:
            raise IsADirectoryError(name)
        if is_dir:
            await self._writable_dir(row["ino"])
            if self.conn.execute("SELECT 1 FROM inodes WHERE parent = ? LIMIT 1", (row["ino"],)).fetchone():
                raise OSError(errno.ENOTEMPTY, name)
        with db.transaction(self.conn):
            self._orphan(row)
            self._touch_dir(parent)
        self._purge_if_unused(row["ino"])

    def _orphan(self, row: sqlite3.Row) -> None:
        """Detach an inode from the tree; its exported object is queued for deletion, its name whited out."""
        if row["import_etag"] is not None:
            self.conn.execute(
                "INSERT OR IGNORE INTO whiteouts (parent, name) VALUES (?, ?)", (row["parent"], row["name"])
            )
        self.exports.detach(row["ino"], row["exported_key"])
        if row["exported_key"]:
            self.on_change(0, 0)
        self.conn.execute(
            "UPDATE inodes SET parent = ?, name = ? WHERE ino = ?", (ORPHAN, f"#{row['ino']}", row["ino"])
        )

    async def rename(self, parent: int, name: str, new_parent: int, new_name: str, noreplace: bool) -> None:
        """Move an entry; a directory's whole subtree is loaded first, and every entry in it re-exported."""
        _check_not_reserved(parent, name)
        _check_new_name(new_parent, new_name)
        await self._writable_dir(parent)
        await self._writable_dir(new_parent)
        row = self._child(parent, name)
        if row is None:
            raise NoEntry(name)
        dest = self._child(new_parent, new_name)
        if dest is not None and dest["ino"] == row["ino"]:
            return
        if dest is not None:
            if noreplace:
                raise FileExistsError(new_name)
            if stat.S_ISDIR(row["mode"]) and not stat.S_ISDIR(dest["mode"]):
                raise NotADirectoryError(new_name)
            if not stat.S_ISDIR(row["mode"]) and stat.S_ISDIR(dest["mode"]):
                raise IsADirectoryError(new_name)
            if stat.S_ISDIR(dest["mode"]):
                await self._writable_dir(dest["ino"])
                if self.conn.execute("SELECT 1 FROM inodes WHERE parent = ? LIMIT 1", (dest["ino"],)).fetchone():
                    raise OSError(errno.ENOTEMPTY, new_name)
        moved = [row["ino"]]
        if stat.S_ISDIR(row["mode"]):
            moved = await self.load_subtree(row["ino"])
        with db.transaction(self.conn):
            if dest is not None:
                self._orphan(dest)
            if row["import_etag"] is not None:
                self.conn.execute("INSERT OR IGNORE INTO whiteouts (parent, name) VALUES (?, ?)", (parent, name))
            self.conn.execute("DELETE FROM whiteouts WHERE parent = ? AND name = ?", (new_parent, new_name))
            self.conn.execute(
                "UPDATE inodes SET parent = ?, name = ? WHERE ino = ?", (new_parent, new_name, row["ino"])
            )
            for ino in moved:
                self.mark_dirty(ino, META)
                self.conn.execute("UPDATE inodes SET import_etag = NULL WHERE ino = ?", (ino,))  # now local
            self._touch_dir(parent)
            self._touch_dir(new_parent)
        if dest is not None:
            self._purge_if_unused(dest["ino"])

    async def load_subtree(self, ino: int) -> list[int]:
        """List every directory below ``ino`` from S3 (as needed); returns the subtree's inodes, ``ino`` first."""
        out, todo = [], [ino]
        while todo:
            current = todo.pop()
            out.append(current)
            row = self.get(current)
            if stat.S_ISDIR(row["mode"]):
                if not row["listed"]:
                    await self._wait_listed(row, until=None)
                todo += [r[0] for r in self.conn.execute("SELECT ino FROM inodes WHERE parent = ?", (current,))]
        return out

    def setattr(self, ino: int, changes: dict[str, int]) -> sqlite3.Row:
        """Change mode, uid, gid, size, atime_ns or mtime_ns (size: the caller has cut the local data)."""
        row = self.get(ino)
        if "mode" in changes:
            changes["mode"] = stat.S_IFMT(row["mode"]) | stat.S_IMODE(changes["mode"])
        flags = META
        if "size" in changes:
            flags |= DATA
            changes["src_limit"] = min(row["src_limit"], changes["size"])
        with db.transaction(self.conn):
            sets = ", ".join(f"{column} = ?" for column in changes)
            self.conn.execute(f"UPDATE inodes SET {sets} WHERE ino = ?", (*changes.values(), ino))
            self.mark_dirty(ino, flags)
        return self.get(ino)

    def writing(self, ino: int) -> None:
        """Data is about to be written: the file is dirty (its local parts authoritative) from now on."""
        row = self.conn.execute("SELECT dirty FROM inodes WHERE ino = ?", (ino,)).fetchone()
        if row is not None and not row[0] & DATA:
            with db.transaction(self.conn):
                self.mark_dirty(ino, DATA, delay=math.inf)

    def wrote(self, ino: int, end: int) -> None:
        """Data was written up to ``end``: size and mtime (the export follows the last close)."""
        now = time.time_ns()
        self.conn.execute(
            "UPDATE inodes SET size = max(size, ?), mtime_ns = ?, ctime_ns = ?, data_gen = data_gen + 1 WHERE ino = ?",
            (end, now, now, ino),
        )

    def path_key(self, ino: int) -> str:
        """The path of ``ino`` relative to the root, as an S3 key would spell it (``a/b/c``)."""
        names = []
        while ino != ROOT_INODE:
            row = self.get(ino)
            if row["parent"] == ORPHAN:
                raise NoEntry(ino)
            names.append(row["name"])
            ino = row["parent"]
        return "/".join(reversed(names))

    # ----------------------------------------------------------------------------------------- imports

    def add_imported_dir(self, parent: int, name: str, key: str) -> None:
        """A directory that appeared in S3 (in the caller's transaction); loaded lazily like the others."""
        self._add_dir(parent, name, key)

    def add_imported_file(self, parent: int, name: str, obj: ObjectInfo) -> None:
        """A file that appeared in S3 (in the caller's transaction); its metadata is HEADed in the background."""
        ino = self._insert(
            parent,
            name,
            stat.S_IFREG | self.defaults.file_mode,
            obj.key,
            size=obj.size,
            mtime_ns=obj.mtime_ns,
            etag=obj.etag,
            meta_etag=None if self.posix_metadata else obj.etag,
        )
        self._queue_head(ino)

    async def reload_unread(self, ino: int, etag: str) -> bool:
        """The object version ``etag`` of a clean file is gone from S3 before any of it was read: take the
        object now at its key, as a lazy load would (new size, version and attributes; an event). Returns
        whether there is a new version to read."""
        row = self.get(ino)
        if row["etag"] != etag or row["dirty"] & DATA:
            return row["etag"] != etag  # already replaced meanwhile
        try:
            info = await self.repo.head(row["key"])
        except NotFound:
            return False
        row = self.get(ino)
        if info.etag == etag or row["etag"] != etag or row["dirty"] & DATA:
            return row["etag"] != etag
        with db.transaction(self.conn):
            self.reimport_file(ino, info)
            if self.posix_metadata:
                self._apply_meta(self.get(ino), info)
        self.events.emit(
            "WARN",
            "S3ObjectChangedBeforeRead",
            f"S3 object {row['key']} in S3 bucket {self.repo.bucket} changed before its data was read; the file"
            " now shows the current object.",
            key=row["key"],
        )
        return True

    def reimport_file(self, ino: int, obj: ObjectInfo) -> None:
        """The object of a clean file changed in S3: take its size and version; metadata is HEADed again."""
        self.reimports[ino] = self.reimports.get(ino, 0) + 1
        self.conn.execute(
            "UPDATE inodes SET key = ?, etag = ?, import_etag = ?, size = ?, src_limit = ?, mtime_ns = ?,"
            " ctime_ns = ?, meta_etag = ?, target = NULL WHERE ino = ?",
            (
                obj.key,
                obj.etag,
                obj.etag,
                obj.size,
                obj.size,
                obj.mtime_ns,
                time.time_ns(),
                None if self.posix_metadata else obj.etag,
                ino,
            ),
        )
        self._queue_head(ino)

    def remove_imported(self, row: sqlite3.Row) -> None:
        """An object deleted in S3: its entry goes, without deleting anything in S3 (in the caller's transaction)."""
        self.exports.forget_object(row["ino"])
        self.conn.execute(
            "UPDATE inodes SET parent = ?, name = ? WHERE ino = ?", (ORPHAN, f"#{row['ino']}", row["ino"])
        )
        self._purge_if_unused(row["ino"])


def _check_not_reserved(parent: int, name: str) -> None:
    """The control file's name at the root is not the namespace's to create, remove or rename (EPERM)."""
    if parent == ROOT_INODE and name == paths.CONTROL_NAME:
        raise OSError(errno.EPERM, f"{name} at the root is reserved for the control file")


def _check_new_name(parent: int, name: str) -> None:
    _check_not_reserved(parent, name)
    if len(os.fsencode(name)) > paths.NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, name)
    if problem := paths.name_problem(name):
        raise OSError(errno.EINVAL, problem)
