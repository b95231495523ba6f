"""Durable file system records and per-file-system local directories under ``$LUSTREFS_HOME``.

Layout::

    $LUSTREFS_HOME/
      filesystems/<fs-id>.json   the FSx description of the file system plus private "_"-prefixed fields
      <fs-id>/state.db           the mount's SQLite state (namespace, cache index)
      <fs-id>/events.jsonl       the JSON-lines event log
      <fs-id>/cache/             the default cache target
      <fs-id>/mount.json         present while a daemon serves the file system: {"pid", "mountpoint"}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import FsxError


def home_dir() -> Path:
    """The state directory: ``$LUSTREFS_HOME``, else /var/lib/lustrefs for root, else the XDG state dir."""
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
    """Create ``path`` (and parents) if needed and make it 0700; returns it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def fs_dir(fs_id: str) -> Path:
    """The local directory of one file system (state database, event log, default cache)."""
    return private_dir(home_dir() / fs_id)


def _record_path(fs_id: str) -> Path:
    return private_dir(home_dir() / "filesystems") / f"{fs_id}.json"


def save_record(record: dict[str, Any]) -> None:
    """Write a record atomically (temporary file, fsync, rename)."""
    path = _record_path(record["FileSystemId"])
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_record(fs_id: str, operation: str = "DescribeFileSystems") -> dict[str, Any]:
    """The stored record of ``fs_id``; raises FileSystemNotFound if there is none."""
    try:
        with open(_record_path(fs_id)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        raise FsxError("FileSystemNotFound", f"File system '{fs_id}' does not exist.", operation) from None


def list_records() -> list[dict[str, Any]]:
    """All stored records, oldest first."""
    records = []
    for p in (home_dir() / "filesystems").glob("fs-*.json"):
        try:
            records.append(json.loads(p.read_text()))
        except ValueError:
            continue
    return sorted(records, key=lambda r: (r.get("CreationTime", 0), r["FileSystemId"]))


def delete_record(fs_id: str) -> None:
    _record_path(fs_id).unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (an exited, unreaped one does not count)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"


def mount_state(fs_id: str) -> dict[str, Any] | None:
    """``{"pid", "mountpoint"}`` of the live daemon serving ``fs_id``, or None (stale files are ignored)."""
    path = home_dir() / fs_id / "mount.json"
    try:
        state = json.loads(path.read_text())
        pid = int(state["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError):
        return None
    if not process_alive(pid) or fs_id.encode() not in cmdline:  # exited (unreaped), or the PID was reused
        return None
    return state
