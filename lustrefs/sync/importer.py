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

from lustrefs import associations, paths
from lustrefs.constants import ROOT_INODE
from lustrefs.data.cache import Cache, first_error
from lustrefs.errors import FsxError
from lustrefs.events import EventLog
from lustrefs.s3.repository import AccessDenied, NotFound, ObjectInfo, ObjectStore, Unavailable
from lustrefs.store import db
from lustrefs.sync.s3events import S3Event
from lustrefs.tree import listing
from lustrefs.tree.namespace import Namespace

log = logging.getLogger(__name__)



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


# The legacy AutoImportPolicy values as the event lists of associations.
LEGACY_EVENTS = {
    "NONE": frozenset(),
    "NEW": frozenset({"NEW"}),
    "NEW_CHANGED": frozenset({"NEW", "CHANGED"}),
    "NEW_CHANGED_DELETED": frozenset({"NEW", "CHANGED", "DELETED"}),
}


class Importer:
    """Polls S3 and applies the file system's AutoImportPolicy (re-read from its record at every poll)."""

    def __init__(
        self,
        ns: Namespace,
        cache: Cache,
        repo: ObjectStore,
        events: EventLog,
        notifier: Notifier,
        policy: Callable[[str | None], frozenset[str]],
        state_file: Path,
        interval: float = 60.0,
        parallel: int = 8,
        locate: Callable[[str, str], str | None] = lambda bucket, key: key,
    ) -> None:
        self.ns = ns
        self.cache = cache
        self.repo = repo
        self.events = events
        self.notifier = notifier
        self.policy = policy
        self.locate = locate  # (bucket, key) of an S3 event -> the key this file system shows it at (or None)
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
            if self.policy(None):
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

    async def poll(self, dir_inos: list[int] | None = None, events: frozenset[str] | None = None) -> PollResult:
        """Re-list the loaded directories (or those given, and the loaded ones below them) and apply changes.

        ``events`` override the import policy (an import task imports new and changed objects whatever the
        policy, as FSx's IMPORT_METADATA_FROM_REPOSITORY does).
        """
        async with self._lock:
            started = time.monotonic()
            result = PollResult()
            dirs = self._loaded_dirs(dir_inos)
            try:
                async with trio.open_nursery() as nursery:
                    for ino in dirs:
                        nursery.start_soon(self._poll_dir, ino, events, result)
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

    async def _poll_dir(self, ino: int, events: frozenset[str] | None, result: PollResult) -> None:
        async with self._limiter:
            try:
                dir_key = self.ns.path_key(ino) + "/" if ino != ROOT_INODE else ""
            except Exception:  # moved away or removed meanwhile
                return
            events = self.policy(dir_key) if events is None else events
            spec = paths.listing_for(dir_key, self.ns.import_prefix)
            if not events or spec is None or spec.only_child is not None:
                return
            since = self.ns.exports.clock  # changes of this mount after this are newer than the listing
            dirs: set[str] = set()
            files: dict[str, ObjectInfo] = {}

            def collect(page: listing.Entries) -> None:
                dirs.update(name for name, _ in page.dirs)
                files.update(page.files)

            # Keys that are no POSIX names were reported when the directory was first listed.
            result.requests += await listing.each_page(self.repo, spec, collect, on_skip=lambda key, why: None)
            self._apply(ino, dir_key, dirs, files, events, result, since)

    def _apply(
        self,
        parent: int,
        dir_key: str,
        dirs: set[str],
        files: dict[str, ObjectInfo],
        events: frozenset[str],
        result: PollResult,
        since: int,
        only: set[str] | None = None,
    ) -> None:
        """Apply one directory's listing to SQLite, as the import ``events`` allow (in one transaction);
        ``only``: the listing is that of these names (an S3 event's), not of the whole directory."""
        conn, inodes = self.ns.conn, self.ns.inodes
        row = inodes.find(parent)
        if row is None or row.is_orphan:
            return
        listed = bool(row.listed)  # a directory known only through lookups gets its new names when it is listed
        local = {r.name: r for r in inodes.children(parent) if only is None or r.name in only}
        whiteouts = inodes.whiteouts(parent) if only is None else inodes.whiteouts(parent) & only
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
            for name in (dirs | files.keys()) - local.keys() - whiteouts if listed and "NEW" in events else ():
                if name in dirs:
                    self.ns.loader.add_imported_dir(parent, name, dir_key + name + "/")
                else:
                    self.ns.loader.add_imported_file(parent, name, files[name])
                self.notifier.entry(parent, name)  # the kernel may hold a negative entry
                result.new += 1
            if "CHANGED" in events:
                for name, obj in files.items():
                    row = settled.get(name)
                    if row is not None and stat.S_ISREG(row.mode):
                        self._changed(row, obj, result)
            if "DELETED" in events:
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

    # ----------------------------------------------------------------------------------------- S3 events

    async def apply_events(self, events: list[S3Event]) -> None:
        """Apply S3 event notifications (lustrefs.sync.s3events: in order per key, duplicates dropped) as the
        import policy allows; an event of a key this file system does not show is ignored. The poll stays the
        safety net: a lost event costs one poll interval."""
        async with self._lock:
            for event in events:
                key = self.locate(event.bucket, event.key)
                if key is not None and not key.endswith("/"):
                    info = None
                    if event.kind == "created":
                        mtime = int(event.time.timestamp() * 1e9)
                        info = ObjectInfo(key, event.size or 0, event.etag or "", mtime)
                    self._object_event(key, info, PollResult())

    def _object_event(self, key: str, info: ObjectInfo | None, result: PollResult) -> None:
        """One object created (``info``) or removed (None) at ``key``: the directories the tree has loaded on
        its way learn of it as a listing of that one name would tell them."""
        parent, dir_key = ROOT_INODE, ""
        *dirs, name = key.split("/")
        since = self.ns.exports.clock
        for part in dirs:
            row = self.ns.inodes.child(parent, part)
            if row is None or not row.is_dir:  # a new directory on the way down (an object appears in it)
                if info is not None:
                    self._apply(parent, dir_key, {part}, {}, self.policy(dir_key), result, since, only={part})
                    self.notifier.entry(parent, part)  # a directory only looked up in: its negative entry goes
                return
            parent, dir_key = row.ino, dir_key + part + "/"
        files = {name: info} if info is not None else {}
        self._apply(parent, dir_key, set(), files, self.policy(dir_key), result, since, only={name})
        self.notifier.entry(parent, name)

    def closed(self, ino: int) -> None:
        """The last handle of ``ino`` closed: drop data of versions replaced by an import meanwhile."""
        for etag in self.stale.pop(ino, ()):
            self.cache.drop_version(ino, etag)


def read_policy(load_record: Callable[[], dict[str, Any]]) -> Callable[[str | None], frozenset[str]]:
    """The import events of a directory (None: of any directory) as the file system's record says now: its
    legacy AutoImportPolicy for every directory, or the events of the association holding the directory."""

    def policy(dir_key: str | None) -> frozenset[str]:
        try:
            record = load_record()
        except (OSError, ValueError, FsxError):
            return frozenset()
        if record.get("_Associations") is not None:
            return associations.Associations.live(associations.from_record(record)).import_events(dir_key)
        conf = record.get("LustreConfiguration", {}).get("DataRepositoryConfiguration") or {}
        return LEGACY_EVENTS.get(conf.get("AutoImportPolicy") or "NONE", frozenset())

    return policy
