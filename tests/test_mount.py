"""Integration tests: a real FUSE mount (the ``lustrefs mount`` command) against moto's server on 127.0.0.1."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import stat
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import LUSTREFS, MotoEndpoint, Mounted, create_fs, mount_fs, wait_for

from lustrefs import records

pytestmark = pytest.mark.fuse
MIB = 1024 * 1024


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def meta(mode: str, uid: int, gid: int, mtime_ns: int | None = None, atime: str | None = None) -> dict[str, str]:
    m = {"file-permissions": mode, "file-owner": str(uid), "file-group": str(gid)}
    if mtime_ns is not None:
        m["file-mtime"] = f"{mtime_ns}ns"
    if atime is not None:
        m["file-atime"] = atime
    return m


def test_tree_listing_and_attributes(s3: Any, bucket: str, mounter: Any) -> None:
    put = s3.put_object
    put(Bucket=bucket, Key="data/readme.txt", Body=b"hello\n")
    put(Bucket=bucket, Key="data/a/b/c/deep.txt", Body=b"deep")  # implied a/, a/b/, a/b/c/
    put(Bucket=bucket, Key="data/marked/", Body=b"", Metadata=meta("0040750", 42, 43))
    put(Bucket=bucket, Key="data/marked/in.txt", Body=b"in")
    put(Bucket=bucket, Key="data/posix.bin", Body=b"x" * 10,
        Metadata=meta("0104640", 1000, 1001, 1_600_000_000_123_456_789, "1500000000000"))  # fmt: skip
    put(Bucket=bucket, Key="data/link", Body=b"readme.txt", Metadata=meta("0120777", 0, 0))
    put(Bucket=bucket, Key="data/bad/../escape.txt", Body=b"x")
    put(Bucket=bucket, Key="data/empty//name", Body=b"x")
    put(Bucket=bucket, Key="data/clash", Body=b"a file")
    put(Bucket=bucket, Key="data/clash/inside", Body=b"a file in a dir")
    put(Bucket=bucket, Key="database/other.txt", Body=b"raw prefix match")
    put(Bucket=bucket, Key="elsewhere/not-imported.txt", Body=b"no")

    m = mounter(f"s3://{bucket}/data", options="uid=1234,gid=5678,file_mode=640,dir_mode=750")

    # The import prefix filters and does not re-root; S3's prefix is a string prefix.
    assert sorted(os.listdir(m.path)) == ["data", "database"]
    names = sorted(os.listdir(m.path / "data"))
    assert names == ["a", "bad", "clash", "empty", "link", "marked", "posix.bin", "readme.txt"]
    assert os.listdir(m.path / "data/a/b/c") == ["deep.txt"]
    assert (m.path / "data/a/b/c/deep.txt").read_bytes() == b"deep"
    assert os.listdir(m.path / "data/bad") == [] and os.listdir(m.path / "data/empty") == []
    assert {".", ".."} <= set(
        subprocess.run(["ls", "-a", m.path / "data"], capture_output=True, text=True).stdout.split()
    )

    # POSIX metadata from x-amz-meta-file-*: mode (setuid dropped), owner, group, mtime in ns, atime in ms.
    st = os.stat(m.path / "data/posix.bin")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid, st.st_size) == (1000, 1001, 10)
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    assert st.st_atime_ns == 1_500_000_000_000 * 1_000_000
    # A directory marker's metadata applies to the directory.
    st = os.stat(m.path / "data/marked")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750 and (st.st_uid, st.st_gid) == (42, 43)
    # Defaults (mount options) for objects without metadata; mtime from Last-Modified.
    st = os.stat(m.path / "data/readme.txt")
    head = s3.head_object(Bucket=bucket, Key="data/readme.txt")
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (1234, 5678)
    assert int(st.st_mtime) == int(head["LastModified"].timestamp())
    st = os.stat(m.path / "data/a")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750 and st.st_uid == 1234
    # Symlinks: the body is the target.
    assert os.readlink(m.path / "data/link") == "readme.txt"
    assert (m.path / "data/link").read_bytes() == b"hello\n"

    # Skipped keys and file/directory clashes are logged with FSx's codes; the directory wins.
    assert stat.S_ISDIR(os.stat(m.path / "data/clash").st_mode)
    assert (m.path / "data/clash/inside").read_bytes() == b"a file in a dir"
    codes = {(e["code"], e["key"]) for e in m.events()}
    assert ("S3ObjectTypeMismatch", "data/clash") in codes
    assert ("S3ObjectPathNotPosixCompliant", "data/bad/../") in codes
    assert ("S3ObjectPathNotPosixCompliant", "data/empty//") in codes

    # The stats count what was asked of S3; a second listing is served locally.
    before = m.stats()["requests"]
    assert sorted(os.listdir(m.path / "data")) == names
    os.stat(m.path / "data/posix.bin")
    assert m.stats()["requests"] == before
    m.unmount()


def test_directory_of_10000_objects(moto: MotoEndpoint, bucket: str, mounter: Any) -> None:
    for i in range(10_000):
        moto.backend.put_object(bucket, f"big/f{i:05d}", b"%d" % i)
    m = mounter(f"s3://{bucket}/big/", options="posix_metadata=off")
    names = os.listdir(m.path / "big")
    assert len(names) == 10_000 and len(set(names)) == 10_000
    assert (m.path / "big/f09999").read_bytes() == b"9999"
    assert os.stat(m.path / "big/f01234").st_size == 4
    requests = m.stats()["requests"]
    assert requests["LIST"] == 1 + 10  # the root, then ten pages of 1,000
    assert requests["HEAD"] == 0  # posix_metadata=off


def test_lookup_in_unlisted_directory_waits_only_for_its_entry(
    moto: MotoEndpoint, s3: Any, bucket: str, mounter: Any
) -> None:
    s3.put_object(Bucket=bucket, Key="d/x", Body=b"1", Metadata=meta("0100600", 7, 8))
    for i in range(1500):  # a listing of d would take two pages
        moto.backend.put_object(bucket, f"d/y{i:04d}", b"")
    m = mounter(f"s3://{bucket}")
    st = os.stat(m.path / "d/x")  # no readdir before: lookup of d, then of x
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (7, 8, 0o600)
    # One targeted LIST per directory and nothing else: opening a file by its path lists no directory.
    assert m.stats()["requests"]["LIST"] == 2
    with pytest.raises(FileNotFoundError):
        os.stat(m.path / "d/missing")
    # A second name looked up in d: d is listed in the background (two pages), for the names likely to follow.
    wait_for(lambda: m.stats()["requests"]["LIST"] == 2 + 1 + 2, 30, "the background listing of d")
    assert len(os.listdir(m.path / "d")) == 1501
    assert m.stats()["requests"]["LIST"] == 5


def test_multi_chunk_file_on_striped_targets(s3: Any, bucket: str, mounter: Any, tmp_path: Path) -> None:
    data = blob(5 * MIB + 12345, seed=1)
    s3.put_object(Bucket=bucket, Key="f.bin", Body=data)
    targets = [tmp_path / f"target{i}" for i in range(3)]
    for target in targets:
        target.mkdir()  # a cache target must exist (an unmounted disk must not fill the root file system)
    m = mounter(f"s3://{bucket}", chunk_mib=1, options="cache_dir=" + ":".join(map(str, targets)))
    # A random read fetches only the part it touches: no read-ahead before a reader proves sequential.
    fd = os.open(m.path / "f.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead either
        assert os.pread(fd, 4096, 3 * MIB + 10) == data[3 * MIB + 10 : 3 * MIB + 10 + 4096]
    finally:
        os.close(fd)
    # It is answered by its own small GET, and nothing is fetched behind it (a random reader pays 4 KiB, not a part).
    assert m.stats()["requests"]["GET"] == 1 and m.stats()["cache"]["direct_reads"] == 1
    assert m.stats()["cache"]["bytes_fetched"] == 0
    assert file_sha(m.path / "f.bin") == sha(data)
    assert m.stats()["cache"]["bytes_fetched"] == len(data)  # every part fetched exactly once
    # Readers are answered from memory as GETs return; the parts reach the disk in the background.
    assert m.stats()["cache"]["memory_hits"] >= 1
    wait_for(lambda: m.stats()["cache"]["writing"] == 0, 30, "the parts to be written")
    # Chunk N is stored on target N mod 3.
    for i, target in enumerate(targets):
        parts = sorted(int(p.name.rsplit(".", 1)[1]) for p in target.rglob("*") if p.is_file())
        assert parts == [n for n in range(6) if n % 3 == i], (i, parts)
    assert [t["used"] for t in m.stats()["cache"]["targets"]] == [2 * MIB, 2 * MIB, MIB + 12345]
    # Data evicted from the page cache comes from the disk cache, with no S3 request.
    with open(m.path / "f.bin", "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    gets = m.stats()["requests"]["GET"]
    assert file_sha(m.path / "f.bin") == sha(data)
    assert m.stats()["requests"]["GET"] == gets


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no tmpfs at /dev/shm")
def test_cache_on_tmpfs(moto: MotoEndpoint, s3: Any, bucket: str, home: Path, tmp_path: Path) -> None:
    """A cache target on tmpfs (no RWF_NOWAIT there) serves reads from its part files after a remount."""
    data = blob(3 * MIB + 5, seed=6)
    s3.put_object(Bucket=bucket, Key="t.bin", Body=data)
    target = Path("/dev/shm") / f"lustrefs-test-{os.getpid()}-{tmp_path.name}"
    target.mkdir()
    fs_id = create_fs(moto, f"s3://{bucket}")
    try:
        for round_ in range(2):
            res, m = mount_fs(fs_id, tmp_path / "mnt", f"cache_dir={target}")
            assert m is not None, res.stderr
            try:
                assert file_sha(m.path / "t.bin") == sha(data)
                # Second round: read from the part files on tmpfs, nothing fetched.
                assert m.stats()["cache"]["bytes_fetched"] == (len(data) if round_ == 0 else 0)
                wait_for(lambda m=m: m.stats()["cache"]["writing"] == 0, 30, "the parts to be written")
                m.unmount()
            finally:
                m.cleanup()
    finally:
        shutil.rmtree(target, ignore_errors=True)


def test_concurrent_readers_share_downloads(s3: Any, bucket: str, mounter: Any) -> None:
    data = blob(4 * MIB, seed=2)
    s3.put_object(Bucket=bucket, Key="shared.bin", Body=data)
    m = mounter(f"s3://{bucket}", chunk_mib=2)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def reader() -> None:
        barrier.wait()
        results.append(file_sha(m.path / "shared.bin"))

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [sha(data)] * 8
    assert m.stats()["cache"]["bytes_fetched"] == len(data)  # each part downloaded once


def test_eviction_under_a_small_cache(s3: Any, bucket: str, mounter: Any) -> None:
    files = {f"f{i}": blob(2 * MIB, seed=10 + i) for i in range(5)}
    for name, data in files.items():
        s3.put_object(Bucket=bucket, Key=name, Body=data)
    capacity = 4 * MIB
    m = mounter(f"s3://{bucket}", options=f"cache_size={capacity / 1024**3}")
    for _ in range(2):
        for name, data in files.items():
            assert file_sha(m.path / name) == sha(data)
            assert m.stats()["cache"]["used"] <= capacity
    on_disk = sum(p.stat().st_size for p in (m.state_dir / "cache").rglob("*") if p.is_file())
    assert on_disk <= capacity
    assert m.stats()["cache"]["evictions"] >= 6
    assert os.statvfs(m.path).f_blocks * os.statvfs(m.path).f_frsize == capacity


def test_cache_survives_remount(moto: MotoEndpoint, s3: Any, bucket: str, home: Path, tmp_path: Path) -> None:
    data = blob(3 * MIB, seed=3)
    s3.put_object(Bucket=bucket, Key="keep.bin", Body=data)
    fs_id = create_fs(moto, f"s3://{bucket}")
    for round_ in range(2):
        res, m = mount_fs(fs_id, tmp_path / "mnt", "")
        assert m is not None, res.stderr
        try:
            assert file_sha(m.path / "keep.bin") == sha(data)
            snapshot = m.stats()["cache"]
            assert snapshot["bytes_fetched"] == (len(data) if round_ == 0 else 0)
            assert snapshot["read_bytes"] == len(data)
            # First read: served from memory as the GETs return; after the remount: from the disk.
            assert (snapshot["memory_hits"] > 0) == (round_ == 0)
            # The GETs (and HEADs) went the fast path, with no fallback to boto3.
            fast = m.stats()["fast_path"]
            assert fast["passed"] == 0 and (fast["answered"] > 0) == (round_ == 0)
            m.unmount()
        finally:
            m.cleanup()


def test_endpoint_down_gives_eio_then_recovers(moto: MotoEndpoint, s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key="cached.txt", Body=b"cached")
    s3.put_object(Bucket=bucket, Key="cold.txt", Body=b"cold")
    m = mounter(f"s3://{bucket}")
    assert (m.path / "cached.txt").read_bytes() == b"cached"
    os.stat(m.path / "cold.txt")
    moto.stop()
    try:
        with pytest.raises(OSError) as exc:
            (m.path / "cold.txt").read_bytes()
        assert exc.value.errno == errno.EIO
        assert (m.path / "cached.txt").read_bytes() == b"cached"  # served from the cache
        with pytest.raises(OSError) as exc:
            os.listdir(m.path / "never-listed")
        assert exc.value.errno in (errno.EIO, errno.ENOENT)
    finally:
        moto.start()
    assert (m.path / "cold.txt").read_bytes() == b"cold"  # the mount survived


def test_mount_fails_cleanly(moto: MotoEndpoint, s3: Any, bucket: str, home: Path, tmp_path: Path) -> None:
    fs_id = create_fs(moto, f"s3://{bucket}/x")
    s3.delete_bucket(Bucket=bucket)
    res, m = mount_fs(fs_id, tmp_path / "mnt", "")
    assert m is None and res.returncode == 32
    assert f"cannot read s3://{bucket}/x" in res.stderr
    assert not os.path.ismount(tmp_path / "mnt") and records.mount_state(fs_id) is None
    res, m = mount_fs(fs_id, tmp_path / "mnt2", "no_such_option=1")
    assert m is None and res.returncode == 32 and "unknown mount option 'no_such_option'" in res.stderr
    res, m = mount_fs("fs-00000000000000000", tmp_path / "mnt3", "")
    assert m is None and "FileSystemNotFound" in res.stderr
    res = subprocess.run([LUSTREFS, "umount", str(tmp_path / "mnt")], capture_output=True, text=True)
    assert res.returncode != 0 and "not a lustrefs mount" in res.stderr


def test_mounted_twice_is_refused(s3: Any, bucket: str, mounter: Any, tmp_path: Path) -> None:
    m: Mounted = mounter(f"s3://{bucket}")
    res, other = mount_fs(m.fs_id, tmp_path / "second", "")
    assert other is None and "already mounted" in res.stderr
    wait_for(lambda: os.path.ismount(m.path), 5, "the first mount")


def test_reads_are_pinned_to_the_listed_version(s3: Any, bucket: str, mounter: Any) -> None:
    old, new = blob(2 * MIB, seed=4), blob(2 * MIB, seed=5)
    s3.put_object(Bucket=bucket, Key="v.bin", Body=old)
    m = mounter(f"s3://{bucket}")
    fd = os.open(m.path / "v.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(fd, 4096, MIB + 1) == old[MIB + 1 : MIB + 1 + 4096]  # a random read: no read-ahead
        assert os.pread(fd, 4096, MIB + 8193) == old[MIB + 8193 : MIB + 8193 + 4096]  # the same part again
        # A second small read in a part brings the part into the cache, after the read's own small GET.
        wait_for(lambda: m.stats()["cache"]["bytes_fetched"] == MIB, 30, "the part read twice")
        s3.put_object(Bucket=bucket, Key="v.bin", Body=new)  # overwritten behind the mount
        with pytest.raises(OSError) as exc:
            os.pread(fd, 4096, 0)  # an uncached part of the old version: never mixed with the new one
        assert exc.value.errno == errno.ESTALE
        assert os.pread(fd, 8192, MIB) == old[MIB : MIB + 8192]  # the cached part is still served
    finally:
        os.close(fd)
    assert m.stats()["cache"]["bytes_fetched"] == MIB


def test_junk_metadata_values_fall_back_to_defaults(moto: MotoEndpoint, s3: Any, bucket: str, mounter: Any) -> None:
    junk = {"file-permissions": "rwxr-xr-x", "file-owner": "-1", "file-group": "99999999999", "file-mtime": "soon"}
    s3.put_object(Bucket=bucket, Key="junk.txt", Body=b"j", Metadata=junk)
    key = moto.backend.get_object(bucket, "junk.txt")
    key.set_metadata({"x-amz-meta-file-owner": "\u00b2"})  # a digit to str.isdigit(), not to int()
    s3.put_object(Bucket=bucket, Key="ok.txt", Body=b"ok", Metadata=meta("0100600", 5, 6))
    m = mounter(f"s3://{bucket}")
    st = os.stat(m.path / "junk.txt")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
    assert (os.stat(m.path / "ok.txt").st_uid, (m.path / "ok.txt").read_bytes()) == (5, b"ok")


def test_umount_refuses_other_mounts(tmp_path: Path, home: Path) -> None:
    res = subprocess.run([LUSTREFS, "umount", "/proc"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "not a lustrefs mount" in res.stderr
    assert os.path.ismount("/proc")
