"""Data repository tasks, the CLI's side: CreateDataRepositoryTask, DescribeDataRepositoryTasks,
CancelDataRepositoryTask, and ``--wait``.

Tasks work on the data in a daemon's cache, so they need the file system mounted. The CLI validates a
request, then hands the new task to the daemon through the mount's control file (the ``task`` request on the
mount root, its value the task JSON; cancel: ``task_cancel``, see lustrefs.daemon.control_channel). The daemon
(lustrefs.daemon.tasks) runs tasks one at a time in creation order (the others wait as PENDING) and keeps each one
as a record (lustrefs.task_records), which ``describe`` reads without the daemon. A task no daemon runs is
cancelled in its record.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from lustrefs import records
from lustrefs.client import control_client
from lustrefs.errors import FsxError
from lustrefs.s3client import S3Url
from lustrefs.task_records import (
    ACTIVE,
    IMPORT,
    RELEASE,
    TYPES,
    end,
    list_tasks,
    load_task,
    locked,
    public,
    save_task,
    timestamp,
)

CREATE = "CreateDataRepositoryTask"
DESCRIBE = "DescribeDataRepositoryTasks"
CANCEL = "CancelDataRepositoryTask"

REPORT_FORMAT = "REPORT_CSV_20191124"
REPORT_SCOPE = "FAILED_FILES_ONLY"
FILTER_NAMES = ("file-system-id", "task-lifecycle", "data-repository-association-id", "file-cache-id")
MAX_PATHS = 100
MAX_PATH_CHARS = 4096
MAX_TASK_IDS = 50
ERROR_CODES = {
    errno.ENOENT: "DataRepositoryTaskNotFound",
    errno.EALREADY: "DataRepositoryTaskEnded",
}


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
    linked = [a["DataRepositoryPath"] for a in record.get("_Associations") or [] if a.get("Lifecycle") != "DELETING"]
    if repo_conf:
        linked = [repo_conf.get("ExportPath") or repo_conf["ImportPath"]]
    if not linked:
        raise _bad(f"File system {fs_id} is not linked to a data repository.")
    now = timestamp()
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
        "Report": _validate_report(request.get("Report"), linked),
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


def _validate_report(report: Any, export_paths: list[str]) -> dict[str, Any]:
    """The task's report settings; an enabled report goes to the ExportPath (or a data repository association's
    path) or below."""
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
    url = S3Url.parse(report["Path"])
    exports = [e for e in map(S3Url.parse, export_paths) if e is not None]
    if url is None or not any(url.bucket == e.bucket and _within(url.prefix, e.prefix) for e in exports):
        raise _bad(
            f"The report path {report['Path']} must be located within the file system's ExportPath"
            f" (or a data repository association's path): {', '.join(export_paths)}."
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
        with locked(fs_id):
            task = load_task(fs_id, task_id) or task
            if task["Lifecycle"] in ACTIVE:
                end(task, "CANCELED")
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
