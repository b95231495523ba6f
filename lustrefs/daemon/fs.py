"""The FUSE request handlers: each translates one request into calls on the namespace and the cache.

No state lives here beyond open file handles. Every handler maps failures to an errno: an exception other
than ``FUSEError`` escaping a pyfuse3 handler would kill the mount.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import cachetools
import pyfuse3

from lustrefs import paths
from lustrefs.constants import CONTROL_INODE, MAX_FILE_BYTES
from lustrefs.daemon import control_channel
from lustrefs.daemon.control_channel import Control, ControlFile
from lustrefs.data.cache import Buffer, Cache, FileData, ObjectVersion
from lustrefs.data.prefetch import Prefetcher, ReadAhead
from lustrefs.errors import NoEntry
from lustrefs.s3.repository import NotFound, RepositoryError, VersionChanged
from lustrefs.store import db
from lustrefs.store.exports import DATA
from lustrefs.store.inodes import Inode
from lustrefs.sync.exporter import Writeback
from lustrefs.tree.namespace import Namespace

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
MKNOD_TYPES = (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)
BLOCK_SIZE = 128 * 1024  # st_blksize: the I/O size tools such as cp use


def fuse_op(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn every failure of a handler into a ``FUSEError`` with a meaningful errno."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except NoEntry:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except NotADirectoryError:
            raise pyfuse3.FUSEError(errno.ENOTDIR) from None
        except IsADirectoryError:
            raise pyfuse3.FUSEError(errno.EISDIR) from None
        except FileExistsError:
            raise pyfuse3.FUSEError(errno.EEXIST) from None
        except RepositoryError as exc:
            log.warning("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            log.warning("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _data_of(row: Inode) -> FileData:
    """The content of inode ``row``: its size, its clean data's object version, whether local parts hold it."""
    source = ObjectVersion(row.ino, row.key, row.etag, row.src_limit) if row.etag else None
    return FileData(row.ino, row.size, source, bool(row.dirty & DATA))


def _name(raw: bytes) -> str:
    """A name from the kernel; ENAMETOOLONG past NAME_MAX bytes, whatever the request (POSIX)."""
    if len(raw) > paths.NAME_MAX:
        raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
    return os.fsdecode(raw)


def _owner(ctx: Any) -> tuple[int, int]:
    return ctx.uid, ctx.gid


@dataclass
class _Handle:
    """An open file: the inode, its read-ahead state, and whether it was opened for writing."""

    ino: int
    read_ahead: ReadAhead
    writable: bool
    opened: FileData  # the content when opened: reads stay on it if S3 replaces the object meanwhile
    reimports: int  # the inode's re-import count when opened
    read_etag: str | None = None  # the object version this handle has read bytes of
    current: FileData | None = None  # the content as last read from the row, and the row version then
    current_version: int | None = None


class Operations(pyfuse3.Operations):
    """pyfuse3 operations of a lustrefs mount."""

    def __init__(
        self,
        namespace: Namespace,
        cache: Cache,
        prefetcher: Prefetcher,
        writeback: Writeback,
        control: Control,
        attr_timeout: float,
        negative_timeout: float,
    ) -> None:
        super().__init__()
        self.ns = namespace
        self.cache = cache
        self.prefetcher = prefetcher
        self.writeback = writeback
        self.control = control
        self.control_file = ControlFile(control)  # .lustrefs at the root: its handlers delegate to it
        self.attr_timeout = attr_timeout
        self.negative_timeout = negative_timeout
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        # ino -> ETag whose pages the kernel may hold (bounded: a forgotten entry only costs a re-read)
        self._page_cache_version: cachetools.LRUCache[int, tuple[str | None, int]] = cachetools.LRUCache(
            maxsize=100_000
        )

    def _attrs(self, row: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = row.ino
        a.generation = 0
        a.entry_timeout = self.attr_timeout
        a.attr_timeout = self.attr_timeout
        a.st_mode = row.mode
        a.st_nlink = self.ns.nlink(row)
        a.st_uid = row.uid
        a.st_gid = row.gid
        a.st_rdev = row.rdev
        a.st_size = row.size
        a.st_blksize = BLOCK_SIZE
        a.st_blocks = (row.size + 511) // 512
        a.st_atime_ns = row.atime_ns
        a.st_mtime_ns = row.mtime_ns
        a.st_ctime_ns = row.ctime_ns
        return a

    @fuse_op
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if control_channel.is_control(parent_inode, name):
            return self.control_file.attrs()
        try:
            row = await self.ns.lookup(parent_inode, _name(name))
        except NoEntry:
            negative = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the absence
            negative.entry_timeout = self.negative_timeout
            return negative
        self.ns.remember(row.ino)
        return self._attrs(row)

    @fuse_op
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode == CONTROL_INODE:
            return self.control_file.attrs()
        return self._attrs(await self.ns.getattr(inode))

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.ns.forget(ino, n)

    @fuse_op
    async def opendir(self, inode: int, ctx: Any) -> int:
        row = await self.ns.getattr(inode)
        if not stat.S_ISDIR(row.mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Entry ids: 1 and 2 for "." and "..", row number + 2 for the others (a hard link's name has a row of
        # its own). Row numbers only grow, so the ids stay valid while entries are added concurrently.
        if start_id < 2:
            row = await self.ns.getattr(fh)
            for next_id, name, ino in ((1, b".", fh), (2, b"..", row.parent))[start_id:]:
                if not pyfuse3.readdir_reply(token, name, self._attrs(await self.ns.getattr(ino)), next_id):
                    return
        after = max(start_id - 2, 0)
        while rows := await self.ns.entries(fh, after):
            for name in rows:
                inode = await self.ns.entry(name)
                if not pyfuse3.readdir_reply(token, os.fsencode(name.name), self._attrs(inode), name.ino + 2):
                    return
                self.ns.remember(inode.ino)
                after = name.ino

    @fuse_op
    async def releasedir(self, fh: int) -> None:
        return None

    @fuse_op
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.fsencode(await self.ns.readlink(inode))

    def _new_handle(self, row: Inode, writable: bool) -> int:
        """A handle of inode ``row`` (just read: its content is the handle's current one)."""
        fh = self._next_fh
        self._next_fh += 1
        ino, data = row.ino, _data_of(row)
        self._handles[fh] = _Handle(
            ino, self.prefetcher.new_handle(), writable, data, self.ns.loader.reimport_count(ino), None, data,
            self.ns.row_version(),
        )  # fmt: skip
        self.ns.opened(ino)
        if writable:
            self.writeback.opened_for_write(ino)
        return fh

    @fuse_op
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode == CONTROL_INODE:
            return self.control_file.open(flags, ctx)
        row = await self.ns.getattr(inode)
        if stat.S_ISDIR(row.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable and flags & os.O_TRUNC:  # libfuse enables atomic O_TRUNC: it comes here (times set if empty)
            row = self._truncate(inode, 0, {})
        fh = self._new_handle(row, writable)
        if not writable and not row.dirty & DATA:
            self.prefetcher.on_open(row.parent, inode, lambda n: self._versions_after(row.parent, inode, n))
        # Keep the kernel's pages only if they belong to the content being opened.
        version = (row.etag, row.data_gen if row.dirty & DATA else 0)
        keep = self._page_cache_version.get(inode) == version
        self._page_cache_version[inode] = version
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @fuse_op
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        row = await self.ns.create(parent_inode, _name(name), stat.S_IFREG | (mode & ~ctx.umask & 0o7777), _owner(ctx))
        self.ns.remember(row.ino)
        fh = self._new_handle(row, True)
        self._page_cache_version[row.ino] = (row.etag, row.data_gen)
        return pyfuse3.FileInfo(fh=fh), self._attrs(row)

    def _versions_after(self, parent: int, ino: int, n: int) -> list[ObjectVersion]:
        return [
            ObjectVersion(r.ino, r.key, r.etag, r.src_limit)
            for r in self.ns.files_after(parent, ino, n)
            if r.etag and not r.dirty & DATA
        ]

    def _data(self, ino: int) -> FileData:
        return _data_of(self.ns.get(ino))

    @fuse_op
    async def read(self, fh: int, off: int, size: int) -> Buffer:
        if self.control_file.owns(fh):
            return self.control_file.read(fh, off, size)
        handle = self._handles[fh]
        reimported = handle.reimports != self.ns.loader.reimport_count(handle.ino)
        data = handle.opened if reimported and not handle.opened.local else self._current(handle)
        if data.source is not None and not data.local:
            self.prefetcher.on_read(handle.read_ahead, data.source, off, size)
        try:
            buf = await self.cache.read(data, off, size)
        except (VersionChanged, NotFound):
            moved = self._data(handle.ino)
            if moved.source == data.source or reimported:  # not the move of its clean data by an export
                if not await self._reload_unread(handle.ino, data):
                    raise
                moved = self._data(handle.ino)
            data = moved  # an export (or another host's close) moved its clean data meanwhile: read it there
            buf = await self.cache.read(data, off, size)  # once: a version replaced again is ESTALE
        if data.source is not None:
            handle.read_etag = data.source.etag
        return buf

    def _current(self, handle: _Handle) -> FileData:
        """The content a read of ``handle`` sees: its row's, read again unless no row changed since (the cluster
        engine's rows are a round trip away; the embedded engine reads them each time)."""
        version = self.ns.row_version()
        if version is None or handle.current is None or handle.current_version != version:
            handle.current, handle.current_version = self._data(handle.ino), version
        return handle.current

    async def _reload_unread(self, ino: int, data: FileData) -> bool:
        """The version a read is pinned to is gone from S3. If no handle has read any of it, the file takes the
        object now in S3 (a lazy load of the current version) and the handles follow; else ESTALE stays."""
        old = data.source
        if old is None or any(h.ino == ino and h.read_etag == old.etag for h in self._handles.values()):
            return False
        if not await self.ns.loader.reload_unread(ino, old.etag):
            return False
        self.cache.drop_version(ino, old.etag)
        for h in self._handles.values():
            if h.ino == ino:
                h.opened, h.reimports = self._data(ino), self.ns.loader.reimport_count(ino)
        return True

    @fuse_op
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.control_file.owns(fh):
            return await self.control_file.write(fh, off, buf)
        ino = self._handles[fh].ino
        if off + len(buf) > MAX_FILE_BYTES:
            raise pyfuse3.FUSEError(errno.EFBIG)
        self.ns.writing(ino)
        await self.cache.write(self._data(ino), off, buf)
        self.ns.wrote(ino, off + len(buf))
        return len(buf)

    @fuse_op
    async def flush(self, fh: int) -> None:
        # Embedded engine: nothing to do at close (writes are on local disk once acknowledged; export follows
        # release); ENOSYS makes the kernel stop sending FLUSH: one round trip less per close. Cluster engine:
        # close-to-open, the data written here goes to shared storage before close(2) returns.
        if not self.writeback.stages:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        handle = self._handles.get(fh)
        if handle is not None and handle.writable:
            await self.writeback.stage(handle.ino)

    @fuse_op
    async def fsync(self, fh: int, datasync: bool) -> None:
        if self.control_file.owns(fh):
            return
        await self._sync(self._handles[fh].ino)
        await self.writeback.stage(self._handles[fh].ino)

    @fuse_op
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self._sync(fh)

    async def _sync(self, ino: int) -> None:
        """The data and the state records of ``ino`` on local disk."""
        await self.cache.sync(ino)
        with db.durable(self.ns.conn):
            self.ns.inodes.sync(ino)

    @fuse_op
    async def release(self, fh: int) -> None:
        if self.control_file.owns(fh):
            return self.control_file.release(fh)
        handle = self._handles.pop(fh)
        if handle.writable:
            self.writeback.closed_for_write(handle.ino)
        self.ns.closed(handle.ino)

    @fuse_op
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        if inode == CONTROL_INODE:
            return self.control_file.setattr(fields)
        changes: dict[str, int] = {}
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if fields.update_size:
            return self._attrs(self._truncate(inode, attr.st_size, changes))
        if changes:
            return self._attrs(self.ns.setattr(inode, changes))
        # Nothing else to set: chown(-1, -1), after which Linux file systems set the ctime (FUSE passes it as
        # FATTR_CTIME only with the writeback cache).
        await self.ns.getattr(inode)  # its metadata first (a HEAD would set the ctime again)
        return self._attrs(self.ns.set_ctime(inode, attr.st_ctime_ns if fields.update_ctime else time.time_ns()))

    def _truncate(self, inode: int, size: int, changes: dict[str, int]) -> Inode:
        """Set the size of a regular file (and any other ``changes``); data past ``size`` is gone."""
        if not stat.S_ISREG(self.ns.get(inode).mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if size > MAX_FILE_BYTES:
            raise pyfuse3.FUSEError(errno.EFBIG)
        self.cache.truncate(self._data(inode), size)
        return self.ns.setattr(inode, {**changes, "size": size, "mtime_ns": changes.get("mtime_ns", time.time_ns())})

    @fuse_op
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        row = await self.ns.create(parent_inode, _name(name), stat.S_IFDIR | (mode & ~ctx.umask & 0o7777), _owner(ctx))
        self.ns.remember(row.ino)
        return self._attrs(row)

    @fuse_op
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        row = await self.ns.create(parent_inode, _name(name), stat.S_IFLNK | 0o777, _owner(ctx), os.fsdecode(target))
        self.ns.remember(row.ino)
        return self._attrs(row)

    @fuse_op
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        entry = _name(name)
        kind = stat.S_IFMT(mode) or stat.S_IFREG  # mknod(2): a type of 0 is a regular file
        if kind not in MKNOD_TYPES:
            raise pyfuse3.FUSEError(errno.EINVAL)
        device = rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0  # the kernel checked CAP_MKNOD for devices
        perms = mode & ~ctx.umask & 0o7777
        row = await self.ns.create(parent_inode, entry, kind | perms, _owner(ctx), rdev=device)
        self.ns.remember(row.ino)
        return self._attrs(row)

    @fuse_op
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        row = await self.ns.link(inode, new_parent_inode, _name(new_name))
        self.ns.remember(row.ino)
        return self._attrs(row)

    @fuse_op
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.ns.unlink(parent_inode, _name(name), want_dir=False)

    @fuse_op
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.ns.unlink(parent_inode, _name(name), want_dir=True)

    @fuse_op
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int, ctx: Any
    ) -> None:
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE is not supported
        await self.ns.rename(
            parent_inode_old,
            _name(name_old),
            parent_inode_new,
            _name(name_new),
            noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
        )

    # Extended attributes are not supported. ENOSYS (not ENOTSUP) makes the kernel stop sending each kind of xattr
    # request for the whole connection and answer EOPNOTSUPP itself: ls -l no longer costs two round trips per entry.

    def _no_xattrs(self) -> pyfuse3.FUSEError:
        self.control.fuse.xattr_requests += 1
        return pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_op
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise self._no_xattrs()

    @fuse_op
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        raise self._no_xattrs()

    @fuse_op
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        raise self._no_xattrs()

    @fuse_op
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raise self._no_xattrs()

    @fuse_op
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        frsize = 4096
        s.f_bsize = BLOCK_SIZE
        s.f_frsize = frsize
        s.f_blocks = self.cache.capacity // frsize
        s.f_bfree = s.f_bavail = max(self.cache.capacity - self.cache.held, 0) // frsize
        files = self.ns.count()
        s.f_files = files + 1_000_000
        s.f_ffree = s.f_favail = 1_000_000
        s.f_namemax = 255
        return s
