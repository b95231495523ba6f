"""Cache targets: a missing target directory fails the mount; a full target disk makes room by evicting clean
parts, and only local data left on it gives ENOSPC (in-process, the disk simulated; no FUSE)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from helpers import MotoEndpoint, create_fs, run_cli

from lustrefs.client import mount
from lustrefs.daemon import process as daemon
from lustrefs.data import cache, diskio
from lustrefs.data.cache import Buffer, Cache, FileData, ObjectVersion
from lustrefs.store import db

PART = 64 * 1024
DISK = 4 * PART  # the simulated target disk holds four parts


# ----------------------------------------------------------------------------------------------- cache_dir


def test_a_missing_cache_dir_fails_the_mount(
    moto: MotoEndpoint, bucket: str, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs_id = create_fs(moto, f"s3://{bucket}")
    (tmp_path / "mnt").mkdir()
    (tmp_path / "nvme0").mkdir()
    missing = tmp_path / "nvme1" / "cache"  # an unmounted disk: its directory is not there
    monkeypatch.setattr(mount, "_start_daemon", lambda p: pytest.fail("the daemon must not start"))
    opts = f"cache_dir={tmp_path / 'nvme0'}:{missing}"
    rc, _, err = run_cli("--endpoint-url", moto.url, "mount", fs_id, str(tmp_path / "mnt"), "-o", opts)
    assert rc == mount.MOUNT_FAILURE
    assert f"cache_dir {missing} does not exist" in err
    assert not missing.parent.exists()  # nothing created on the root disk
    assert not (tmp_path / "nvme0" / fs_id).exists()


def test_an_existing_cache_dir_gets_a_subdirectory_per_file_system(
    moto: MotoEndpoint, bucket: str, home: Path, tmp_path: Path
) -> None:
    fs_id = create_fs(moto, f"s3://{bucket}")
    (tmp_path / "mnt").mkdir()
    (tmp_path / "nvme0").mkdir()
    p = mount.plan(fs_id, str(tmp_path / "mnt"), f"cache_dir={tmp_path / 'nvme0'}", moto.url, None, None)
    assert daemon._cache_targets(p, home / fs_id) == [tmp_path / "nvme0" / fs_id]
    assert stat.S_IMODE(os.stat(tmp_path / "nvme0" / fs_id).st_mode) == 0o700


# ----------------------------------------------------------------------------------------------- a full disk


class SmallDisk:
    """Part writes that fail with ENOSPC when the files under ``root`` would take more than ``size`` bytes."""

    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.size = size
        self.refused = 0
        self._write_parts = diskio.write_parts

    def used(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def _check(self, growth: int) -> None:
        if self.used() + growth > self.size:
            self.refused += 1
            raise OSError(errno.ENOSPC, "No space left on device")

    def write_parts(self, pieces: Sequence[tuple[Path, Buffer]], direct: bool = False) -> None:
        self._check(sum(len(data) - (p.stat().st_size if p.exists() else 0) for p, data in pieces))
        self._write_parts(pieces, direct)

    def pwrite(self, path: Path, data: Buffer, off: int) -> None:
        self._check(max(0, off + len(data) - path.stat().st_size))
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, off)
        finally:
            os.close(fd)


class Objects:
    """The repository: object bodies by key."""

    def __init__(self, bodies: dict[str, bytes]) -> None:
        self.bodies = bodies

    async def get_range(self, key: str, etag: str, start: int, end: int) -> bytes:
        return self.bodies[key][start:end]


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SmallDisk:
    target = tmp_path / "target"
    target.mkdir()
    d = SmallDisk(target, DISK)
    monkeypatch.setattr(diskio, "write_parts", d.write_parts)
    monkeypatch.setattr(diskio, "pwrite", d.pwrite)
    return d


A = ObjectVersion(1, "a", "etag-a", 8 * PART)
B = ObjectVersion(2, "b", "etag-b", 2 * PART)
BODIES = {"a": bytes([1]) * A.size, "b": bytes([2]) * B.size}


def _cache(tmp_path: Path, disk: SmallDisk) -> Cache:
    capacity = 1024 * DISK  # cache_size far larger than the disk
    return Cache(db.connect(tmp_path / "state.db"), Objects(BODIES), [disk.root], capacity, 16 * PART, PART)


async def _read_parts(c: Cache, obj: ObjectVersion, *parts: int) -> None:
    for p in parts:
        assert bytes(await c.read_source(obj, p * PART, PART)) == BODIES[obj.key][p * PART : (p + 1) * PART]


def test_a_full_disk_evicts_clean_parts_lru_first(tmp_path: Path, disk: SmallDisk) -> None:
    c = _cache(tmp_path, disk)

    async def main() -> None:
        await _read_parts(c, A, 0, 1, 2, 3, 0)  # the disk is full; part 1 is the least recently used
        await _read_parts(c, A, 4)

    trio.run(main)
    assert disk.refused >= 1
    assert (1, "etag-a", 4) in c.disk and (1, "etag-a", 1) not in c.disk
    assert {(1, "etag-a", p) for p in (0, 2, 3)} <= set(c.disk)
    assert c.stats.evictions == 1 and disk.used() <= DISK


def test_local_data_evicts_clean_parts_then_gets_enospc(tmp_path: Path, disk: SmallDisk) -> None:
    c = _cache(tmp_path, disk)
    written: list[int] = []
    errors: list[OSError] = []

    async def main() -> None:
        await _read_parts(c, A, 0, 1, 2, 3)  # the disk is full of clean parts
        f = FileData(B.ino, B.size, B, local=True)
        for p in range(5):  # copy-on-write of B's parts, then new parts: the fifth finds no clean part left
            try:
                await c.write(f, p * PART, bytes([9]) * PART)
                written.append(p)
            except OSError as exc:
                errors.append(exc)
        await _read_parts(c, A, 5)  # a read still works: the part is served from memory, not kept on disk

    trio.run(main)
    assert written == [0, 1, 2, 3]
    assert [e.errno for e in errors] == [errno.ENOSPC]
    assert all(etag == cache.LOCAL for _, etag, _ in c.disk)  # every clean part made room
    for p in range(4):
        assert c.path_of((B.ino, cache.LOCAL, p)).read_bytes() == bytes([9]) * PART
    assert disk.used() <= DISK
