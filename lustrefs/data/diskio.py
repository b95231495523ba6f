"""System calls on part files: whole-part writes (tmp + rename, ``O_DIRECT``), ``pwrite``, reads that never wait
for the disk (``RWF_NOWAIT``), ``POSIX_FADV_WILLNEED`` and fsync.

Owns no state but a page-aligned scratch buffer per worker thread. No await points: these are blocking calls,
which ``lustrefs.data.parts`` runs on the trio thread (those that cannot block for long) or in worker threads.
Callers reach them as ``diskio.write_parts`` and so on, looked up at call time (tests substitute them).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from lustrefs.data.model import Buffer

DIRECT_MIN = 256 * 1024  # smaller parts go through the page cache: an O_DIRECT write waits for the device
_ALIGN = 4096  # O_DIRECT alignment of buffers, offsets and lengths (covers 512- and 4096-byte sectors)
_scratch = threading.local()  # per worker thread: an aligned buffer for O_DIRECT writes


def write_parts(pieces: Sequence[tuple[Path, Buffer]], direct: bool = False) -> None:
    """Write each part via a temporary file and a rename, so a part file is whole or absent (worker thread).

    ``direct``: write the whole 4 KiB blocks of parts of 256 KiB or more with ``O_DIRECT`` (bypassing the page
    cache) where the file system supports it, the tail with a normal write. A failed write leaves no temporary
    file behind (on a full disk it would take the room the caller makes).
    """
    for path, data in pieces:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            done = _write_direct(fd, view) if direct and len(view) >= DIRECT_MIN else 0
            while done < len(view):
                done += os.write(fd, view[done:])
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        os.replace(tmp, path)


def pwrite(path: Path, data: Buffer, off: int) -> None:
    """Write all of ``data`` at ``off`` into an existing part file."""
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], off + done)
    finally:
        os.close(fd)


def _write_direct(fd: int, view: memoryview) -> int:
    """Write the whole aligned blocks of ``view`` at offset 0 with ``O_DIRECT``; the bytes written (0 if the
    file system refuses ``O_DIRECT``). Leaves ``fd`` without ``O_DIRECT``."""
    blocks = len(view) // _ALIGN * _ALIGN
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return 0
    buf = getattr(_scratch, "buf", None)
    if buf is None:
        buf = _scratch.buf = mmap.mmap(-1, 1024 * 1024)  # page-aligned, reused: no page faults per write
    done = 0
    try:
        while done < blocks:
            n = min(len(buf), blocks - done)
            buf[:n] = view[done : done + n]
            written = os.write(fd, memoryview(buf)[:n])
            done += written
            if written != n:
                break  # a short O_DIRECT write: the rest goes through the page cache
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        os.lseek(fd, done, os.SEEK_SET)  # O_DIRECT refused here (some file systems accept only the flag)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return done


def pread(path: Path, lo: int, hi: int) -> bytes:
    """Bytes ``[lo, hi)`` of a part file (worker thread)."""
    with open(path, "rb") as f:
        return os.pread(f.fileno(), hi - lo, lo)


def pread_cached(path: Path, lo: int, hi: int) -> bytearray | None:
    """Bytes ``[lo, hi)`` of a part file if the page cache holds all of them, else None: never waits for the
    disk (``RWF_NOWAIT``), so the trio thread may call it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(hi - lo)
        try:
            n = os.preadv(fd, [buf], lo, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:  # RWF_NOWAIT not supported here (tmpfs: EOPNOTSUPP): read in a worker thread
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return None
            raise
        return buf if n == len(buf) else None
    finally:
        os.close(fd)


def will_need(paths: list[Path]) -> None:
    """Ask the kernel to read these part files into the page cache; it starts the reads and does not wait."""
    for path in paths:
        with contextlib.suppress(OSError):  # advice only: a part gone or a file system without it changes nothing
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)


def fsync_all(paths: list[Path]) -> None:
    """fsync the files and then their directories (worker thread)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if paths:
        for parent in {p.parent for p in paths}:
            fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
