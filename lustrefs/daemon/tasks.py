"""Data repository tasks, the daemon's side: ``TaskRunner`` runs the tasks that the CLI (lustrefs.client.tasks)
validated and handed over through the mount's control file (the ``task`` request on the mount root, its value
the task JSON; cancel: ``task_cancel``, see lustrefs.daemon.control_channel). Tasks run one at a time in creation order
(the others wait as PENDING); each one is kept as a record (lustrefs.task_records), which the CLI reads.

After a restart, a task that was EXECUTING when its daemon stopped is FAILED (files already processed stay
processed; create the task again), a CANCELING one is CANCELED, and PENDING ones run.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import math
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from lustrefs.constants import ROOT_INODE
from lustrefs.daemon import hsm
from lustrefs.daemon.hsm import ActionError
from lustrefs.errors import NoEntry
from lustrefs.s3.repository import RepositoryError
from lustrefs.s3.routing import RoutedStore
from lustrefs.s3client import S3Url
from lustrefs.store.inodes import ORPHAN
from lustrefs.task_records import EXPORT, IMPORT, RELEASE, TASK_ID, TYPES, list_tasks, load_task, save_task
from lustrefs.task_records import end as _end
from lustrefs.task_records import locked as _locked
from lustrefs.task_records import timestamp as _now

if TYPE_CHECKING:
    from lustrefs.sync.exporter import Writeback
    from lustrefs.tree.namespace import Namespace

log = logging.getLogger(__name__)

SAVE_INTERVAL = 0.5  # seconds between two writes of a running task's Status
PARALLEL_EXPORTS = 8
NS_PER_DAY = 86_400 * 10**9
UNMOUNTED = "The file system was unmounted while the task was executing; files already processed stay processed."
INTERRUPTED = "The file system daemon stopped while the task was executing; files already processed stay processed."


def report_csv(failures: list[tuple[str, str]]) -> bytes:
    """A completion report as FSx writes it: ``FilePath,FileStatus,ErrorCode`` rows, no header, RFC 4180."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for path, code in failures:
        writer.writerow([f'"{path}"' if path[:1] in ("@", "+", "-", "=") else path, "failed", code])
    return out.getvalue().encode()


# ------------------------------------------------------------------------------------------ the daemon side


class TaskFailed(Exception):
    """The task as a whole failed (an invalid path, an unreachable repository); the message says why."""


class _Progress:
    """The counters of a running task and the failures for its report."""

    def __init__(self, task: dict[str, Any], save: Callable[[dict[str, Any], bool], None]) -> None:
        self.task = task
        self.status = task["Status"]
        self.failures: list[tuple[str, str]] = []
        self._save = save

    def total(self, n: int) -> None:
        self.status["TotalCount"] = n
        self._save(self.task, True)

    def succeeded(self, released: int = 0) -> None:
        self.status["SucceededCount"] += 1
        if released:
            self.status["ReleasedCapacity"] = self.status.get("ReleasedCapacity", 0) + released
        self._save(self.task, False)

    def failed(self, path: str, code: str) -> None:
        self.status["FailedCount"] += 1
        self.failures.append((path, code))
        self._save(self.task, False)


class TaskRunner:
    """Runs the file system's data repository tasks one at a time (a trio task of the daemon)."""

    def __init__(self, ns: Namespace, writeback: Writeback, hsm_: hsm.Hsm, importer: Any = None) -> None:
        self.ns = ns
        self.writeback = writeback
        self.hsm = hsm_
        self.importer = importer
        self.fs_id = ns.events.file_system_id
        self.queue: list[str] = []
        self.current: dict[str, Any] | None = None
        self.cancel_requested = False
        self._wake = trio.Event()
        self._saved_at = 0.0

    # ----------------------------------------------------------------------------------------- requests

    def recover(self) -> None:
        """At start: finish what a previous daemon left EXECUTING or CANCELING; queue what is PENDING."""
        with _locked(self.fs_id):
            for task in list_tasks(self.fs_id):
                if task["Lifecycle"] == "EXECUTING":
                    _end(task, "FAILED", INTERRUPTED)
                    save_task(task)
                elif task["Lifecycle"] == "CANCELING":
                    _end(task, "CANCELED")
                    save_task(task)
                elif task["Lifecycle"] == "PENDING":
                    self.queue.append(task["TaskId"])

    def submit(self, value: str) -> None:
        """Accept a new task (the JSON the CLI built and validated). Raises ActionError."""
        try:
            task = json.loads(value)
        except ValueError:
            raise ActionError(errno.EINVAL, "BadRequest", "the task is not valid JSON") from None
        if (
            not isinstance(task, dict)
            or not TASK_ID.match(str(task.get("TaskId")))
            or task.get("Type") not in TYPES
            or task.get("Lifecycle") != "PENDING"
            or not isinstance(task.get("Paths"), list)
            or not isinstance(task.get("Status"), dict)
        ):
            raise ActionError(errno.EINVAL, "BadRequest", "not a data repository task")
        if task.get("FileSystemId") != self.fs_id:
            raise ActionError(errno.EINVAL, "BadRequest", f"this mount serves {self.fs_id}")
        if load_task(self.fs_id, task["TaskId"]) is not None:
            raise ActionError(errno.EEXIST, "BadRequest", f"task {task['TaskId']} exists already")
        if task["Type"] == IMPORT and self.importer is None:
            raise ActionError(errno.ENOTSUP, "BadRequest", "this daemon cannot import (no importer)")
        save_task(task)
        self.queue.append(task["TaskId"])
        self._wake.set()

    def cancel(self, value: str) -> None:
        """Cancel a task: a PENDING one at once, an EXECUTING one once its in-flight files finish."""
        task_id = value.strip()
        task = load_task(self.fs_id, task_id) if TASK_ID.match(task_id) else None
        if task is None:
            raise ActionError(errno.ENOENT, "DataRepositoryTaskNotFound", f"Data repository task {task_id} not found.")
        if task_id in self.queue:
            self.queue.remove(task_id)
            _end(task, "CANCELED")
            save_task(task)
        elif self.current is not None and self.current["TaskId"] == task_id:
            if not self.cancel_requested:
                self.cancel_requested = True
                self.current["Lifecycle"] = "CANCELING"
                self._save(self.current, True)
        else:
            raise ActionError(errno.EALREADY, "DataRepositoryTaskEnded", f"Data repository task {task_id} has ended.")

    def status(self) -> dict[str, Any]:
        return {"executing": self.current["TaskId"] if self.current else None, "pending": len(self.queue)}

    # ----------------------------------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run queued tasks, oldest first, until cancelled."""
        try:
            self.recover()
        except OSError as exc:
            log.error("cannot read the data repository tasks of %s: %s", self.fs_id, exc)
        task_status.started()
        while True:
            while not self.queue:
                self._wake = trio.Event()
                await self._wake.wait()
            task = load_task(self.fs_id, self.queue.pop(0))
            if task is None or task["Lifecycle"] != "PENDING":
                continue
            try:
                await self._execute(task)
            except Exception:  # e.g. its record cannot be written: the mount must go on serving
                log.exception("data repository task %s could not be run", task["TaskId"])
                self.current = None

    def _save(self, task: dict[str, Any], force: bool) -> None:
        task["Status"]["LastUpdatedTime"] = _now()
        if force or time.monotonic() - self._saved_at >= SAVE_INTERVAL:
            save_task(task)
            self._saved_at = time.monotonic()

    async def _execute(self, task: dict[str, Any]) -> None:
        self.current, self.cancel_requested = task, False
        task["Lifecycle"], task["StartTime"] = "EXECUTING", _now()
        self._save(task, True)
        progress = _Progress(task, self._save)
        run = {EXPORT: self._export, RELEASE: self._release, IMPORT: self._import}[task["Type"]]
        finished = False
        try:
            try:
                await run(task, progress)
            except TaskFailed as exc:
                _end(task, "FAILED", str(exc))
            except Exception as exc:
                log.exception("data repository task %s failed", task["TaskId"])
                _end(task, "FAILED", f"InternalError: {exc}")
            else:
                failed = task["Status"]["FailedCount"]
                _end(task, "CANCELED" if self.cancel_requested else "FAILED" if failed else "SUCCEEDED")
            finished = True
        finally:
            if not finished:  # cancelled: the daemon is stopping
                _end(task, "FAILED", UNMOUNTED)
                save_task(task)
                self.current = None
        await self._write_report(task, progress.failures)
        save_task(task)
        self.current = None
        log.info("data repository task %s %s: %s", task["TaskId"], task["Lifecycle"], task["Status"])

    async def _write_report(self, task: dict[str, Any], failures: list[tuple[str, str]]) -> None:
        """Upload the completion report to ``<Report.Path>/<task id>/failures.csv``."""
        report = task.get("Report") or {}
        url = S3Url.parse(report.get("Path", "")) if report.get("Enabled") else None
        if url is None:
            return
        key = "/".join(p for p in (url.prefix.strip("/"), task["TaskId"], "failures.csv") if p)
        if url.bucket != self.ns.repo.bucket:
            message = f"The report bucket {url.bucket} is not the linked bucket {self.ns.repo.bucket}."
            self.ns.events.emit("ERROR", "S3CompletionReportValidateFailure", message, key=key)
            return
        try:
            await self.ns.repo.put(key, report_csv(failures), {})
        except RepositoryError as exc:
            message = f"Uploading the completion report of {task['TaskId']} to {key} failed: {exc}"
            self.ns.events.emit("ERROR", "S3CompletionReportUploadFailure", message, key=key)

    # ----------------------------------------------------------------------------------------- task types

    async def _resolve(self, paths: list[str]) -> set[int]:
        """The inodes of file system paths (relative to the root); TaskFailed if one does not exist."""
        if not paths:
            return {ROOT_INODE}
        out = set()
        for path in paths:
            ino = ROOT_INODE
            try:
                for name in (n for n in path.split("/") if n not in ("", ".")):
                    ino = (await self.ns.lookup(ino, name)).ino
            except (NoEntry, NotADirectoryError):
                raise TaskFailed(f"The path {path} does not exist in the file system.") from None
            except RepositoryError as exc:
                raise TaskFailed(f"The path {path} cannot be resolved: {exc}") from None
            out.add(ino)
        return out

    def _under(self, roots: set[int]) -> Callable[[int], bool]:
        """A test: is an inode at or below one of ``roots``? (Memoised walk up the parents.)"""
        memo = {ORPHAN: False, ROOT_INODE: ROOT_INODE in roots}

        def test(ino: int) -> bool:
            chain = []
            while ino not in memo:
                if ino in roots:
                    memo[ino] = True
                    break
                chain.append(ino)
                row = self.ns.find(ino)
                ino = row.parent if row else ORPHAN
            for seen in chain:
                memo[seen] = memo[ino]
            return memo[ino]

        return test

    def _path(self, ino: int) -> str:
        try:
            return self.ns.path_key(ino)
        except NoEntry:
            return f"(inode {ino})"

    async def _export(self, task: dict[str, Any], progress: _Progress) -> None:
        """Export every new or changed entry under the paths (files, directories, symlinks)."""
        under = self._under(await self._resolve(task["Paths"]))
        todo = sorted(ino for ino, _ in self.ns.exports.dirty_inodes() if ino != ROOT_INODE and under(ino))
        progress.total(len(todo))
        slots = trio.Semaphore(PARALLEL_EXPORTS)

        async def export(ino: int) -> None:
            try:
                path = self._path(ino)
                failure = await self.writeback.export_now(ino)
                if failure is None:
                    progress.succeeded()
                else:
                    progress.failed(path, failure.code)
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            for ino in todo:
                await slots.acquire()
                if self.cancel_requested:  # queued files are skipped, those in flight finish
                    slots.release()
                    break
                nursery.start_soon(export, ino)

    async def _release(self, task: dict[str, Any], progress: _Progress) -> None:
        """Drop the cached data of exported, unchanged files under the paths (not accessed for N days)."""
        under = self._under(await self._resolve(task["Paths"]))
        days = task.get("ReleaseConfiguration", {}).get("DurationSinceLastAccess", {}).get("Value", 0)
        cutoff = math.floor(task["CreationTime"] * 1e9) - days * NS_PER_DAY
        candidates = []
        for ino in self.hsm.cached_inodes():
            row = self.ns.find(ino)
            if row is None or row.dirty or row.etag is None or not stat.S_ISREG(row.mode):
                continue  # gone, or not exported yet: not eligible
            if max(row.atime_ns, row.mtime_ns, row.ctime_ns) <= cutoff and under(ino):
                candidates.append(ino)
        progress.total(len(candidates))
        for ino in candidates:
            if self.cancel_requested:
                break
            try:
                progress.succeeded(released=self.hsm.release(ino))
            except ActionError as exc:
                progress.failed(self._path(ino), exc.code)
            except NoEntry:
                progress.succeeded()
            await trio.lowlevel.checkpoint()

    async def _import(self, task: dict[str, Any], progress: _Progress) -> None:
        """Re-list the loaded directories under the S3 paths and apply new, changed and deleted objects."""
        dirs = [self._import_dir(p) for p in task["Paths"]] or None
        result = await self.importer.poll(dirs, events=frozenset({"NEW", "CHANGED"}))
        if getattr(self.importer, "lifecycle", "AVAILABLE") != "AVAILABLE":
            raise TaskFailed(getattr(self.importer, "failure", None) or "The data repository cannot be listed.")
        done = result.new + result.changed + result.deleted
        progress.status.update(TotalCount=done, SucceededCount=done)

    def _import_dir(self, uri: str) -> int:
        """The deepest loaded directory holding the keys of ``s3://bucket/prefix``."""
        url = S3Url.parse(uri)
        if url is not None and isinstance(self.ns.repo, RoutedStore):  # associations: re-rooted
            key = self.ns.repo.map.virtual(url.bucket, url.prefix.rstrip("/") + "/" if url.prefix else "")
            if key is None:
                raise TaskFailed(f"The path {uri} is in no data repository association of the file system.")
        elif url is None or url.bucket != self.ns.repo.bucket:
            raise TaskFailed(f"The path {uri} is not in the linked bucket {self.ns.repo.bucket}.")
        else:
            key = url.prefix
            imported = self.ns.import_prefix
            if not (key.startswith(imported) or imported.startswith(key)):
                raise TaskFailed(f"The path {uri} is outside the file system's ImportPath.")
        ino = ROOT_INODE
        for name in [n for n in key.split("/") if n]:
            row = self.ns.inodes.child(ino, name)
            if row is None or not stat.S_ISDIR(row.mode):
                break
            ino = row.ino
        return ino
