"""Automatic import: following changes made in S3 by other clients, as ``AutoImportPolicy`` says.

A poller re-lists every directory the mount has loaded and compares each listing with SQLite (ETag for
files, presence for both), never downloading data. What the policy allows is applied:

| policy                | new object | changed object                       | deleted object                |
| NONE                  | -          | -                                    | -                             |
| NEW                   | imported   | -                                    | -                             |
| NEW_CHANGED           | imported   | re-imported (cached data dropped)    | -                             |
| NEW_CHANGED_DELETED   | imported   | re-imported                          | removed (directories if empty)|

Local changes win: a dirty file is not overwritten (the conflict is logged), a name removed or renamed
locally is not brought back (whiteouts), entries created or moved locally are not deleted. Kernel caches
are invalidated by one notifier task, in a worker thread, outside any request handler.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from lustrefs import paths
from lustrefs.constants import ROOT_INODE
from lustrefs.data.cache import Cache, first_error
from lustrefs.errors import FsxError
from lustrefs.events import EventLog
from lustrefs.s3.repository import AccessDenied, NotFound, ObjectInfo, ObjectStore, Unavailable
from lustrefs.store import db
from lustrefs.tree import listing
from lustrefs.tree.namespace import Namespace

log = logging.getLogger(__name__)

POLICIES = ("NONE", "NEW", "NEW_CHANGED", "NEW_CHANGED_DELETED")


@dataclass
class PollResult:
    """What one poll found and did."""

    new: int = 0
    changed: int = 0
    deleted: int = 0
    conflicts: int = 0
    requests: int = 0  # LIST requests
    seconds: float = 0.0


class Notifier:
    """Kernel cache invalidations, one at a time in a worker thread (they may block in the kernel)."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self._send, self._recv = trio.open_memory_channel[tuple[int, bytes | None]](math.inf)
        self._limiter = trio.CapacityLimiter(1)

    def inode(self, ino: int) -> None:
        if ino in self.ns.lookup_counts:  # the kernel knows it
            self._send.send_nowait((ino, None))

    def entry(self, parent: int, name: str) -> None:
        self._send.send_nowait((parent, os.fsencode(name)))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for ino, name in self._recv:
            try:
                if name is None:
                    # Open files keep their pages (reads stay pinned to their version); attributes go now.
                    attr_only = ino in self.ns.open_counts
                    await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, attr_only, limiter=self._limiter)
                else:
                    await trio.to_thread.run_sync(pyfuse3.invalidate_entry, ino, name, limiter=self._limiter)
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # the kernel did not know it: nothing to drop
                    log.warning("kernel invalidation of %s %r failed: %s", ino, name, exc)


class Importer:
    """Polls S3 and applies the file system's AutoImportPolicy (re-read from its record at every poll)."""

    def __init__(
        self,
        ns: Namespace,
        cache: Cache,
        repo: ObjectStore,
        events: EventLog,
        notifier: Notifier,
        policy: Callable[[], str],
        state_file: Path,
        interval: float = 60.0,
        parallel: int = 8,
    ) -> None:
        self.ns = ns
        self.cache = cache
        self.repo = repo
        self.events = events
        self.notifier = notifier
        self.policy = policy
        self.state_file = state_file
        self.interval = interval
        self._limiter = trio.CapacityLimiter(parallel)
        self._lock = trio.Lock()  # one poll at a time
        self.lifecycle = "AVAILABLE"
        self.failure: str | None = None
        self.last_poll: float | None = None
        self.cycles = 0  # poll intervals elapsed (a poll runs in each unless the policy is NONE)
        self.last_result = PollResult()
        self.stale: dict[int, set[str]] = {}  # ino -> ETags whose cached data waits for the last close

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll every ``interval`` seconds while the policy is not NONE."""
        self._write_state()
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            if self.policy() != "NONE":
                await self.poll()
            self.cycles += 1

    def status(self) -> dict[str, Any]:
        return {
            "lifecycle": self.lifecycle,
            "cycles": self.cycles,
            "last_poll": self.last_poll,
            "last_poll_seconds": self.last_result.seconds,
            "last_poll_requests": self.last_result.requests,
        }

    def _write_state(self) -> None:
        state: dict[str, Any] = {"Lifecycle": self.lifecycle, **self.status()}
        if self.failure:
            state["FailureDetails"] = {"Message": self.failure[:256]}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)

    def _set_lifecycle(self, lifecycle: str, failure: str | None) -> None:
        if (lifecycle, failure) != (self.lifecycle, self.failure):
            log.warning("data repository is %s%s", lifecycle, f": {failure}" if failure else "")
            if failure:
                self.events.emit("ERROR", "S3ImportMisconfigured", failure)
        self.lifecycle, self.failure = lifecycle, failure

    # ----------------------------------------------------------------------------------------- polling

    async def poll(self, dir_inos: list[int] | None = None, policy: str | None = None) -> PollResult:
        """Re-list the loaded directories (or those given, and the loaded ones below them) and apply changes.

        ``policy`` overrides the file system's AutoImportPolicy (an import task imports new and changed objects
        whatever the policy, as FSx's IMPORT_METADATA_FROM_REPOSITORY does).
        """
        async with self._lock:
            started = time.monotonic()
            result = PollResult()
            policy = policy or self.policy()
            dirs = self._loaded_dirs(dir_inos)
            try:
                async with trio.open_nursery() as nursery:
                    for ino in dirs:
                        nursery.start_soon(self._poll_dir, ino, policy, result)
            except BaseExceptionGroup as group:
                err = first_error(group)
                if isinstance(err, AccessDenied | NotFound):
                    self._set_lifecycle("MISCONFIGURED", f"Cannot list s3://{self.repo.bucket}: {err}")
                elif not isinstance(err, Unavailable):
                    log.exception("poll failed", exc_info=err)
                log.warning("poll failed: %s", err)
            else:
                self._set_lifecycle("AVAILABLE", None)
            result.seconds = time.monotonic() - started
            self.last_poll, self.last_result = time.time(), result
            self._write_state()
            return result

    def _loaded_dirs(self, roots: list[int] | None) -> list[int]:
        """Directories listed, or partly known through lookups (and, given ``roots``, only those below them)."""
        rows = self.ns.inodes.loaded_dirs()
        if roots is None:
            return [r[0] for r in rows]
        children: dict[int, list[int]] = {}
        for ino, parent in rows:
            if ino != ROOT_INODE:
                children.setdefault(parent, []).append(ino)
        listed = {r[0] for r in rows}
        out, todo = [], [r for r in roots if r in listed]
        while todo:
            ino = todo.pop()
            out.append(ino)
            todo += children.get(ino, [])
        return out

    async def _poll_dir(self, ino: int, policy: str, result: PollResult) -> None:
        async with self._limiter:
            try:
                dir_key = self.ns.path_key(ino) + "/" if ino != ROOT_INODE else ""
            except Exception:  # moved away or removed meanwhile
                return
            spec = paths.listing_for(dir_key, self.ns.import_prefix)
            if spec is None or spec.only_child is not None:
                return
            since = self.ns.exports.clock  # changes of this mount after this are newer than the listing
            dirs: set[str] = set()
            files: dict[str, ObjectInfo] = {}

            def collect(page: listing.Entries) -> None:
                dirs.update(name for name, _ in page.dirs)
                files.update(page.files)

            # Keys that are no POSIX names were reported when the directory was first listed.
            result.requests += await listing.each_page(self.repo, spec, collect, on_skip=lambda key, why: None)
            self._apply(ino, dir_key, dirs, files, policy, result, since)

    def _apply(
        self,
        parent: int,
        dir_key: str,
        dirs: set[str],
        files: dict[str, ObjectInfo],
        policy: str,
        result: PollResult,
        since: int,
    ) -> None:
        """Apply one directory's listing to SQLite, as the policy allows (in one transaction)."""
        conn, inodes = self.ns.conn, self.ns.inodes
        row = inodes.find(parent)
        if row is None or row.is_orphan:
            return
        listed = bool(row.listed)  # a directory known only through lookups gets its new names when it is listed
        local = {r.name: r for r in inodes.children(parent)}
        whiteouts = inodes.whiteouts(parent)
        files = {n: o for n, o in files.items() if n not in dirs}  # a directory wins over a file
        # This mount's own objects are no imports: those it is writing or deleting, and those it wrote or deleted
        # since the listing began (the listing may predate the change). Unknown history: nothing is decided.
        recent = self.ns.exports.changed_since(since)
        if recent is None:
            return
        ours = self.ns.exports.own_keys_under(dir_key) | recent
        dirs = {n for n in dirs if dir_key + n + "/" not in ours}
        files = {n: o for n, o in files.items() if o.key not in ours}
        settled = {n: r for n, r in local.items() if dir_key + n not in ours and dir_key + n + "/" not in ours}
        with db.transaction(conn):
            for name in whiteouts - dirs - files.keys():  # gone from S3 too: forget the whiteout
                inodes.drop_whiteout(parent, name)
            if policy == "NONE":
                return
            for name in (dirs | files.keys()) - local.keys() - whiteouts if listed else ():
                if name in dirs:
                    self.ns.loader.add_imported_dir(parent, name, dir_key + name + "/")
                else:
                    self.ns.loader.add_imported_file(parent, name, files[name])
                self.notifier.entry(parent, name)  # the kernel may hold a negative entry
                result.new += 1
            if policy in ("NEW_CHANGED", "NEW_CHANGED_DELETED"):
                for name, obj in files.items():
                    row = settled.get(name)
                    if row is not None and stat.S_ISREG(row.mode):
                        self._changed(row, obj, result)
            if policy == "NEW_CHANGED_DELETED":
                for name, row in settled.items():
                    if name not in dirs and name not in files and row.import_etag is not None:
                        self._deleted(row, result)

    def _changed(self, row: Any, obj: ObjectInfo, result: PollResult) -> None:
        if obj.etag in (row.import_etag, row.etag):
            if row.import_etag != obj.etag:  # our own export at this path: adopt it as imported
                self.ns.inodes.set_import_etag(row.ino, obj.etag)
            return
        if row.dirty:
            result.conflicts += 1
            self.events.emit(
                "WARN",
                "S3ImportConflictLocalChangesKept",
                f"The S3 object {obj.key} changed while the file had local changes; the local file is kept and"
                " will be exported.",
                key=obj.key,
            )
            self.ns.inodes.set_import_etag(row.ino, obj.etag)
            return
        if row.link_of is not None:  # a hard link's name: the new object makes it a file of its own
            self.ns.separate(row)
            self.notifier.entry(row.parent, row.name)
            self.notifier.inode(row.link_of)
        elif row.etag and row.ino in self.ns.open_counts:
            self.stale.setdefault(row.ino, set()).add(row.etag)  # open files keep reading what they opened
        elif row.etag:
            self.cache.drop_version(row.ino, row.etag)
        self.ns.loader.reimport_file(row.ino, obj)
        self.notifier.inode(row.ino)
        result.changed += 1

    def _deleted(self, row: Any, result: PollResult) -> None:
        if row.dirty:
            return  # a local change keeps the entry; it will be exported
        if row.is_dir and self.ns.inodes.has_children(row.ino):
            return  # a directory is removed only when empty
        self.ns.remove_imported(row)
        self.notifier.entry(row.parent, row.name)
        result.deleted += 1

    def closed(self, ino: int) -> None:
        """The last handle of ``ino`` closed: drop data of versions replaced by an import meanwhile."""
        for etag in self.stale.pop(ino, ()):
            self.cache.drop_version(ino, etag)


def read_policy(load_record: Callable[[], dict[str, Any]]) -> Callable[[], str]:
    """A function returning the current AutoImportPolicy (the record may be updated while mounted)."""

    def policy() -> str:
        try:
            conf = load_record()["LustreConfiguration"]["DataRepositoryConfiguration"]
        except (KeyError, OSError, ValueError, FsxError):
            return "NONE"
        value = conf.get("AutoImportPolicy") or "NONE"
        return value if value in POLICIES else "NONE"

    return policy
