"""The daemon's side of the control channel: the hidden file ``.lustrefs`` at the root of the mount.

The ``lustrefs`` CLI (through :mod:`lustrefs.client.control_client`) opens ``<mount>/.lustrefs`` read-write, writes
one request and reads the response from offset 0 to the end of file. It replaced ``user.lustrefs.*`` extended
attributes, which forced the daemon to answer every ``getxattr`` (two per entry of ``ls -l``); lustrefs.daemon.fs now
answers xattr requests ENOSYS, and the kernel stops sending them.

The file has a reserved inode number (``namespace.CONTROL_INODE``), is not listed by ``readdir``, and its name is
reserved at the root (``paths.CONTROL_NAME``): an S3 object of that name there is skipped with an event, and the
namespace refuses to create, remove or rename it (EPERM). lustrefs.daemon.fs routes the requests about it here. It is
opened with ``direct_io``: the kernel keeps no pages of it and sends every read here, whatever its size (always
0). Each open handle holds one request and its response; a later write starts a new request. A handle opened
read-only reads as the response to ``stats``: ``cat <mount>/.lustrefs`` shows the counters, and ``lustrefs stats``
works on a ``-o ro`` mount, where the kernel lets no one open the file for writing (EROFS).

Request, one JSON object (a trailing newline is allowed), run as soon as the bytes written form one; bytes
that end with a newline and are not one get an error response. A write out of order fails with EINVAL, one past
``MAX_REQUEST`` bytes with EFBIG::

    {"op": "<name>", "ino": <st_ino of the file the request is about>, "value": <a string, for some ops>}

Response::

    {"ok": true, "value": <the result, or null>}
    {"ok": false, "errno": <errno>, "code": <FSx error code, or null>, "message": "<why>"}

The write returns once the request has run (``hsm_archive`` once the file is exported). The caller is the
process that opened the handle (pyfuse3 gives ``write`` no caller): its uid, gid, and the supplementary groups
of ``/proc/<pid>/status`` at ``open`` (its gid alone if that process is gone or has other ids). The ops about
one file answer only about a file the caller could open: search (x) permission on every directory above it and
read permission on it, checked in POSIX order (owner, group, other), root passing every check, as the kernel
does with ``default_permissions``. For anyone but root, any other inode (an unlinked one too: it has no path)
answers ENOENT, as an inode that does not exist: the control file tells no one of entries they cannot reach.
Of the files a user can open, it may read the state; the actions on another user's file need root.

=====================  ========  =====================================================================
op                     ino       meaning
=====================  ========  =====================================================================
``stats``              root      JSON counters of the mount (cache, requests, dirty data, tasks, FUSE…)
``hsm_state``          file      ``{"flags", "archive_id"}`` (Lustre's hsm_states bits)
``hsm_action``         file      ``{"action", "state", "bytes"}`` (NOOP, ARCHIVE, RESTORE)
``hsm_archive``        file      export the file now; answers when it is exported
``hsm_release``        file      drop the cached data of an archived, unchanged file
``hsm_restore``        file      fetch the file's data into the cache in the background
``task``               root      ``value``: a new data repository task (JSON built by the CLI)
``task_cancel``        root      ``value``: the id of a task to cancel
=====================  ========  =====================================================================
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from lustrefs.constants import CONTROL_INODE, ROOT_INODE
from lustrefs.daemon import stats
from lustrefs.daemon.hsm import ActionError, Hsm
from lustrefs.daemon.tasks import TaskRunner
from lustrefs.data.cache import Cache
from lustrefs.errors import NoEntry
from lustrefs.paths import CONTROL_NAME
from lustrefs.store.inodes import ORPHAN
from lustrefs.sync.exporter import Writeback
from lustrefs.sync.importer import Importer
from lustrefs.tree.namespace import Namespace

log = logging.getLogger(__name__)

CONTROL_NAME_BYTES = os.fsencode(CONTROL_NAME)
READ_OPS = ("stats", "hsm_state", "hsm_action")
HSM_ACTIONS = ("hsm_archive", "hsm_release", "hsm_restore")
TASK_OPS = ("task", "task_cancel")
ROOT_OPS = ("stats", *TASK_OPS)  # asked of the mount root
MAX_REQUEST = 1024 * 1024  # bytes
ATTR_TIMEOUT = 1.0  # seconds the kernel may keep the control file's entry and attributes
FH_BASE = 1 << 48  # control file handles: far above those of fs.Operations, which count from 1

Response = dict[str, Any]


@dataclass(frozen=True)
class Caller:
    """Who a control handle acts for: the credentials of the process that opened it."""

    uid: int
    gid: int
    groups: frozenset[int]  # the gid and the supplementary groups

    @classmethod
    def of(cls, ctx: Any) -> Caller:
        """The caller of pyfuse3's ``open`` (``ctx``); groups from ``/proc/<pid>/status``, else the gid alone."""
        return cls(ctx.uid, ctx.gid, frozenset({ctx.gid, *_supplementary_groups(ctx.pid, ctx.uid, ctx.gid)}))

    def may(self, mask: int, mode: int, uid: int, gid: int) -> bool:
        """Whether the permission bits ``mask`` (``os.R_OK``…) of ``mode`` are granted to the caller."""
        if self.uid == 0:
            return True
        shift = 6 if self.uid == uid else 3 if gid in self.groups else 0  # one class only: owner, group, other
        return (mode >> shift) & mask == mask


def is_control(parent: int, name: bytes) -> bool:
    """Whether ``name`` in directory ``parent`` is the control file."""
    return parent == ROOT_INODE and name == CONTROL_NAME_BYTES


def error_response(err: int, code: str | None, message: str) -> Response:
    return {"ok": False, "errno": err, "code": code, "message": message}


def parse_request(data: bytes) -> tuple[str, int, str | None]:
    """``(op, ino, value)`` of a request; ActionError (EINVAL, BadRequest) if it is malformed."""
    try:
        request = json.loads(data)
    except ValueError as exc:
        raise ActionError(errno.EINVAL, "BadRequest", f"the request is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise ActionError(errno.EINVAL, "BadRequest", 'a request is a JSON object {"op": …, "ino": …, "value": …}')
    ino, value = request.get("ino"), request.get("value")
    if not isinstance(ino, int) or isinstance(ino, bool) or ino <= 0:
        raise ActionError(errno.EINVAL, "BadRequest", "the request's ino must be an inode number (st_ino)")
    if value is not None and not isinstance(value, str):
        raise ActionError(errno.EINVAL, "BadRequest", "the request's value must be a string")
    return request["op"], ino, value


class Control:
    """Runs the control requests; acts through the namespace, cache, exporter and importer."""

    def __init__(
        self,
        ns: Namespace,
        cache: Cache,
        writeback: Writeback,
        hsm: Hsm,
        tasks: TaskRunner,
        importer: Importer,
        more: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        """``more``: further parts of the stats (the cluster's role, the event queue's counters)."""
        self.ns = ns
        self.more = more
        self.cache = cache
        self.writeback = writeback
        self.importer = importer
        self.hsm = hsm
        self.tasks = tasks
        self.fuse = stats.FuseCounters()  # counted by fs.Operations

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run background restores and data repository tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.hsm.run)
            await nursery.start(self.tasks.run)
            task_status.started()

    def snapshot(self) -> dict[str, Any]:
        """The mount's counters (``lustrefs stats``)."""
        snapshot = stats.snapshot(self.ns, self.cache, self.fuse)
        snapshot["file_system_id"] = self.ns.events.file_system_id
        snapshot["export_queue"] = self.writeback.queue_length()
        snapshot["dirty"] = {
            "entries": self.ns.exports.count_dirty(),
            "bytes": self.cache.local_bytes(),
            "deletions": self.ns.exports.count_pending_deletes(),  # objects still to delete from S3
        }
        snapshot["hsm"] = {"archiving": len(self.hsm.archiving), "restoring": len(self.hsm.restoring)}
        snapshot["tasks"] = self.tasks.status()
        if self.importer is not None:
            snapshot["import"] = self.importer.status()
        snapshot.update(self.more())
        return snapshot

    async def handle(self, data: bytes, caller: Caller) -> Response:
        """Run one request (the bytes written) for ``caller``; the response, failures included."""
        try:
            op, ino, value = parse_request(data)
            result = await self._run(op, ino, value, caller)
        except ActionError as exc:
            return error_response(exc.errno, exc.code, exc.message)
        except NoEntry:
            return error_response(errno.ENOENT, None, os.strerror(errno.ENOENT))
        except OSError as exc:
            log.warning("control request failed: %s", exc)
            return error_response(exc.errno or errno.EIO, None, exc.strerror or str(exc))
        except Exception as exc:
            log.exception("control request failed")
            return error_response(errno.EIO, "InternalError", str(exc))
        return {"ok": True, "value": result}

    async def _run(self, op: str, ino: int, value: str | None, caller: Caller) -> Any:
        if op not in READ_OPS + HSM_ACTIONS + TASK_OPS:
            raise ActionError(errno.ENOTSUP, "BadRequest", f"unknown op {op!r}")
        if op in ROOT_OPS and ino != ROOT_INODE:
            raise ActionError(errno.ENOTSUP, "BadRequest", f"{op} is asked of the root of the mount")
        if op not in ROOT_OPS:
            await self._reachable(ino, caller)
        if op == "stats":
            return self.snapshot()
        if op == "hsm_state":
            return self.hsm.state(ino)
        if op == "hsm_action":
            return self.hsm.action(ino)
        if op in HSM_ACTIONS:
            self._owner_or_root(ino, caller, op.removeprefix("hsm_"))
            if op == "hsm_archive":
                await self.hsm.archive(ino)
            elif op == "hsm_release":
                self.hsm.release(ino)
            else:
                self.hsm.restore(ino)
            return None
        self._owner_or_root(ino, caller, "manage data repository tasks on")
        if value is None:
            raise ActionError(errno.EINVAL, "BadRequest", f"{op} needs a value")
        (self.tasks.submit if op == "task" else self.tasks.cancel)(value)
        return None

    async def _reachable(self, ino: int, caller: Caller) -> None:
        """NoEntry, as for no such inode, unless ``caller`` may search every directory above ``ino`` and read it."""
        self.ns.get(ino)  # NoEntry: no such inode
        at, mask = ino, os.R_OK
        while caller.uid != 0:
            row = await self.ns.getattr(at)  # the mode of the object's metadata, not the listing's defaults
            if row.parent == ORPHAN or not caller.may(mask, row.mode, row.uid, row.gid):
                raise NoEntry(ino)
            if at == ROOT_INODE:
                return
            at, mask = row.parent, os.X_OK

    def _owner_or_root(self, ino: int, caller: Caller, what: str) -> None:
        """FSx: only root may act on another user's file."""
        if caller.uid != 0 and caller.uid != self.ns.get(ino).uid:
            raise ActionError(errno.EPERM, "AccessDenied", f"only root or the owner may {what} this file")


@dataclass
class _Session:
    """One open handle of the control file: who opened it, the request being written, its response."""

    caller: Caller
    read_only: bool  # opened O_RDONLY: reads as the response to stats
    start: int = 0  # file offset of the request's first byte
    request: bytearray = field(default_factory=bytearray)
    response: bytes | None = None


class ControlFile:
    """The file ``.lustrefs`` at the mount root, as the FUSE handlers (lustrefs.daemon.fs) see it."""

    def __init__(self, control: Control) -> None:
        self.control = control
        self.sessions: dict[int, _Session] = {}
        self._next_fh = FH_BASE
        self._time_ns = time.time_ns()

    def attrs(self) -> pyfuse3.EntryAttributes:
        """An empty regular file anyone may read and write, owned by root."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = CONTROL_INODE
        a.generation = 0
        a.entry_timeout = ATTR_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = stat.S_IFREG | 0o666
        a.st_nlink = 1
        a.st_uid = a.st_gid = 0
        a.st_rdev = 0
        a.st_size = 0
        a.st_blksize = 4096
        a.st_blocks = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._time_ns
        return a

    def setattr(self, fields: pyfuse3.SetattrFields) -> pyfuse3.EntryAttributes:
        """Size and times are ignored (``O_TRUNC``, ``touch``); mode and owner cannot change (EPERM)."""
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self.attrs()

    def owns(self, fh: int) -> bool:
        """Whether ``fh`` is a handle of the control file."""
        return fh in self.sessions

    def open(self, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        """A new session for the caller of ``open`` (``write`` and ``read`` have no caller), with ``direct_io``."""
        fh = self._next_fh
        self._next_fh += 1
        self.sessions[fh] = _Session(Caller.of(ctx), flags & os.O_ACCMODE == os.O_RDONLY)
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Add to the request; once it is complete, run it and keep the response (the write waits for it)."""
        s = self.sessions[fh]
        if off == 0 or s.response is not None:
            s.start, s.request, s.response = off, bytearray(), None
        elif off != s.start + len(s.request):
            raise pyfuse3.FUSEError(errno.EINVAL)  # a request is written in order, and at most MAX_REQUEST bytes
        if len(s.request) + len(buf) > MAX_REQUEST:
            raise pyfuse3.FUSEError(errno.EFBIG)
        s.request += buf
        if _complete(s.request):
            request, s.request = bytes(s.request), bytearray()
            s.response = _encode(await self.control.handle(request, s.caller))
        return len(buf)

    def read(self, fh: int, off: int, size: int) -> bytes:
        """A slice of the response: of ``stats`` on a read-only handle, else an error if no request was written."""
        s = self.sessions[fh]
        if s.response is None and s.read_only:
            s.response = _encode({"ok": True, "value": self.control.snapshot()})  # kept: reads in pieces agree
        response = s.response
        if response is None:
            message = "no complete request was written on this handle (one JSON object, then a newline)"
            response = _encode(error_response(errno.EINVAL, "BadRequest", message))
        return response[off : off + size]

    def release(self, fh: int) -> None:
        del self.sessions[fh]


def _supplementary_groups(pid: int, uid: int, gid: int) -> list[int]:
    """The groups of process ``pid`` if its file system uid and gid are still ``uid`` and ``gid``, else none."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return []  # gone, or not in this PID namespace (pid 0)
    fields = {name: value.split() for name, _, value in (line.partition(":") for line in status.splitlines())}
    # Uid and Gid: real, effective, saved, file system (the ids the kernel sends FUSE).
    if fields.get("Uid", [])[3:] != [str(uid)] or fields.get("Gid", [])[3:] != [str(gid)]:
        return []  # another process now has that pid, or it changed its ids since the request
    return [int(g) for g in fields.get("Groups", [])]


def _complete(data: bytearray) -> bool:
    """Whether the bytes written form a request to run: they end with a newline, or are one JSON document."""
    if data.endswith(b"\n"):
        return True
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def _encode(response: Response) -> bytes:
    return json.dumps(response).encode() + b"\n"
