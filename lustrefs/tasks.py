"""Data repository tasks: CreateDataRepositoryTask, DescribeDataRepositoryTasks, CancelDataRepositoryTask.

Tasks work on the data in a daemon's cache, so they need the file system mounted. The CLI validates a
request, then hands the new task to the daemon through the mount's control file (the ``task`` request on the
mount root, its value the task JSON; cancel: ``task_cancel``, see lustrefs.control_channel). The daemon runs tasks
one at a time in creation order (the others wait as PENDING) and keeps each one as JSON in
``<fs dir>/tasks/<task-id>.json``, written atomically, which ``describe`` reads without the daemon.

After a restart, a task that was EXECUTING when its daemon stopped is FAILED (files already processed stay
processed; create the task again), a CANCELING one is CANCELED, and PENDING ones run.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import logging
import math
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from . import control_client, hsm, records
from .errors import FsxError
from .hsm import ActionError
from .namespace import ORPHAN, ROOT_INODE, NoEntry
from .repository import RepositoryError
from .s3client import S3Url

if TYPE_CHECKING:
    from .namespace import Namespace
    from .writeback import Writeback

log = logging.getLogger(__name__)

CREATE = "CreateDataRepositoryTask"
DESCRIBE = "DescribeDataRepositoryTasks"
CANCEL = "CancelDataRepositoryTask"

EXPORT = "EXPORT_TO_REPOSITORY"
IMPORT = "IMPORT_METADATA_FROM_REPOSITORY"
RELEASE = "RELEASE_DATA_FROM_FILESYSTEM"
TYPES = (EXPORT, IMPORT, RELEASE)
ACTIVE = ("PENDING", "EXECUTING", "CANCELING")
LIFECYCLES = ("PENDING", "EXECUTING", "FAILED", "SUCCEEDED", "CANCELED", "CANCELING")
REPORT_FORMAT = "REPORT_CSV_20191124"
REPORT_SCOPE = "FAILED_FILES_ONLY"
FILTER_NAMES = ("file-system-id", "task-lifecycle", "data-repository-association-id", "file-cache-id")
TASK_ID = records.TASK_ID
FS_ID = records.FILE_SYSTEM_ID
MAX_PATHS = 100
MAX_PATH_CHARS = 4096
MAX_TASK_IDS = 50

SAVE_INTERVAL = 0.5  # seconds between two writes of a running task's Status
PARALLEL_EXPORTS = 8
NS_PER_DAY = 86_400 * 10**9
UNMOUNTED = "The file system was unmounted while the task was executing; files already processed stay processed."
INTERRUPTED = "The file system daemon stopped while the task was executing; files already processed stay processed."
ERROR_CODES = {
    errno.ENOENT: "DataRepositoryTaskNotFound",
    errno.EALREADY: "DataRepositoryTaskEnded",
}


# ------------------------------------------------------------------------------------------- task records


def tasks_dir(fs_id: str) -> Path:
    """Where the tasks of ``fs_id`` are kept."""
    return records.private_dir(records.fs_dir(fs_id) / "tasks")


def save_task(task: dict[str, Any]) -> None:
    """Write a task record atomically (temporary file, fsync, rename)."""
    folder = tasks_dir(task["FileSystemId"])
    records.check_task_id(task["TaskId"])
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(task, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / f"{task['TaskId']}.json")


def load_task(fs_id: str, task_id: str) -> dict[str, Any] | None:
    """The task ``task_id`` of ``fs_id``, or None; BadRequest if an id is malformed."""
    path = tasks_dir(fs_id) / f"{records.check_task_id(task_id)}.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def list_tasks(fs_id: str) -> list[dict[str, Any]]:
    """The tasks of ``fs_id``, oldest first."""
    tasks = []
    for path in tasks_dir(fs_id).glob("task-*.json"):
        with contextlib.suppress(OSError, ValueError):
            tasks.append(json.loads(path.read_text()))
    return sorted(tasks, key=lambda t: (t.get("CreationTime", 0), t["TaskId"]))


@contextlib.contextmanager
def _locked(fs_id: str) -> Iterator[None]:
    """Serialise read-modify-write of task records between the daemon's start and an offline cancel."""
    with open(tasks_dir(fs_id) / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _now() -> float:
    return round(time.time(), 3)


def _end(task: dict[str, Any], lifecycle: str, failure: str | None = None) -> None:
    task["Lifecycle"] = lifecycle
    task["EndTime"] = task["Status"]["LastUpdatedTime"] = _now()
    if failure:
        task["FailureDetails"] = {"Message": failure[:256]}


def public(task: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in task.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------- control plane (the CLI)


def _bad(message: str, operation: str = CREATE) -> FsxError:
    return FsxError("BadRequest", message, operation)


def create_data_repository_task(request: dict[str, Any]) -> dict[str, Any]:
    """CreateDataRepositoryTask: validate, hand the task to the mounted file system's daemon; the new task."""
    task = new_task(request)
    state = records.mount_state(task["FileSystemId"])
    if state is None:
        raise _bad(
            f"File system {task['FileSystemId']} is not mounted: data repository tasks run in its daemon, which"
            " holds its data. Mount it (lustrefs mount) and create the task again."
        )
    mountpoint = state["mountpoint"]
    if task["Type"] != IMPORT:
        task["Paths"] = [_relative(p, mountpoint) for p in task["Paths"]]
    for other in list_tasks(task["FileSystemId"]):
        if other["Lifecycle"] in ACTIVE and (other["Type"], other["Paths"]) == (task["Type"], task["Paths"]):
            raise FsxError(
                "DataRepositoryTaskExecuting",
                f"An identical data repository task ({other['TaskId']}) is already {other['Lifecycle']} on the file"
                " system. Wait until it has completed, then create the task again.",
                CREATE,
            )
    _send(mountpoint, "task", json.dumps(task), CREATE)
    return {"DataRepositoryTask": public(load_task(task["FileSystemId"], task["TaskId"]) or task)}


def new_task(request: dict[str, Any]) -> dict[str, Any]:
    """A validated PENDING task from a CreateDataRepositoryTask request (FSx's request shape)."""
    kind = request.get("Type")
    if kind == "AUTO_RELEASE_DATA":
        raise _bad("AUTO_RELEASE_DATA tasks are only available on Amazon File Cache.")
    if kind not in TYPES:
        raise _bad(f"Invalid Type {kind!r}; valid values: {', '.join(TYPES)}.")
    fs_id = records.check_file_system_id(request.get("FileSystemId"), CREATE)
    record = records.load_record(fs_id, CREATE)
    repo_conf = record.get("LustreConfiguration", {}).get("DataRepositoryConfiguration")
    if not repo_conf:
        raise _bad(f"File system {fs_id} is not linked to a data repository.")
    now = _now()
    task_id = "task-" + secrets.token_hex(9)[:17]
    task: dict[str, Any] = {
        "TaskId": task_id,
        "Lifecycle": "PENDING",
        "Type": kind,
        "CreationTime": now,
        "ResourceARN": record["ResourceARN"].rsplit(":", 1)[0] + f":task/{task_id}",
        "Tags": list(request.get("Tags") or []),
        "FileSystemId": fs_id,
        "Paths": _validate_paths(kind, request.get("Paths")),
        "Status": {"TotalCount": 0, "SucceededCount": 0, "FailedCount": 0, "LastUpdatedTime": now},
        "Report": _validate_report(request.get("Report"), repo_conf.get("ExportPath") or repo_conf["ImportPath"]),
    }
    if kind == RELEASE:
        task["Status"]["ReleasedCapacity"] = 0
        if request.get("ReleaseConfiguration") is not None:
            task["ReleaseConfiguration"] = _validate_release(request["ReleaseConfiguration"])
    elif request.get("ReleaseConfiguration") is not None:
        raise _bad("ReleaseConfiguration is only valid for RELEASE_DATA_FROM_FILESYSTEM tasks.")
    return task


def _validate_paths(kind: str, paths: Any) -> list[str]:
    if paths is None:
        return []
    if not isinstance(paths, list) or len(paths) > MAX_PATHS or not all(isinstance(p, str) for p in paths):
        raise _bad(f"Paths must be a list of at most {MAX_PATHS} strings.")
    for p in paths:
        if len(p) > MAX_PATH_CHARS:
            raise _bad(f"Each path must be at most {MAX_PATH_CHARS} characters long.")
        is_s3 = p.startswith("s3://")
        if kind == IMPORT and (not is_s3 or S3Url.parse(p) is None):
            raise _bad(f"Import task paths are S3 URIs (s3://bucket/prefix); {p!r} is not one.")
        if kind != IMPORT and is_s3:
            raise _bad(f"{kind} paths are file system paths relative to the mount point; {p!r} is an S3 URI.")
    return list(paths)


def _validate_report(report: Any, export_path: str) -> dict[str, Any]:
    if not isinstance(report, dict) or not isinstance(report.get("Enabled"), bool):
        raise _bad("Report is required, with Enabled=true or Enabled=false.")
    if not report["Enabled"]:
        return {"Enabled": False}
    for member in ("Path", "Format", "Scope"):
        if not isinstance(report.get(member), str):
            raise _bad(f"Report.{member} is required when the report is enabled.")
    if report["Format"] != REPORT_FORMAT:
        raise _bad(f"Invalid Report.Format {report['Format']!r}; the only format is {REPORT_FORMAT}.")
    if report["Scope"] != REPORT_SCOPE:
        raise _bad(f"Invalid Report.Scope {report['Scope']!r}; the only scope is {REPORT_SCOPE}.")
    url, export = S3Url.parse(report["Path"]), S3Url.parse(export_path)
    if url is None or export is None or url.bucket != export.bucket or not _within(url.prefix, export.prefix):
        raise _bad(
            f"The report path {report['Path']} must be located within the file system's ExportPath {export_path}."
        )
    return {k: report[k] for k in ("Enabled", "Path", "Format", "Scope")}


def _within(prefix: str, base: str) -> bool:
    prefix, base = prefix.strip("/"), base.strip("/")
    return base == "" or prefix == base or prefix.startswith(base + "/")


def _validate_release(conf: Any) -> dict[str, Any]:
    duration = conf.get("DurationSinceLastAccess") if isinstance(conf, dict) else None
    if not isinstance(duration, dict) or duration.get("Unit", "DAYS") != "DAYS":
        raise _bad("ReleaseConfiguration.DurationSinceLastAccess must be {Unit: DAYS, Value: n}.")
    value = duration.get("Value", 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad("DurationSinceLastAccess.Value must be a whole number of days (0 or more).")
    return {"DurationSinceLastAccess": {"Unit": "DAYS", "Value": value}}


def _relative(path: str, mountpoint: str) -> str:
    """A file system path as FSx wants it: relative to the mount point (``/mnt/fsx/a`` → ``a``)."""
    if os.path.isabs(path):
        real = os.path.realpath(path)
        if real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/"):
            return os.path.relpath(real, mountpoint).removeprefix(".")
    return path


def _send(mountpoint: str, op: str, value: str, operation: str) -> None:
    """Send a request about the mount root to its daemon; the daemon's refusal becomes an FsxError."""
    try:
        control_client.request(mountpoint, op, value)
    except control_client.ControlError as exc:
        if exc.code and re.fullmatch(r"[A-Za-z]+", exc.code):
            raise FsxError(exc.code, exc.message, operation) from None
        code = ERROR_CODES.get(exc.errno or 0, "BadRequest")
        raise FsxError(code, f"The file system daemon refused: {exc.strerror}", operation) from None
    except OSError:
        raise _bad(
            f"{mountpoint} does not answer as a lustrefs mount; is the file system mounted?", operation
        ) from None


def describe_data_repository_tasks(
    task_ids: list[str] | None = None, filters: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """DescribeDataRepositoryTasks: ``{"DataRepositoryTasks": [...]}``, oldest first."""
    wanted = _parse_filters(filters or [])
    for fs_id in sorted(wanted.get("file-system-id", set())):
        records.check_file_system_id(fs_id, DESCRIBE)
    for task_id in task_ids or []:
        records.check_task_id(task_id, DESCRIBE)
    known = [r["FileSystemId"] for r in records.list_records()]
    for fs_id in sorted(wanted.get("file-system-id", set()) - set(known)):
        raise FsxError("FileSystemNotFound", f"File system '{fs_id}' does not exist.", DESCRIBE)
    selected = [t for fs_id in known if fs_id in wanted.get("file-system-id", {fs_id}) for t in list_tasks(fs_id)]
    if "task-lifecycle" in wanted:
        selected = [t for t in selected if t["Lifecycle"] in wanted["task-lifecycle"]]
    if "data-repository-association-id" in wanted or "file-cache-id" in wanted:
        selected = []  # no association or cache runs tasks here
    if task_ids:
        if len(task_ids) > MAX_TASK_IDS:
            raise _bad(f"At most {MAX_TASK_IDS} TaskIds can be given.", DESCRIBE)
        by_id = {t["TaskId"]: t for t in selected}
        missing = [i for i in task_ids if i not in by_id]
        if missing:
            raise FsxError("DataRepositoryTaskNotFound", f"Data repository task {missing[0]} was not found.", DESCRIBE)
        selected = [by_id[i] for i in dict.fromkeys(task_ids)]
    return {"DataRepositoryTasks": [public(t) for t in sorted(selected, key=lambda t: t["CreationTime"])]}


def _parse_filters(filters: list[dict[str, Any]]) -> dict[str, set[str]]:
    if len(filters) > 3:
        raise _bad("At most 3 filters can be given.", DESCRIBE)
    out: dict[str, set[str]] = {}
    for f in filters:
        name, values = f.get("Name"), f.get("Values")
        if isinstance(values, str):
            values = [v for v in values.split(",") if v]
        if name not in FILTER_NAMES:
            raise _bad(f"Invalid filter name {name!r}; valid names: {', '.join(FILTER_NAMES)}.", DESCRIBE)
        if not isinstance(values, list) or not 1 <= len(values) <= 20:
            raise _bad(f"Filter {name} needs 1 to 20 Values.", DESCRIBE)
        out.setdefault(name, set()).update(values)
    return out


def find_task(task_id: str, operation: str) -> dict[str, Any]:
    """The task ``task_id`` of any file system; BadRequest if the id is malformed, DataRepositoryTaskNotFound if
    there is no such task."""
    records.check_task_id(task_id, operation)
    for rec in records.list_records():
        task = load_task(rec["FileSystemId"], task_id)
        if task is not None:
            return task
    raise FsxError("DataRepositoryTaskNotFound", f"Data repository task {task_id} was not found.", operation)


def cancel_data_repository_task(task_id: str) -> dict[str, Any]:
    """CancelDataRepositoryTask: ``{"Lifecycle", "TaskId"}`` (CANCELING while in-flight files finish)."""
    task = find_task(task_id, CANCEL)
    fs_id = task["FileSystemId"]
    if task["Lifecycle"] not in ACTIVE:
        raise FsxError("DataRepositoryTaskEnded", f"Data repository task {task_id} has already ended.", CANCEL)
    state = records.mount_state(fs_id)
    if state is not None:
        _send(state["mountpoint"], "task_cancel", task_id, CANCEL)
    else:  # no daemon: nothing runs it, cancel the record itself
        with _locked(fs_id):
            task = load_task(fs_id, task_id) or task
            if task["Lifecycle"] in ACTIVE:
                _end(task, "CANCELED")
                save_task(task)
    task = load_task(fs_id, task_id) or task
    return {"Lifecycle": task["Lifecycle"], "TaskId": task_id}


def wait_for_task(fs_id: str, task_id: str, on_progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Poll the task's record until it has ended; ``on_progress`` sees each version. Returns the last."""
    while True:
        task = load_task(fs_id, task_id)
        if task is None:
            raise FsxError("DataRepositoryTaskNotFound", f"Data repository task {task_id} was not found.", DESCRIBE)
        on_progress(task)
        if task["Lifecycle"] not in ACTIVE:
            return task
        if records.mount_state(fs_id) is None and task["Lifecycle"] != "PENDING":
            raise _bad(f"File system {fs_id} was unmounted while task {task_id} was {task['Lifecycle']}.", DESCRIBE)
        time.sleep(0.2)


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
                    ino = (await self.ns.lookup(ino, name))["ino"]
            except (NoEntry, NotADirectoryError):
                raise TaskFailed(f"The path {path} does not exist in the file system.") from None
            except RepositoryError as exc:
                raise TaskFailed(f"The path {path} cannot be resolved: {exc}") from None
            out.add(ino)
        return out

    def _under(self, roots: set[int]) -> Callable[[int], bool]:
        """A test: is an inode at or below one of ``roots``? (Memoised walk up the parents.)"""
        memo = {ORPHAN: False, ROOT_INODE: ROOT_INODE in roots}
        conn = self.ns.conn

        def test(ino: int) -> bool:
            chain = []
            while ino not in memo:
                if ino in roots:
                    memo[ino] = True
                    break
                chain.append(ino)
                row = conn.execute("SELECT parent FROM inodes WHERE ino = ?", (ino,)).fetchone()
                ino = row[0] if row else ORPHAN
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
        rows = self.ns.conn.execute(
            "SELECT ino FROM inodes WHERE dirty != 0 AND parent != ? AND ino != ? ORDER BY ino", (ORPHAN, ROOT_INODE)
        ).fetchall()
        todo = [ino for (ino,) in rows if under(ino)]
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
        for (ino,) in self.ns.conn.execute("SELECT DISTINCT ino FROM cache_parts WHERE etag != ''").fetchall():
            row = self.ns.conn.execute("SELECT * FROM inodes WHERE ino = ?", (ino,)).fetchone()
            if row is None or row["dirty"] or row["etag"] is None or not stat.S_ISREG(row["mode"]):
                continue  # gone, or not exported yet: not eligible
            if max(row["atime_ns"], row["mtime_ns"], row["ctime_ns"]) <= cutoff and under(ino):
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
        result = await self.importer.poll(dirs, policy="NEW_CHANGED")
        if getattr(self.importer, "lifecycle", "AVAILABLE") != "AVAILABLE":
            raise TaskFailed(getattr(self.importer, "failure", None) or "The data repository cannot be listed.")
        done = result.new + result.changed + result.deleted
        progress.status.update(TotalCount=done, SucceededCount=done)

    def _import_dir(self, uri: str) -> int:
        """The deepest loaded directory holding the keys of ``s3://bucket/prefix``."""
        url = S3Url.parse(uri)
        if url is None or url.bucket != self.ns.repo.bucket:
            raise TaskFailed(f"The path {uri} is not in the linked bucket {self.ns.repo.bucket}.")
        imported = self.ns.import_prefix
        if not (url.prefix.startswith(imported) or imported.startswith(url.prefix)):
            raise TaskFailed(f"The path {uri} is outside the file system's ImportPath.")
        ino = ROOT_INODE
        for name in [n for n in url.prefix.split("/") if n]:
            row = self.ns.conn.execute(
                "SELECT ino, mode FROM inodes WHERE parent = ? AND name = ? AND ino != ?", (ino, name, ROOT_INODE)
            ).fetchone()
            if row is None or not stat.S_ISDIR(row["mode"]):
                break
            ino = row["ino"]
        return ino
