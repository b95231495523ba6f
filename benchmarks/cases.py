"""The measurements on a file system path (a mount or the local disk), each with a timeout.

Tools run as subprocesses (``dd``, ``find``, ``ls``, ``xargs cat``) so that a hung mount costs a timeout, not
the run; the 4 KiB latency probe is a ``pread`` in a thread, bounded the same way.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import statistics
import time
from pathlib import Path

from .host import CaseError, OpTimeout, PageCache, call_with_timeout, run_timed

MB = 1e6  # throughput is reported in MB/s (10^6 bytes)
PROBE = 4096


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


def first_byte_latency(file: Path, offset: int, cache: PageCache, timeout: float) -> float:
    """Seconds to ``pread`` 4 KiB at ``offset``; the file is opened first and the page cache dropped (untimed)."""
    fd = call_with_timeout(lambda: os.open(file, os.O_RDONLY), timeout, f"open {file}")
    try:
        cache.drop(file)

        def probe() -> float:
            start = time.perf_counter()
            data = os.pread(fd, PROBE, offset)
            elapsed = time.perf_counter() - start
            if len(data) != PROBE:
                raise CaseError(f"pread at {offset} returned {len(data)} bytes")
            return elapsed

        return call_with_timeout(probe, timeout, "4 KiB read")
    finally:
        with contextlib.suppress(OpTimeout, OSError):
            call_with_timeout(lambda: os.close(fd), 10, "close")


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
