"""Export: writing new and changed entries back to the export prefix, and deleting removed ones.

An entry is dirty in SQLite (``inodes.dirty``) from the local change until its export succeeded, so nothing
is lost to a crash: at start-up every dirty entry is exported again. Content changes are exported once the
file is closed and has been idle for ``delay`` seconds; metadata changes and renames at once. A failed export
is logged in the event log and retried with backoff; the file stays dirty (and in the cache) meanwhile.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from . import db
from .cache import Cache, FileData, ObjectVersion, first_error
from .events import EventLog
from .metadata import to_user_metadata
from .namespace import DATA, ORPHAN, ROOT_INODE, Namespace, NoEntry
from .repository import AccessDenied, Repository, RepositoryError

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 1024
MAX_FILE_SIZE = 5 * 1024**4
MAX_COPY_SIZE = 5 * 1024**3  # larger objects cannot be copied by one CopyObject
EVENTS = ("NEW", "CHANGED", "DELETED")


@dataclass(frozen=True)
class ExportTarget:
    """Where paths go: ``base + path`` (``base`` is '' when the export prefix is the import prefix)."""

    base: str

    @classmethod
    def of(cls, import_prefix: str, export_prefix: str) -> ExportTarget:
        export = export_prefix.rstrip("/")
        if export in ("", import_prefix.rstrip("/")):
            return cls("")
        return cls(export + "/")

    def key(self, path: str, is_dir: bool) -> str:
        return self.base + path + ("/" if is_dir else "")


@dataclass
class _State:
    due: dict[int, float] = field(default_factory=dict)  # ino -> monotonic time it may be exported
    running: set[int] = field(default_factory=set)
    failures: dict[int, int] = field(default_factory=dict)  # ino -> consecutive failures (backoff)
    errors: dict[int, str] = field(default_factory=dict)  # ino -> last error, for the unmount report
    given_up: dict[int, int] = field(default_factory=dict)  # ino -> data_gen it cannot be exported at
    writers: dict[int, int] = field(default_factory=dict)  # ino -> handles open for writing


class Writeback:
    """The exporter: one trio task scheduling exports, a few running at once."""

    def __init__(
        self,
        ns: Namespace,
        cache: Cache,
        repo: Repository,
        events: EventLog,
        target: ExportTarget,
        policy: Callable[[], frozenset[str]] = lambda: frozenset(EVENTS),
        delay: float = 3.0,
        upload_part: int = 8 * 1024 * 1024,
        parallel_files: int = 4,
    ) -> None:
        self.ns = ns
        self.cache = cache
        self.repo = repo
        self.events = events
        self.target = target
        self.policy = policy
        self.delay = delay
        self.upload_part = upload_part
        self.s = _State()
        self._wake = trio.Event()
        self._files = trio.CapacityLimiter(parallel_files)
        self._delete_backoff = 0.0

    # ----------------------------------------------------------------------------------------- scheduling

    def schedule(self, ino: int, delay: float) -> None:
        """``ino`` changed: export it after ``delay`` seconds (inf: when its writers close it). 0 wakes only."""
        if ino:
            at = time.monotonic() + delay if ino not in self.s.writers else math.inf
            self.s.due[ino] = min(self.s.due.get(ino, math.inf), at) if delay == 0 else at
        self._wake.set()

    def opened_for_write(self, ino: int) -> None:
        self.s.writers[ino] = self.s.writers.get(ino, 0) + 1

    def closed_for_write(self, ino: int) -> None:
        left = self.s.writers.get(ino, 0) - 1
        if left > 0:
            self.s.writers[ino] = left
            return
        self.s.writers.pop(ino, None)
        self.schedule(ino, self.delay)  # export() returns at once if nothing is dirty

    def queue_length(self) -> int:
        return len(self.s.due) + len(self.s.running)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Export what is due until cancelled; at start, everything left dirty by a previous run."""
        for (ino,) in self.ns.conn.execute("SELECT ino FROM inodes WHERE dirty != 0 AND parent != ?", (ORPHAN,)):
            self.s.due[ino] = time.monotonic()
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await self._delete_pending()
                now = time.monotonic()
                for ino in [i for i, t in self.s.due.items() if t <= now and i not in self.s.running]:
                    del self.s.due[ino]
                    self.s.running.add(ino)
                    nursery.start_soon(self._export_one, ino)
                wait = min(self.s.due.values(), default=math.inf) - now
                if self.ns.conn.execute("SELECT 1 FROM pending_deletes LIMIT 1").fetchone():
                    wait = min(wait, max(self._delete_backoff - now, 0.05))
                with trio.move_on_after(max(wait, 0.0) if wait != math.inf else math.inf):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def flush(self, timeout: float) -> list[tuple[str, str]]:
        """Export everything dirty now (at unmount); returns (path, reason) of what is still not exported."""
        deadline = time.monotonic() + timeout
        last_report = 0.0
        self.s.writers.clear()
        while time.monotonic() < deadline:
            waiting = self._left(include_refused=False)
            if not waiting:
                break
            for ino in waiting:
                if ino and ino not in self.s.running:
                    self.s.due[ino] = 0.0
            self._delete_backoff = 0.0
            self._wake.set()
            if time.monotonic() - last_report > 5:
                log.info("unmount: %d entries still to export", len(waiting))
                last_report = time.monotonic()
            await trio.sleep(0.05)
        return [(self._path(ino), self.s.errors.get(ino, "not exported in time")) for ino in self._left()]

    def _left(self, include_refused: bool = True) -> list[int]:
        """Dirty entries (0 for pending deletions); without those refused at their current version."""
        rows = self.ns.conn.execute("SELECT ino, data_gen FROM inodes WHERE dirty != 0 AND parent != ?", (ORPHAN,))
        left = [ino for ino, gen in rows if include_refused or self.s.given_up.get(ino) != gen]
        if self.ns.conn.execute("SELECT 1 FROM pending_deletes LIMIT 1").fetchone():
            left.append(0)
        return left

    def _path(self, ino: int) -> str:
        if ino == 0:
            return "(pending deletions)"
        try:
            return "/" + self.ns.path_key(ino)
        except NoEntry:
            return f"(inode {ino})"

    # ----------------------------------------------------------------------------------------- exporting

    async def _export_one(self, ino: int) -> None:
        try:
            async with self._files:
                await self.export(ino)
            self.s.failures.pop(ino, None)
            self.s.errors.pop(ino, None)
        except (RepositoryError, OSError, BaseExceptionGroup) as exc:
            err = first_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
            n = self.s.failures[ino] = self.s.failures.get(ino, 0) + 1
            code = "S3ExportAccessDenied" if isinstance(err, AccessDenied) else "S3ExportFailed"
            self.s.errors[ino] = f"{code}: {err}"
            self.events.emit(
                "ERROR", code, f"Export of {self._path(ino)} failed (attempt {n}): {err}", path=self._path(ino)
            )
            self.s.due.setdefault(ino, time.monotonic() + min(2.0**n, 60.0))
        except NoEntry:
            pass
        except Exception as exc:
            log.exception("export of inode %d failed", ino)
            self.s.errors[ino] = f"InternalError: {exc}"
            self.s.due.setdefault(ino, time.monotonic() + 60.0)
        finally:
            self.s.running.discard(ino)
            self._wake.set()

    async def export(self, ino: int, explicit: bool = False) -> None:
        """Export one entry now (its content, metadata and name) if it is dirty.

        ``explicit`` (hsm_archive, export tasks): the AutoExportPolicy does not apply, and a refusal is retried.
        """
        row = self.ns.get(ino)
        if row["dirty"] == 0 or row["parent"] == ORPHAN:
            return
        if ino == ROOT_INODE:
            with db.transaction(self.ns.conn):
                self.ns.conn.execute("UPDATE inodes SET dirty = 0 WHERE ino = ?", (ino,))
            return
        if ino in self.s.writers:
            self.s.due[ino] = math.inf  # exported when closed
            return
        gen, path = row["data_gen"], self.ns.path_key(ino)
        is_dir = stat.S_ISDIR(row["mode"])
        desired = self.target.key(path, is_dir)
        old_key = row["exported_key"]
        if self.s.given_up.get(ino) == gen and not explicit:
            return
        if problem := self._refusal(row, desired, old_key, explicit):
            code, message = problem
            self.s.given_up[ino] = gen
            self.s.errors[ino] = f"{code}: {message}"
            self.events.emit("ERROR", code, message, path="/" + path)
            return
        meta = to_user_metadata(row["mode"], row["uid"], row["gid"], row["mtime_ns"], row["atime_ns"])
        source = ObjectVersion(ino, row["key"], row["etag"], row["src_limit"]) if row["etag"] else None
        if is_dir:
            etag = await self.repo.put(desired, b"", meta)
        elif stat.S_ISLNK(row["mode"]):
            etag = await self.repo.put(desired, (await self.ns.readlink(ino)).encode("utf-8", "surrogateescape"), meta)
        elif not row["dirty"] & DATA and source is not None and source.size == row["size"] <= MAX_COPY_SIZE:
            etag = await self.repo.copy(source.key, source.etag, desired, meta)  # unchanged data: server-side
        else:
            data = FileData(ino, row["size"], source, bool(row["dirty"] & DATA))
            if row["size"] <= self.upload_part:
                etag = await self.repo.put(desired, await self.cache.read_bytes(data, 0, row["size"]), meta)
            else:
                etag = await self.repo.multipart_upload(
                    desired, row["size"], self.upload_part, lambda off, n: self.cache.read_bytes(data, off, n), meta
                )
        if old_key and old_key != desired and "DELETED" in self.policy():
            await self.repo.delete(old_key)
        self._exported(ino, gen, desired, etag, source, row["size"], is_dir or stat.S_ISLNK(row["mode"]))

    def _refusal(self, row: sqlite3.Row, desired: str, old_key: str | None, explicit: bool) -> tuple[str, str] | None:
        """Why this entry is not exported (FSx's codes), or None."""
        if len(desired.encode()) > MAX_KEY_BYTES:
            return "PathSizeTooLong", f"The key {desired[:80]}… is longer than {MAX_KEY_BYTES} bytes; not exported."
        if row["size"] > MAX_FILE_SIZE:
            return "FileSizeTooLarge", f"{desired} is larger than 5 TiB; not exported."
        event = "NEW" if old_key is None else "CHANGED"
        if not explicit and event not in self.policy():
            return "ExportSkippedByPolicy", f"{desired}: {event} events are not exported (AutoExportPolicy)."
        return None

    def _exported(
        self, ino: int, gen: int, key: str, etag: str, source: ObjectVersion | None, size: int, no_data: bool
    ) -> None:
        """Record a finished export of ``size`` bytes; the entry is clean unless it changed meanwhile.

        For a file, the new object becomes its clean data either way (an export to the same key replaced the
        old version): bytes changed during the upload are in local parts, which stay authoritative.
        """
        row = self.ns.get(ino)
        conn = self.ns.conn
        unchanged = row["data_gen"] == gen
        with db.transaction(conn):
            if row["parent"] == ORPHAN:  # removed while it was being exported: remove the new object too
                conn.execute(
                    "INSERT OR REPLACE INTO pending_deletes (key, since_ns) VALUES (?, ?)", (key, time.time_ns())
                )
                return
            conn.execute("UPDATE inodes SET exported_key = ? WHERE ino = ?", (key, ino))
            if not no_data:
                limit = size if unchanged else min(size, row["src_limit"])
                conn.execute(
                    "UPDATE inodes SET key = ?, etag = ?, src_limit = ? WHERE ino = ?", (key, etag, limit, ino)
                )
                if self.target.base == "":  # the object at this path is now this export
                    conn.execute("UPDATE inodes SET import_etag = ? WHERE ino = ?", (etag, ino))
            if unchanged:
                conn.execute("UPDATE inodes SET dirty = 0 WHERE ino = ?", (ino,))
            else:
                self.s.due.setdefault(ino, time.monotonic() + (0 if ino not in self.s.writers else math.inf))
        if no_data:
            return
        if unchanged:
            self.cache.adopt(ino, source, ObjectVersion(ino, key, etag, size))
        elif source is not None and source.etag != etag:
            self.cache.drop_version(ino, source.etag)

    async def _delete_pending(self) -> None:
        """Delete the objects of removed entries, unless a live entry has been exported to the same key."""
        if self._delete_backoff and time.monotonic() < self._delete_backoff:
            return
        conn = self.ns.conn
        pending = conn.execute("SELECT key FROM pending_deletes ORDER BY since_ns").fetchall()
        delete = bool(pending) and "DELETED" in self.policy()  # the record is read once, not once per key
        for (key,) in pending:
            live = conn.execute("SELECT 1 FROM inodes WHERE exported_key = ? AND parent != ?", (key, ORPHAN)).fetchone()
            if not live and delete:
                try:
                    await self.repo.delete(key)
                except RepositoryError as exc:
                    self.events.emit("ERROR", "S3ExportDeleteFailed", f"Deleting {key} failed: {exc}", key=key)
                    self._delete_backoff = time.monotonic() + 5.0
                    return
            conn.execute("DELETE FROM pending_deletes WHERE key = ?", (key,))
        self._delete_backoff = 0.0
