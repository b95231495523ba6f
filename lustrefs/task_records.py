"""Data repository task records, read and written by both sides (standard library only, no trio).

Each task is kept as JSON in ``<fs dir>/tasks/<task-id>.json``, written atomically. The daemon
(lustrefs.daemon.tasks.TaskRunner) writes them as it runs tasks; the CLI (lustrefs.client.tasks) reads them for
DescribeDataRepositoryTasks and ``--wait``, and writes them when it cancels a task that no daemon runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lustrefs import records

EXPORT = "EXPORT_TO_REPOSITORY"
IMPORT = "IMPORT_METADATA_FROM_REPOSITORY"
RELEASE = "RELEASE_DATA_FROM_FILESYSTEM"
TYPES = (EXPORT, IMPORT, RELEASE)
ACTIVE = ("PENDING", "EXECUTING", "CANCELING")
LIFECYCLES = ("PENDING", "EXECUTING", "FAILED", "SUCCEEDED", "CANCELED", "CANCELING")
TASK_ID = records.TASK_ID


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
def locked(fs_id: str) -> Iterator[None]:
    """Serialise read-modify-write of task records between the daemon's start and an offline cancel."""
    with open(tasks_dir(fs_id) / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def timestamp() -> float:
    """A task timestamp: seconds since the epoch, to the millisecond."""
    return round(time.time(), 3)


def end(task: dict[str, Any], lifecycle: str, failure: str | None = None) -> None:
    """Mark ``task`` ended with ``lifecycle`` (and a failure message) now; the caller saves it."""
    task["Lifecycle"] = lifecycle
    task["EndTime"] = task["Status"]["LastUpdatedTime"] = timestamp()
    if failure:
        task["FailureDetails"] = {"Message": failure[:256]}


def public(task: dict[str, Any]) -> dict[str, Any]:
    """The FSx description of a task: private (``_``-prefixed) fields removed."""
    return {k: v for k, v in task.items() if not k.startswith("_")}
