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
import stat
import time
from collections.abc import Callable, Iterator

import trio

from lustrefs import paths
from lustrefs.constants import ROOT_INODE
from lustrefs.errors import NoEntry
from lustrefs.events import EventLog
from lustrefs.s3.repository import ObjectStore
from lustrefs.store import db
from lustrefs.store.exports import DATA, META, ExportLedger
from lustrefs.store.inodes import IMPLIED, ORPHAN, Inode, InodeStore, NameTaken
from lustrefs.tree.heads import MetadataLoader
from lustrefs.tree.loader import Defaults, TreeLoader

log = logging.getLogger(__name__)

LINK_MAX = 65_000  # names of one file (ext4's limit): link(2) fails with EMLINK beyond


class Namespace:
    """Inodes, names and attributes; the only writer of the ``inodes`` table."""

    def __init__(
        self,
        conn: db.Connection,
        repo: ObjectStore,
        events: EventLog,
        import_prefix: str,
        defaults: Defaults,
        posix_metadata: bool = True,
        head_workers: int = 16,
        devices: bool = False,
        background_listings: int = 8,
        export_is_import: bool = False,
        on_purge: Callable[[int], None] = lambda ino: None,
        on_change: Callable[[int, float], None] = lambda ino, delay: None,
        on_closed: Callable[[int], None] = lambda ino: None,
        host: str | None = None,
        version: Callable[[], int] | None = None,
    ) -> None:
        self.conn = conn
        self.version = version  # cluster engine: a number that changes whenever any row may have changed
        self.host = host  # cluster engine: this host's name in the shared tables (``holder``); None embedded
        self.inodes = InodeStore(conn)  # the tree's table: every read and write of it goes through the store
        self.exports = ExportLedger(conn)  # the export state of entries is written there, nowhere else
        self.meta = MetadataLoader(self.inodes, repo, events, posix_metadata, head_workers, devices)
        self.repo = repo
        self.events = events
        self.import_prefix = import_prefix  # what the importer and tasks list
        self.open_counts: dict[int, int] = {}
        self.on_purge = on_purge  # drops the data of a deleted inode (the cache)
        self.on_change = on_change  # an entry needs exporting after a delay (the exporter; 0: wake it only)
        self.on_closed = on_closed  # the last file handle of an inode closed (the importer)
        self.lookup_counts: dict[int, int] = {}
        self.loader = TreeLoader(
            self.inodes, self.meta, repo, events, import_prefix, defaults, posix_metadata, background_listings,
            export_is_import,
        )  # fmt: skip

    # ----------------------------------------------------------------------------------------- set-up

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the background work (listings, HEAD workers) until cancelled."""
        await self.loader.run(task_status=task_status)

    # ----------------------------------------------------------------------------------------- queries

    def row_version(self) -> int | None:
        """What ``version`` gives (rows read under one value are still current), or None: read them each time."""
        return None if self.version is None else self.version()

    def get(self, ino: int) -> Inode:
        row = self.inodes.find(ino)
        if row is None:
            raise NoEntry(ino)
        return row

    def find(self, ino: int) -> Inode | None:
        """The inode, or None if it is gone."""
        return self.inodes.find(ino)

    def _child(self, parent: int, name: str) -> Inode | None:
        return self.inodes.child(parent, name)

    def count(self) -> int:
        return self.inodes.count()

    def nlink(self, row: Inode) -> int:
        """st_nlink: a directory 2 + its subdirectories once listed (1 before: ``find`` must not rely on it, as on
        file systems without link counts); anything else its names (0 once unlinked, while still open)."""
        if not row.is_dir:
            return (0 if row.is_orphan else 1) + row.links
        return 2 + self.inodes.count_subdirs(row.ino) if row.listed else 1

    def names(self, ino: int) -> list[int]:
        """The rows of every name of inode ``ino`` (its own unless orphaned, then its hard links')."""
        row = self.inodes.find(ino)
        own = [ino] if row is not None and not row.is_orphan else []
        return own + [r.ino for r in self.inodes.links(ino)]

    async def getattr(self, ino: int) -> Inode:
        """The inode's row, with its POSIX metadata applied (waits for its HEAD if needed)."""
        row = self.get(ino)
        if row.meta_etag is None:
            await self.meta.ensure(ino)
            row = self.get(ino)
        return row

    async def lookup(self, parent: int, name: str) -> Inode:
        """The entry ``name`` of directory ``parent``; loads only what it needs from S3. Raises NoEntry."""
        dir_row = self.get(parent)
        if not stat.S_ISDIR(dir_row.mode):
            raise NotADirectoryError(parent)
        row = self._child(parent, name)
        if self.loader.is_listing(dir_row.ino):
            # A later page may still turn a file of this name into a directory: wait until it is past.
            await self.loader.wait_listed(dir_row, until=dir_row.key + name + "/")
            row = self._child(parent, name)
        elif row is None and not dir_row.listed:
            await self.loader.lookup_unlisted(dir_row, name)
            row = self._child(parent, name)
        if row is None:
            raise NoEntry(name)
        return await self.getattr(row.node)

    async def entries(self, parent: int, after: int, limit: int = 256) -> list[Inode]:
        """Up to ``limit`` names of a directory with row numbers above ``after``, in order (waits for the listing).
        The HEADs of those whose metadata is pending start now, all at once; :meth:`entry` waits for one of them,
        so a readdir waits only for the entries the kernel takes, not for a whole page."""
        dir_row = self.get(parent)
        if not stat.S_ISDIR(dir_row.mode):
            raise NotADirectoryError(parent)
        if not dir_row.listed:
            await self.loader.wait_listed(dir_row, until=None)
        if after == 0:
            self.loader.list_subdirs_ahead(parent)
        rows = self.inodes.page(parent, after, limit, hidden=paths.CONTROL_NAME)  # hidden by the control file
        self.meta.start([r.ino for r in rows if r.meta_etag is None])
        return rows

    async def entry(self, row: Inode) -> Inode:
        """The inode that a name from :meth:`entries` stands for, its metadata applied (a hard link's: its inode)."""
        if row.link_of is None and row.meta_etag is not None:
            return row  # as read with the page: no query of its own (a warm ls -l of 5,000 entries)
        return await self.getattr(row.node)

    def files_after(self, parent: int, ino: int, limit: int) -> list[Inode]:
        """The next ``limit`` regular files of a directory after ``ino``, in listing order."""
        return self.inodes.files_after(parent, ino, limit)

    async def readlink(self, ino: int) -> str:
        row = await self.getattr(ino)
        if not stat.S_ISLNK(row.mode):
            raise OSError(22, "not a symbolic link")
        if row.target is None:
            body = await self.repo.get_object(row.key, row.etag)
            target = body.decode("utf-8", "surrogateescape")
            self.inodes.set_target(ino, target, len(body))
            return target
        return row.target

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
        row = self.inodes.find(ino)
        if row is not None and row.is_orphan and row.holder == self.host:  # not another host's open file
            with db.transaction(self.conn):
                self.exports.purged(row)  # a staging object that was its data goes too
                self.inodes.delete(ino)
            self.on_purge(ino)

    def purge_orphans(self) -> None:
        """At start-up: inodes unlinked while open in a previous run (of this host) are gone for good."""
        for ino in self.inodes.orphans(self.host):
            self._purge_if_unused(ino)

    # ----------------------------------------------------------------------------------------- listing

    # ----------------------------------------------------------------------------------------- local changes

    async def _writable_dir(self, parent: int) -> Inode:
        """A directory about to change: it must be listed completely first, or S3 could bring names back."""
        row = self.get(parent)
        if not stat.S_ISDIR(row.mode):
            raise NotADirectoryError(parent)
        if not row.listed:
            await self.loader.wait_listed(row, until=None)
        return self.get(parent)

    def _touch_dir(self, ino: int) -> None:
        now = time.time_ns()
        self.inodes.set_times(ino, now, now)

    def mark_dirty(self, ino: int, flags: int, delay: float = 0.0) -> None:
        """Record that ``ino`` needs exporting (in the caller's transaction: every name of an inode, or one hard
        link's name) and tell the exporter."""
        self.exports.mark_dirty(ino, flags)
        for name in self.names(ino):
            self.on_change(name, delay)

    async def create(
        self, parent: int, name: str, mode: int, owner: tuple[int, int], target: str | None = None, rdev: int = 0
    ) -> Inode:
        """A new entry of any type (``target``: a symlink's, ``rdev``: a device's number); owned by ``owner``,
        setgid directories honoured."""
        _check_new_name(parent, name)
        dir_row = await self._writable_dir(parent)
        if self._child(parent, name) is not None:
            raise FileExistsError(name)
        uid, gid = owner
        if dir_row.mode & stat.S_ISGID:
            gid = dir_row.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        with db.transaction(self.conn), _taken_is_eexist(name):
            ino = self.loader.insert(
                parent,
                name,
                mode,
                "",
                size=len(os.fsencode(target)) if target is not None else 0,
                meta_etag=IMPLIED,
                owner=(uid, gid),
                rdev=rdev,
            )
            self.inodes.drop_whiteout(parent, name)
            if stat.S_ISDIR(mode):
                self.inodes.set_listed(ino)
            if target is not None:
                self.inodes.set_target(ino, target, len(os.fsencode(target)))
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
        is_dir = stat.S_ISDIR(row.mode)
        if want_dir and not is_dir:
            raise NotADirectoryError(name)
        if not want_dir and is_dir:
            raise IsADirectoryError(name)
        if is_dir:
            await self._writable_dir(row.ino)
            if self.inodes.has_children(row.ino):
                raise OSError(errno.ENOTEMPTY, name)
        with db.transaction(self.conn):
            self._remove_name(row)
            self._touch_dir(parent)
        self._purge_if_unused(row.node)

    def _remove_name(self, row: Inode, in_s3: bool = True) -> None:
        """Take a name out of the tree, its name whited out; with ``in_s3``, its exported object is queued for
        deletion. The last name of an inode orphans it (purged once unused); an inode losing its own name while
        it has hard links takes the name of one of them, so that its row stays the one with a name."""
        if in_s3:
            if row.import_etag is not None:
                self.inodes.whiteout(row.parent, row.name)
            self.exports.detach(row.ino, row.exported_key)
            if row.exported_key:
                self.on_change(0, 0)
        else:
            self.exports.forget_object(row.ino)
        if not row.is_dir:
            self.inodes.set_ctime(row.node, time.time_ns())
        if row.link_of is not None:
            self.inodes.delete(row.ino)
            return
        links = self.inodes.links(row.ino)
        if not links:
            self.inodes.move(row.ino, ORPHAN, f"#{row.ino}")
            self.inodes.set_holder(row.ino, self.host)  # its data stays while this host holds it open
            return
        heir = links[0]
        self.inodes.delete(heir.ino)
        self.inodes.move(row.ino, heir.parent, heir.name)
        self.inodes.set_import_etag(row.ino, heir.import_etag)
        self.exports.take_name(row.ino, heir)
        self.on_change(row.ino, 0)

    async def link(self, ino: int, new_parent: int, new_name: str) -> Inode:
        """A new name of a file, symlink or special file (``link(2)``); exported as an object of its own."""
        _check_new_name(new_parent, new_name)
        await self._writable_dir(new_parent)
        row = await self.getattr(ino)
        if row.is_dir:
            raise PermissionError(errno.EPERM, "hard links to directories are not allowed")
        if row.is_orphan:
            raise NoEntry(ino)  # unlinked: link(2) of an open file with no name fails (ENOENT)
        if self._child(new_parent, new_name) is not None:
            raise FileExistsError(new_name)
        if self.nlink(row) >= LINK_MAX:
            raise OSError(errno.EMLINK, new_name)
        with db.transaction(self.conn), _taken_is_eexist(new_name):
            name = self.inodes.insert(
                parent=new_parent, name=new_name, mode=row.mode, owner=(row.uid, row.gid), key="", size=0,
                mtime_ns=row.mtime_ns, ctime_ns=row.ctime_ns, etag=None, src_limit=0, meta_etag=IMPLIED,
                exported_key=None, import_etag=None, link_of=ino,
            )  # fmt: skip
            self.inodes.drop_whiteout(new_parent, new_name)
            self.exports.mark_dirty(name, META | (DATA if stat.S_ISREG(row.mode) else 0))
            self.on_change(name, 0)
            self.inodes.set_ctime(ino, time.time_ns())
            self._touch_dir(new_parent)
        return self.get(ino)

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
        if dest is not None and dest.node == row.node:
            return  # two names of one inode (or the same name): POSIX says do nothing
        if dest is not None:
            if noreplace:
                raise FileExistsError(new_name)
            if stat.S_ISDIR(row.mode) and not stat.S_ISDIR(dest.mode):
                raise NotADirectoryError(new_name)
            if not stat.S_ISDIR(row.mode) and stat.S_ISDIR(dest.mode):
                raise IsADirectoryError(new_name)
            if stat.S_ISDIR(dest.mode):
                await self._writable_dir(dest.ino)
                if self.inodes.has_children(dest.ino):
                    raise OSError(errno.ENOTEMPTY, new_name)
        moved = [row.ino]
        if stat.S_ISDIR(row.mode):
            moved = await self.load_subtree(row.ino)
        with db.transaction(self.conn):
            if dest is not None:
                self._remove_name(dest)
            if row.import_etag is not None:
                self.inodes.whiteout(parent, name)
            self.inodes.drop_whiteout(new_parent, new_name)
            self.inodes.move(row.ino, new_parent, new_name)
            for ino in moved:
                self.exports.mark_moved(ino)  # the moved names only, not other names of their inodes
                self.on_change(ino, 0)
                self.inodes.set_import_etag(ino, None)  # now local
            self.inodes.set_ctime(row.node, time.time_ns())
            self._touch_dir(parent)
            self._touch_dir(new_parent)
        if dest is not None:
            self._purge_if_unused(dest.node)

    async def load_subtree(self, ino: int) -> list[int]:
        """List every directory below ``ino`` from S3 (as needed); returns the subtree's inodes, ``ino`` first."""
        out, todo = [], [ino]
        while todo:
            current = todo.pop()
            out.append(current)
            row = self.get(current)
            if stat.S_ISDIR(row.mode):
                if not row.listed:
                    await self.loader.wait_listed(row, until=None)
                todo += self.inodes.child_inos(current)
        return out

    def setattr(self, ino: int, changes: dict[str, int]) -> Inode:
        """Change mode, uid, gid, size, atime_ns or mtime_ns (size: the caller has cut the local data)."""
        row = self.get(ino)
        if "mode" in changes:
            changes["mode"] = stat.S_IFMT(row.mode) | stat.S_IMODE(changes["mode"])
        flags = META
        if "size" in changes:
            flags |= DATA
            changes["src_limit"] = min(row.src_limit, changes["size"])
        with db.transaction(self.conn):
            self.inodes.set_attrs(ino, changes)
            self.mark_dirty(ino, flags)
        return self.get(ino)

    def set_ctime(self, ino: int, ctime_ns: int) -> Inode:
        """A setattr of the ctime alone (``chown(-1, -1)``): nothing to export."""
        self.inodes.set_ctime(ino, ctime_ns)
        return self.get(ino)

    def writing(self, ino: int) -> None:
        """Data is about to be written: the file is dirty (its local parts authoritative) from now on, and in a
        cluster held by this host (its data is in this host's cache until the close puts it in shared storage)."""
        row = self.inodes.find(ino)
        if row is not None and (not row.dirty & DATA or row.holder != self.host):
            with db.transaction(self.conn):
                self.mark_dirty(ino, DATA, delay=math.inf)
                self.inodes.set_holder(ino, self.host)

    def wrote(self, ino: int, end: int) -> None:
        """Data was written up to ``end``: size and mtime (the export follows the last close)."""
        self.inodes.wrote(ino, end, time.time_ns())

    def path_key(self, ino: int) -> str:
        """The path of ``ino`` relative to the root, as an S3 key would spell it (``a/b/c``)."""
        names = []
        while ino != ROOT_INODE:
            row = self.get(ino)
            if row.parent == ORPHAN:
                raise NoEntry(ino)
            names.append(row.name)
            ino = row.parent
        return "/".join(reversed(names))

    # ----------------------------------------------------------------------------------------- imports

    def remove_imported(self, row: Inode) -> None:
        """An object deleted in S3: its name goes, without deleting anything in S3 (in the caller's transaction)."""
        self._remove_name(row, in_s3=False)
        self._purge_if_unused(row.node)

    def link_directory(self, root: str) -> int:
        """An association's directory (virtual key ``root``, 'a/b/'): made with its parents if missing, as
        directories of S3 (listed lazily from the association's prefix); one that exists is listed again from S3
        (its local entries stay). Returns its inode."""
        ino = ROOT_INODE
        with db.transaction(self.conn):
            key = ""
            for name in filter(None, root.split("/")):
                key += name + "/"
                row = self._child(ino, name)
                if row is None:
                    self.loader.add_imported_dir(ino, name, key)
                    row = self._child(ino, name)
                    assert row is not None
                elif not row.is_dir:
                    raise NotADirectoryError(key)
                ino = row.ino
            if ino != ROOT_INODE:
                self.inodes.relist(ino, root)
        return ino

    def find_key(self, key: str) -> Inode | None:
        """The entry at virtual key ``key`` ('a/b/' or 'a/b'), if the tree has it (nothing is loaded)."""
        row = self.inodes.find(ROOT_INODE)
        for name in filter(None, key.split("/")):
            if row is None:
                return None
            row = self._child(row.ino, name)
        return row

    def dirty_below(self, ino: int) -> list[int]:
        """The names in the subtree of directory ``ino`` that need exporting."""
        out, todo = [], [ino]
        while todo:
            current = todo.pop()
            for row in self.inodes.children(current):
                if row.dirty:
                    out.append(row.ino)
                if row.is_dir:
                    todo.append(row.ino)
        return out

    def unlink_directory(self, ino: int) -> list[int]:
        """An association removed: its directory and everything below leave the tree, nothing is deleted in S3
        (in one transaction; the caller exported what had to be). Returns the names removed, deepest first."""
        order, todo = [], [ino]
        while todo:
            current = todo.pop()
            order.append(current)
            todo += self.inodes.child_inos(current)
        rows = [r for r in (self.inodes.find(i) for i in reversed(order)) if r is not None]
        with db.transaction(self.conn):
            for row in rows:
                self._remove_name(row, in_s3=False)
                self.inodes.drop_whiteouts(row.ino)
        for row in rows:
            self._purge_if_unused(row.node)
        return [r.ino for r in rows]

    def separate(self, row: Inode) -> None:
        """Another writer replaced the object of a hard link's name: the name becomes a file of its own (in the
        caller's transaction; its new version is imported next)."""
        assert row.link_of is not None
        self.inodes.separate(row.ino, self.get(row.link_of))
        self.inodes.set_ctime(row.link_of, time.time_ns())


@contextlib.contextmanager
def _taken_is_eexist(name: str) -> Iterator[None]:
    """A name another host of the cluster created since this one looked: EEXIST, as if it had been seen."""
    try:
        yield
    except NameTaken:
        raise FileExistsError(name) from None


def _check_not_reserved(parent: int, name: str) -> None:
    """The control file's name at the root is not the namespace's to create, remove or rename (EPERM)."""
    if parent == ROOT_INODE and paths.is_reserved("", name):
        raise OSError(errno.EPERM, f"{name} at the root is reserved for lustrefs")


def _check_new_name(parent: int, name: str) -> None:
    _check_not_reserved(parent, name)
    if len(os.fsencode(name)) > paths.NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, name)
    if problem := paths.name_problem(name):
        raise OSError(errno.EINVAL, problem)
