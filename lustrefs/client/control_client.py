"""The client side of the control channel: one request to the daemon serving a path (the CLI, the benchmarks).

The daemon's side, :mod:`lustrefs.daemon.control_channel`, describes the protocol. :func:`request` finds the root of
the mount holding ``path`` (the parents up to where the device changes), opens its ``.lustrefs`` read-write,
writes the request about ``path``'s inode (``st_ino`` is the daemon's inode number) and reads the response.
``stats`` opens it read-only and only reads: that also works on a ``-o ro`` mount, where the other requests
fail with EROFS.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any

from lustrefs.constants import CONTROL_INODE, CONTROL_NAME, ROOT_INODE

READ_SIZE = 64 * 1024


class NotLustrefs(OSError):
    """``path`` is not in a lustrefs mount: the root of its file system has no control file."""


class ControlError(OSError):
    """The daemon refused or failed the request: ``errno``, FSx's error ``code`` (or None) and ``message``.

    ``strerror`` is ``"<code>: <message>"`` when there is a code, else the message.
    """

    def __init__(self, err: int, code: str | None, message: str, path: str) -> None:
        super().__init__(err, f"{code}: {message}" if code else message, path)
        self.code = code
        self.message = message


def mount_root(path: str) -> str:
    """The root of the file system holding ``path``: its parents are followed while ``st_dev`` stays the same."""
    current = os.path.realpath(path)
    dev = os.stat(current).st_dev
    while current != "/":
        parent = os.path.dirname(current)
        if os.stat(parent).st_dev != dev:
            break
        current = parent
    return current


def request(path: str, op: str, value: str | None = None) -> Any:
    """Ask the daemon serving ``path`` for ``op`` on it; returns the response's value.

    Raises NotLustrefs if ``path`` is not in a lustrefs mount, ControlError if the daemon answers with an error,
    and OSError if ``path`` or the mount cannot be reached (``FileNotFoundError``, ``ENOTCONN``…).
    """
    target = os.stat(path)
    control = os.path.join(mount_root(path), CONTROL_NAME)
    try:
        info = os.stat(control)
    except FileNotFoundError:
        info = None
    if info is None or info.st_ino != CONTROL_INODE or info.st_dev != target.st_dev or not stat.S_ISREG(info.st_mode):
        raise NotLustrefs(errno.ENOTSUP, "not in a lustrefs mount", path)
    if op == "stats":
        # A read-only handle reads as the mount's stats: nothing to write, and it works on a -o ro mount too.
        if target.st_ino != ROOT_INODE:
            raise ControlError(errno.ENOTSUP, "BadRequest", "stats is asked of the root of the mount", path)
        data = b""
    else:
        data = json.dumps({"op": op, "ino": target.st_ino, "value": value}).encode() + b"\n"
    fd = os.open(control, (os.O_RDWR if data else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        chunks = []
        offset = 0
        while chunk := os.pread(fd, READ_SIZE, offset):
            chunks.append(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    try:
        response = json.loads(b"".join(chunks))
    except ValueError:
        response = None
    if not isinstance(response, dict):
        raise NotLustrefs(errno.ENOTSUP, "the control file gave no response", path)
    if response.get("ok"):
        return response.get("value")
    err = response.get("errno")
    code, message = response.get("code"), str(response.get("message") or "")
    raise ControlError(err if isinstance(err, int) and err > 0 else errno.EIO, code, message, path)
