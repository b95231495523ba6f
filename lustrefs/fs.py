"""The FUSE request handlers: each translates one request into calls on the namespace and the cache.

No state lives here beyond open file handles. Every handler maps failures to an errno: an exception other
than ``FUSEError`` escaping a pyfuse3 handler would kill the mount.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sqlite3
import stat
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import cachetools
import pyfuse3

from . import stats
from .cache import Cache, ObjectVersion
from .namespace import ROOT_INODE, Namespace, NoEntry
from .prefetch import Prefetcher, ReadAhead
from .repository import RepositoryError

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
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


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


class Operations(pyfuse3.Operations):
    """pyfuse3 operations of a read-only lustrefs mount."""

    def __init__(
        self, namespace: Namespace, cache: Cache, prefetcher: Prefetcher, attr_timeout: float, negative_timeout: float
    ) -> None:
        super().__init__()
        self.ns = namespace
        self.cache = cache
        self.prefetcher = prefetcher
        self.attr_timeout = attr_timeout
        self.negative_timeout = negative_timeout
        self._handles: dict[int, tuple[ObjectVersion, ReadAhead]] = {}
        self._next_fh = 1
        # ino -> ETag whose pages the kernel may hold (bounded: a forgotten entry only costs a re-read)
        self._page_cache_version: cachetools.LRUCache[int, str] = cachetools.LRUCache(maxsize=100_000)

    def _attrs(self, row: sqlite3.Row) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = row["ino"]
        a.generation = 0
        a.entry_timeout = self.attr_timeout
        a.attr_timeout = self.attr_timeout
        a.st_mode = row["mode"]
        a.st_nlink = 1
        a.st_uid = row["uid"]
        a.st_gid = row["gid"]
        a.st_rdev = 0
        a.st_size = row["size"]
        a.st_blksize = BLOCK_SIZE
        a.st_blocks = (row["size"] + 511) // 512
        a.st_atime_ns = row["atime_ns"]
        a.st_mtime_ns = row["mtime_ns"]
        a.st_ctime_ns = row["ctime_ns"]
        return a

    @fuse_op
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        try:
            row = await self.ns.lookup(parent_inode, _name(name))
        except NoEntry:
            negative = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the absence
            negative.entry_timeout = self.negative_timeout
            return negative
        self.ns.remember(row["ino"])
        return self._attrs(row)

    @fuse_op
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(await self.ns.getattr(inode))

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.ns.forget(ino, n)

    @fuse_op
    async def opendir(self, inode: int, ctx: Any) -> int:
        row = await self.ns.getattr(inode)
        if not stat.S_ISDIR(row["mode"]):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Entry ids: 1 and 2 for "." and "..", inode + 2 for the others. Inode numbers only grow, so the ids
        # stay valid while entries are added concurrently.
        if start_id < 2:
            row = await self.ns.getattr(fh)
            for next_id, name, ino in ((1, b".", fh), (2, b"..", row["parent"]))[start_id:]:
                if not pyfuse3.readdir_reply(token, name, self._attrs(await self.ns.getattr(ino)), next_id):
                    return
        after = max(start_id - 2, 0)
        while rows := await self.ns.entries(fh, after):
            for row in rows:
                if not pyfuse3.readdir_reply(token, os.fsencode(row["name"]), self._attrs(row), row["ino"] + 2):
                    return
                self.ns.remember(row["ino"])
                after = row["ino"]

    @fuse_op
    async def releasedir(self, fh: int) -> None:
        return None

    @fuse_op
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.fsencode(await self.ns.readlink(inode))

    @fuse_op
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        row = await self.ns.getattr(inode)
        if stat.S_ISDIR(row["mode"]):
            raise pyfuse3.FUSEError(errno.EISDIR)
        version = ObjectVersion(inode, row["key"], row["etag"], row["size"])
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = (version, self.prefetcher.new_handle())
        self.prefetcher.on_open(row["parent"], inode, lambda n: self._versions_after(row["parent"], inode, n))
        # Keep the kernel's pages only if they belong to the version being opened.
        keep = self._page_cache_version.get(inode) == version.etag
        self._page_cache_version[inode] = version.etag
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    def _versions_after(self, parent: int, ino: int, n: int) -> list[ObjectVersion]:
        return [ObjectVersion(r["ino"], r["key"], r["etag"], r["size"]) for r in self.ns.files_after(parent, ino, n)]

    @fuse_op
    async def read(self, fh: int, off: int, size: int) -> bytes:
        version, read_ahead = self._handles[fh]
        self.prefetcher.on_read(read_ahead, version, off, size)
        return await self.cache.read(version, off, size)

    @fuse_op
    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @fuse_op
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if inode == ROOT_INODE and name == stats.STATS_XATTR:
            return json.dumps(stats.snapshot(self.ns, self.cache)).encode()
        raise pyfuse3.FUSEError(errno.ENODATA)

    @fuse_op
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [stats.STATS_XATTR] if inode == ROOT_INODE else []

    @fuse_op
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        frsize = 4096
        s.f_bsize = BLOCK_SIZE
        s.f_frsize = frsize
        s.f_blocks = self.cache.capacity // frsize
        s.f_bfree = s.f_bavail = max(self.cache.capacity - self.cache.used, 0) // frsize
        files = self.ns.count()
        s.f_files = files + 1_000_000
        s.f_ffree = s.f_favail = 1_000_000
        s.f_namemax = 255
        return s
