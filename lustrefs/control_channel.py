"""The daemon's side of the commands that reach it through the mount: ``user.lustrefs.*`` extended attributes.

``getxattr(path, "user.lustrefs.<name>")`` reads state, ``setxattr(path, "user.lustrefs.<name>", value)``
requests an action. Any user can use them on any file they can see; actions on another user's file need root.
"""

from __future__ import annotations

import errno
import json
from typing import Any

import pyfuse3

from . import stats
from .cache import Cache
from .importer import Importer
from .namespace import ROOT_INODE, Namespace
from .writeback import Writeback

PREFIX = b"user.lustrefs."


class Control:
    """Answers ``user.lustrefs.*`` attributes; owns nothing, acts through the namespace, cache and exporter."""

    def __init__(self, ns: Namespace, cache: Cache, writeback: Writeback, importer: Importer) -> None:
        self.ns = ns
        self.cache = cache
        self.writeback = writeback
        self.importer = importer

    def names(self, ino: int) -> list[bytes]:
        """The attribute names listed on ``ino``."""
        return [PREFIX + b"stats"] if ino == ROOT_INODE else []

    async def get(self, ino: int, name: bytes, ctx: Any) -> bytes:
        """The value of ``user.lustrefs.<name>`` on ``ino``."""
        if name == b"stats" and ino == ROOT_INODE:
            snapshot = stats.snapshot(self.ns, self.cache)
            snapshot["export_queue"] = self.writeback.queue_length()
            snapshot["import"] = self.importer.status()
            return json.dumps(snapshot).encode()
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def set(self, ino: int, name: bytes, value: bytes, ctx: Any) -> None:
        """Perform the action ``user.lustrefs.<name>`` on ``ino``."""
        raise pyfuse3.FUSEError(errno.ENOTSUP)
