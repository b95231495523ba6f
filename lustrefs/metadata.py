"""POSIX attributes carried by S3 objects in FSx's ``x-amz-meta-file-*`` user metadata."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

_NS = re.compile(r"^(\d{1,20})ns$")
_MS = re.compile(r"^(\d{1,17})$")


@dataclass(frozen=True)
class PosixMeta:
    """Attributes read from an object's metadata; ``None`` where the object carries no (valid) value."""

    mode: int | None = None  # type and permission bits as stored (setuid already dropped)
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    atime_ns: int | None = None
    rdev: int | None = None  # a device's number (``x-amz-meta-file-rdev``, ``major,minor``)


def parse_mode(value: str | None) -> int | None:
    """``x-amz-meta-file-permissions``: an octal st_mode string such as ``0100644``; setuid is dropped."""
    if not value or not re.fullmatch(r"[0-7]{1,7}", value.strip()):
        return None
    return int(value.strip(), 8) & ~stat.S_ISUID


def parse_id(value: str | None) -> int | None:
    """``x-amz-meta-file-owner``/``-group``: a decimal uid or gid."""
    if not value or not re.fullmatch(r"[0-9]{1,10}", value.strip()):
        return None
    n = int(value.strip())
    return n if n < 2**32 else None


def parse_time(value: str | None) -> int | None:
    """``x-amz-meta-file-mtime``/``-atime``: ``<n>ns`` is nanoseconds, a bare number is milliseconds."""
    if not value:
        return None
    value = value.strip()
    if m := _NS.match(value):
        return int(m[1])
    if m := _MS.match(value):
        return int(m[1]) * 1_000_000
    return None


def parse_rdev(value: str | None) -> int | None:
    """``x-amz-meta-file-rdev``: ``<major>,<minor>`` in decimal (lustrefs's header for device nodes)."""
    if not value or not (m := re.fullmatch(r"\s*(\d{1,10}),(\d{1,10})\s*", value)):
        return None
    major, minor = int(m[1]), int(m[2])
    return os.makedev(major, minor) if major < 2**12 and minor < 2**20 else None


def from_user_metadata(meta: dict[str, str]) -> PosixMeta:
    """Parse boto3's ``Metadata`` dict (keys without the ``x-amz-meta-`` prefix, lower case)."""
    m = {k.lower(): v for k, v in meta.items()}
    return PosixMeta(
        mode=parse_mode(m.get("file-permissions")),
        uid=parse_id(m.get("file-owner")),
        gid=parse_id(m.get("file-group")),
        mtime_ns=parse_time(m.get("file-mtime")),
        atime_ns=parse_time(m.get("file-atime")),
        rdev=parse_rdev(m.get("file-rdev")),
    )


def to_user_metadata(mode: int, uid: int, gid: int, mtime_ns: int, atime_ns: int, rdev: int = 0) -> dict[str, str]:
    """The ``x-amz-meta-*`` headers FSx writes on export (boto3 ``Metadata`` form); device nodes also carry
    ``file-rdev``."""
    meta = {
        "file-permissions": f"0{mode:o}",
        "file-owner": str(uid),
        "file-group": str(gid),
        "file-mtime": f"{mtime_ns}ns",
        "file-atime": f"{atime_ns}ns",
        "user-agent": "lustrefs",
    }
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        meta["file-rdev"] = f"{os.major(rdev)},{os.minor(rdev)}"
    return meta
