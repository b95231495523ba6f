"""The kernel's view of mounts: the one parser of ``/proc/self/mountinfo`` (used by the CLI, the daemon and the
demo), and the kernel's per-mount tuning (read-ahead, FUSE background requests).

Each line is ``id parent major:minor root mountpoint options [optional fields...] - fstype source super-options``;
the kernel escapes space, tab, newline and backslash in paths as ``\\ooo`` (octal). Paths are bytes, decoded as
``os.fsdecode`` does, so they compare equal to the paths Python gives (``os.path.realpath``). Standard library only.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo."""

    device: str  # "major:minor" of the mounted file system
    mountpoint: str
    fstype: str  # e.g. "fuse.lustrefs" (FUSE's type plus the subtype)
    source: str


def unescape(field: bytes) -> str:
    """A path field of mountinfo as a str (``\\040`` → space, …)."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes((int(m[1], 8),)), field))


def mounts(path: str = MOUNTINFO) -> list[Mount]:
    """Every mount of this process's mount namespace, in the kernel's order (a later mount stacks on an earlier
    one at the same mount point). Raises OSError if the table cannot be read."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        fields = line.split()
        try:
            sep = fields.index(b"-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3:
            continue
        out.append(
            Mount(
                device=fields[2].decode(),
                mountpoint=unescape(fields[4]),
                fstype=unescape(fields[sep + 1]),
                source=unescape(fields[sep + 2]),
            )
        )
    return out


def mounted_at(mountpoint: str, path: str = MOUNTINFO) -> list[Mount]:
    """The mounts whose mount point is ``mountpoint`` (as given: resolve it first), oldest first; the last one
    is the one visible there. Raises OSError if the table cannot be read."""
    return [m for m in mounts(path) if m.mountpoint == mountpoint]


def tune_kernel(mountpoint: str, read_ahead_kib: int, max_background: int) -> None:
    """Raise the kernel's read-ahead and FUSE background-request limit for this mount (root only).

    The defaults (128 KiB read-ahead, 12 background requests) keep a sequential reader to one small request
    at a time; larger values let the kernel ask for several reads ahead in parallel. Failures are harmless.
    """
    try:
        found = mounted_at(mountpoint)
    except OSError as exc:
        log.debug("cannot read %s: %s", MOUNTINFO, exc)
        return
    if not found:
        return
    device = found[-1].device
    for path, value in (
        (f"/sys/class/bdi/{device}/read_ahead_kb", read_ahead_kib),
        (f"/sys/fs/fuse/connections/{device.split(':')[1]}/max_background", max_background),
    ):
        try:
            Path(path).write_text(str(value))
        except OSError as exc:
            log.debug("cannot set %s: %s", path, exc)
