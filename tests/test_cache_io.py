"""Unit tests of the cache's disk I/O helpers and of the part size a mount chooses (no FUSE, no S3)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from lustrefs.daemon import process as daemon
from lustrefs.data import diskio, model
from tests.helpers import wait_for

MIB = 1024 * 1024
SIZES = [0, 1, 4095, 4096, 4097, 256 * 1024 - 1, 256 * 1024, MIB + 17, 3 * MIB]  # block edges, thresholds


def _dirs(tmp_path: Path) -> list[Path]:
    """A directory on the test's file system and, if there is one, on tmpfs (which may refuse O_DIRECT)."""
    dirs = [tmp_path / "disk"]
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        dirs.append(Path("/dev/shm") / f"lustrefs-test-{os.getpid()}-{tmp_path.name}")
    return dirs


@pytest.mark.parametrize("direct", [True, False])
def test_parts_are_written_whole(tmp_path: Path, direct: bool) -> None:
    rng = random.Random(7)
    for base in _dirs(tmp_path):
        base.mkdir()  # a cache target
        try:
            pieces = [(base / "00" / f"1.v.{i}", rng.randbytes(n)) for i, n in enumerate(SIZES)]
            views = [(path, memoryview(data)[: len(data)]) for path, data in pieces]  # as the fetcher passes them
            diskio.write_parts(views, direct)
            for path, data in pieces:
                assert path.read_bytes() == data, (path, len(data))
            assert not list(base.rglob("*.tmp"))
            # Rewriting a part replaces it whole.
            diskio.write_parts([(pieces[-1][0], b"short")], direct)
            assert pieces[-1][0].read_bytes() == b"short"
        finally:
            shutil.rmtree(base)


def test_direct_parts_bypass_the_page_cache_and_can_be_warmed(tmp_path: Path) -> None:
    data = random.Random(8).randbytes(2 * MIB)
    path = tmp_path / "00" / "1.v.0"
    diskio.write_parts([(path, data)], direct=True)
    if diskio.pread_cached(path, 0, MIB) is not None:
        pytest.skip("this file system does not support O_DIRECT: the part went through the page cache")
    # A read that would wait for the disk is refused in the trio thread, and done by a worker instead.
    assert diskio.pread(path, 4096, 8192) == data[4096:8192]
    diskio.will_need([path])
    got = wait_for(lambda: diskio.pread_cached(path, 0, len(data)), 10, "the part in the page cache")
    assert bytes(got) == data


def test_pread_cached_reads_pages_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    assert diskio.pread_cached(path, 2, 6) == bytearray(b"2345")
    with pytest.raises(FileNotFoundError):
        diskio.pread_cached(tmp_path / "missing", 0, 1)


def test_pread_cached_where_rwf_nowait_is_not_supported(tmp_path: Path) -> None:
    """tmpfs answers RWF_NOWAIT with EOPNOTSUPP: no answer (the caller reads in a thread), not an error."""
    for base in _dirs(tmp_path)[1:]:
        base.mkdir()
        try:
            path = base / "f"
            path.write_bytes(b"0123456789")
            assert diskio.pread_cached(path, 2, 6) in (None, bytearray(b"2345"))
        finally:
            shutil.rmtree(base)


def test_joined_avoids_a_copy_for_one_piece() -> None:
    view = memoryview(b"abcdef")[1:4]
    assert model.joined([view, b""]) is view
    assert model.joined([b"ab", memoryview(b"cd"), bytearray(b"e")]) == b"abcde"
    assert model.joined([]) == b""


@pytest.mark.parametrize(
    ("option", "chunk_mib", "old_part_mib", "expected_mib"),
    [
        (None, 1024, None, 4),  # a new cache: 4 MiB parts
        (None, 1024, 1, 1),  # an existing cache keeps its part size (its unexported data stays readable)
        (2, 1024, 1, 2),  # the option wins
        (None, 1, None, 1),  # capped at the chunk size
        (4, 6, None, 1),  # the chunk is not a multiple of the part: 1 MiB
    ],
)
def test_part_size(option: int | None, chunk_mib: int, old_part_mib: int | None, expected_mib: int) -> None:
    old = None if old_part_mib is None else json.dumps({"targets": [], "part": old_part_mib * MIB, "chunk": 0})
    assert daemon._part_size(option, chunk_mib * MIB, old) == expected_mib * MIB
