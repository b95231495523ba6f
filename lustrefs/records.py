"""Durable file system records and per-file-system local directories under ``$LUSTREFS_HOME``.

Layout::

    $LUSTREFS_HOME/
      filesystems/<fs-id>.json   the FSx description of the file system plus private "_"-prefixed fields
      <fs-id>/state.db           the mount's SQLite state (namespace, cache index)
      <fs-id>/events.jsonl       the JSON-lines event log
      <fs-id>/cache/             the default cache target
      <fs-id>/mount.json         present while a daemon serves the file system: {"pid", "mountpoint"}

A host configured for the cluster engine (``lustrefs.engine``: PostgreSQL) keeps the records in the database
instead (``lustrefs.store.pgrecords``), shared by every host; the per-file-system directories stay local. The
record functions behave the same on both engines. psycopg is imported only when the cluster engine is used.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from lustrefs import engine
from lustrefs.errors import FsxError

# The ids that name files and directories (anchored at the end: ``match`` works as ``fullmatch``).
FILE_SYSTEM_ID = re.compile(r"fs-(?:[0-9a-f]{8}|[0-9a-f]{17})\Z")  # FSx's ids; new ones have 17 digits
TASK_ID = re.compile(r"task-[0-9a-f]{17}\Z")


def _checked(value: object, pattern: re.Pattern[str], name: str, shape: str, operation: str) -> str:
    """``value`` if it matches ``pattern``; else BadRequest (so an id can never name another path)."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise FsxError("BadRequest", f"Invalid {name} {value!r}: {shape}.", operation)
    return value


def check_file_system_id(fs_id: object, operation: str = "DescribeFileSystems") -> str:
    """``fs_id`` if it is a well-formed file system id; else BadRequest."""
    shape = "a file system id is fs- followed by 8 or 17 lowercase hex digits"
    return _checked(fs_id, FILE_SYSTEM_ID, "FileSystemId", shape, operation)


def check_task_id(task_id: object, operation: str = "DescribeDataRepositoryTasks") -> str:
    """``task_id`` if it is a well-formed data repository task id; else BadRequest."""
    return _checked(task_id, TASK_ID, "TaskId", "a task id is task- followed by 17 lowercase hex digits", operation)


def home_dir() -> Path:
    """The state directory: ``$LUSTREFS_HOME``, else /var/lib/lustrefs for root, else the XDG state dir.

    It is created (mode 0700) if it does not exist; an existing directory is used as it is (it may be shared,
    such as /tmp): what lustrefs keeps in it is in private subdirectories.
    """
    env = os.environ.get("LUSTREFS_HOME")
    if env:
        path = Path(env)
    elif os.geteuid() == 0:
        path = Path("/var/lib/lustrefs")
    else:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        path = Path(base) / "lustrefs"
    return private_dir(path)


def private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 if it does not exist (parents as ``mkdir -p`` would); returns it.

    A directory that exists already is left as it is: lustrefs never changes the mode of a directory it did
    not create.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return path
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return private_dir(path)
    if stat.S_IMODE(os.lstat(path).st_mode) != 0o700:  # the umask took some of the owner's bits
        os.chmod(path, 0o700)
    return path


def fs_path(fs_id: str, operation: str = "DescribeFileSystems") -> Path:
    """The local directory of one file system, not created (the id is checked: BadRequest)."""
    return home_dir() / check_file_system_id(fs_id, operation)


def fs_dir(fs_id: str) -> Path:
    """The local directory of one file system (state database, event log, default cache), created if needed."""
    return private_dir(fs_path(fs_id))


def _record_path(fs_id: str, operation: str = "DescribeFileSystems") -> Path:
    check_file_system_id(fs_id, operation)
    return private_dir(home_dir() / "filesystems") / f"{fs_id}.json"


def metadata_engine(operation: str) -> engine.Engine:
    """This host's metadata engine (``lustrefs.engine``); a malformed setting is an InternalServerError."""
    try:
        return engine.configured(home_dir())
    except engine.EngineConfigError as exc:
        raise FsxError("InternalServerError", f"The metadata engine setting is invalid: {exc}", operation) from None


def cluster_conninfo(operation: str) -> str | None:
    """The connection string of the cluster's database if this host uses the cluster engine, else None."""
    setting = metadata_engine(operation)
    return setting.conninfo if setting.shared else None


def _is_record(fs_id: str, record: object) -> bool:
    return isinstance(record, dict) and record.get("FileSystemId") == fs_id


def save_record(record: dict[str, Any], operation: str = "UpdateFileSystem") -> None:
    """Write a record atomically (a file: temporary file, fsync, rename; the cluster engine: one row)."""
    conninfo = cluster_conninfo(operation)
    if conninfo is not None:
        from lustrefs.store import pgrecords

        fs_id = check_file_system_id(record["FileSystemId"], operation)
        pgrecords.save(conninfo, fs_id, json.dumps(record, sort_keys=True), operation)
        return
    path = _record_path(record["FileSystemId"])
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_record(fs_id: str, operation: str = "DescribeFileSystems") -> dict[str, Any]:
    """The stored record of ``fs_id``; BadRequest if the id is malformed, FileSystemNotFound if there is none."""
    conninfo = cluster_conninfo(operation)
    if conninfo is not None:
        from lustrefs.store import pgrecords

        text = pgrecords.load(conninfo, check_file_system_id(fs_id, operation), operation)
        try:
            record = None if text is None else json.loads(text)
        except ValueError:
            record = None
    else:
        path = _record_path(fs_id, operation)
        try:
            with open(path) as f:
                record = json.load(f)
        except (FileNotFoundError, ValueError):
            record = None
    if not _is_record(fs_id, record):
        raise FsxError("FileSystemNotFound", f"File system '{fs_id}' does not exist.", operation)
    return record


def list_records(operation: str = "DescribeFileSystems") -> list[dict[str, Any]]:
    """All stored records, oldest first (one that is not the record its name or id says is skipped)."""
    stored: list[tuple[str, str]] = []  # (id, JSON text)
    conninfo = cluster_conninfo(operation)
    if conninfo is not None:
        from lustrefs.store import pgrecords

        stored = pgrecords.load_all(conninfo, operation)
    else:
        for p in (home_dir() / "filesystems").glob("fs-*.json"):
            try:
                stored.append((p.stem, p.read_text()))
            except OSError:
                continue
    records = []
    for fs_id, text in stored:
        try:
            record = json.loads(text)
        except ValueError:
            continue
        if FILE_SYSTEM_ID.fullmatch(fs_id) and _is_record(fs_id, record):
            records.append(record)
    return sorted(records, key=lambda r: (r.get("CreationTime", 0), r["FileSystemId"]))


def delete_record(fs_id: str) -> None:
    conninfo = cluster_conninfo("DeleteFileSystem")
    if conninfo is not None:
        from lustrefs.store import pgrecords

        pgrecords.delete(conninfo, check_file_system_id(fs_id, "DeleteFileSystem"), "DeleteFileSystem")
        return
    _record_path(fs_id, "DeleteFileSystem").unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (an exited, unreaped one does not count)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"


def mount_state(fs_id: str) -> dict[str, Any] | None:
    """``{"pid", "mountpoint"}`` of the live daemon serving ``fs_id``, or None (stale files are ignored)."""
    path = fs_path(fs_id) / "mount.json"
    try:
        state = json.loads(path.read_text())
        pid = int(state["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError):
        return None
    if not process_alive(pid) or fs_id.encode() not in cmdline:  # exited (unreaped), or the PID was reused
        return None
    return state
