"""The measurements on a file system path (a mount or the local disk), each with a timeout.

Tools run as subprocesses (``dd``, ``find``, ``ls``, ``xargs cat``) so that a hung mount costs a timeout, not
the run; the 4 KiB probes (``pread``) and the big write run in a thread, bounded the same way.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .host import CaseError, OpTimeout, PageCache, call_with_timeout, run_timed

MB = 1e6  # throughput is reported in MB/s (10^6 bytes)
PROBE = 4096
WRITE_BLOCK = 1024**2  # the big write is issued in blocks of this size (as dd bs=1M)
POLL = 0.05  # seconds between two checks that a written object is visible in S3


def read_mbps(file: Path, size: int, timeout: float) -> float:
    """Sequential read of the whole file with ``dd bs=1M``; MB/s. Checks that ``size`` bytes came back."""
    ran = run_timed(["dd", f"if={file}", "of=/dev/null", "bs=1M"], timeout)
    m = re.search(r"^(\d+) bytes", ran.stderr, re.MULTILINE)
    got = int(m.group(1)) if m else -1
    if got != size:
        raise CaseError(f"read {got} bytes of {file}, expected {size}")
    return size / ran.seconds / MB


def spread_offsets(size: int, n: int, seed: int) -> list[int]:
    """``n`` random 4 KiB-aligned offsets, one in each of ``n`` equal slices of the file (far apart)."""
    rng = random.Random(seed)
    slice_len = size // n
    return [(i * slice_len + rng.randrange(max(slice_len - PROBE, 1))) // PROBE * PROBE for i in range(n)]


def _pread_probe(fd: int, offset: int) -> None:
    data = os.pread(fd, PROBE, offset)
    if len(data) != PROBE:
        raise CaseError(f"pread at {offset} returned {len(data)} bytes")


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OpTimeout, OSError):
        call_with_timeout(lambda: os.close(fd), 10, "close")


def first_byte_latency(file: Path, offset: int, cache: PageCache, timeout: float) -> float:
    """Seconds to ``pread`` 4 KiB at ``offset``; the file is opened first and the page cache dropped (untimed)."""
    fd = call_with_timeout(lambda: os.open(file, os.O_RDONLY), timeout, f"open {file}")
    try:
        cache.drop(file)

        def probe() -> float:
            start = time.perf_counter()
            _pread_probe(fd, offset)
            return time.perf_counter() - start

        return call_with_timeout(probe, timeout, "4 KiB read")
    finally:
        _close_quietly(fd)


def random_reads(file: Path, offsets: list[int], cache: PageCache, timeout: float) -> list[float]:
    """4 KiB random reads one after another on one mount: for each offset, seconds to ``open`` the file and
    ``pread`` 4 KiB there, the page cache dropped before (the close is not timed). The file's name is made known
    first with a ``stat`` (not timed), as a workload that found the file before reading it."""
    call_with_timeout(lambda: os.stat(file), timeout, f"stat {file}")
    return [_open_and_read(file, offset, cache, timeout) for offset in offsets]


def _open_and_read(file: Path, offset: int, cache: PageCache, timeout: float) -> float:
    cache.drop(file)
    fds: list[int] = []

    def probe() -> float:
        start = time.perf_counter()
        fds.append(os.open(file, os.O_RDONLY))
        _pread_probe(fds[0], offset)
        return time.perf_counter() - start

    try:
        return call_with_timeout(probe, timeout, "open + 4 KiB read")
    finally:
        for fd in fds:
            _close_quietly(fd)


@dataclass(frozen=True)
class WriteTiming:
    """A big write: seconds from ``open`` until the object was visible in S3, and from ``close`` until then."""

    seconds: float
    close_to_visible: float


def write_visible(file: Path, data: bytes, visible: Callable[[], bool], timeout: float) -> WriteTiming:
    """Create ``file``, write ``data`` in WRITE_BLOCK blocks and close it, then poll ``visible()`` (the object in
    S3 with its full size, asked of the endpoint itself) every POLL seconds until it is true."""

    def write() -> tuple[float, float]:
        view = memoryview(data)
        start = time.perf_counter()
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for off in range(0, len(view), WRITE_BLOCK):
                block = view[off : off + WRITE_BLOCK]
                while block:
                    block = block[os.write(fd, block) :]
        finally:
            os.close(fd)  # close() is where s3fs uploads: inside the timed part, as for every system
        return start, time.perf_counter()

    start, closed = call_with_timeout(write, timeout, f"write of {file}")
    deadline = closed + timeout
    while not visible():
        if time.perf_counter() > deadline:
            raise OpTimeout(f"{file} was not visible in S3 within {timeout:g} s of its close")
        time.sleep(POLL)
    done = time.perf_counter()
    return WriteTiming(done - start, done - closed)


def median(values: list[float]) -> float:
    return statistics.median(values)


def find_stat(folder: Path, expected_files: int, timeout: float) -> float:
    """``find`` printing every entry's type, size, mode and mtime (a stat each); seconds."""
    ran = run_timed(["find", str(folder), "-printf", "%y %s %m %T@\n"], timeout)
    files = sum(1 for line in ran.stdout.splitlines() if line.startswith("f "))
    if files != expected_files:
        raise CaseError(f"find in {folder} saw {files} files, expected {expected_files}")
    return ran.seconds


def ls_long(folder: Path, expected_files: int, timeout: float) -> float:
    """``ls -l`` of one directory; seconds."""
    ran = run_timed(["ls", "-l", "--color=never", str(folder)], timeout)
    files = sum(1 for line in ran.stdout.splitlines() if line.startswith("-"))
    if files != expected_files:
        raise CaseError(f"ls -l of {folder} listed {files} files, expected {expected_files}")
    return ran.seconds


def cat_files(folder: Path, relpaths: list[str], timeout: float) -> float:
    """``cat`` of every file (``xargs -0 cat`` in the folder, one file after another); files per second."""
    names = b"\0".join(os.fsencode(p) for p in relpaths)
    ran = run_timed(["xargs", "-0", "cat"], timeout, cwd=folder, stdin=names, capture=False)
    return len(relpaths) / ran.seconds
