"""Writes and export through a real FUSE mount against moto's server on 127.0.0.1."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from helpers import MotoEndpoint, create_fs, mount_fs, wait_for

pytestmark = pytest.mark.fuse
MIB = 1024 * 1024
FAST = "export_delay=0.2"


def head(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        return s3.head_object(Bucket=bucket, Key=key)
    except s3.exceptions.ClientError:
        return None


def body(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def keys(s3: Any, bucket: str, prefix: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_new_files_are_exported_with_posix_metadata(s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key="in/seed.txt", Body=b"seed")
    m = mounter(f"s3://{bucket}/in", options=FAST, ExportPath=f"s3://{bucket}/out")
    d = m.path / "in"
    (d / "sub").mkdir(mode=0o750)
    f = d / "sub/hello.txt"
    f.write_bytes(b"hello world\n")
    os.chmod(f, 0o640)
    os.chown(f, 1000, 2000)
    os.utime(f, ns=(1_500_000_000_111_222_333, 1_600_000_000_444_555_666))
    os.symlink("sub/hello.txt", d / "link")

    h = wait_for(lambda: head(s3, bucket, "out/in/sub/hello.txt"), 20, "the exported file")
    wait_for(lambda: head(s3, bucket, "out/in/sub/hello.txt")["Metadata"].get("file-owner") == "1000", 20, "chown")
    h = head(s3, bucket, "out/in/sub/hello.txt")
    assert body(s3, bucket, "out/in/sub/hello.txt") == b"hello world\n"
    md = h["Metadata"]
    st = os.stat(f)
    assert md["file-permissions"] == "0100640" == f"0{st.st_mode:o}"
    assert (md["file-owner"], md["file-group"]) == ("1000", "2000")
    wait_for(lambda: head(s3, bucket, "out/in/sub/hello.txt")["Metadata"]["file-mtime"] == "1600000000444555666ns")
    md = head(s3, bucket, "out/in/sub/hello.txt")["Metadata"]
    assert md["file-atime"] == "1500000000111222333ns" and md["user-agent"] == "lustrefs"
    assert "ServerSideEncryption" not in h or h["ServerSideEncryption"] == "AES256"  # the bucket's default only
    dir_obj = wait_for(lambda: head(s3, bucket, "out/in/sub/"), 20, "the directory object")
    assert dir_obj["ContentLength"] == 0 and dir_obj["Metadata"]["file-permissions"] == "040750"
    link = wait_for(lambda: head(s3, bucket, "out/in/link"), 20, "the symlink object")
    assert body(s3, bucket, "out/in/link") == b"sub/hello.txt"
    assert stat.S_ISLNK(int(link["Metadata"]["file-permissions"], 8))
    # The import prefix is left alone; the unchanged imported file is not exported.
    assert keys(s3, bucket, "in/") == {"in/seed.txt"}
    assert "out/in/seed.txt" not in keys(s3, bucket, "out/")


def test_round_trip_through_a_new_file_system(
    moto: MotoEndpoint, s3: Any, bucket: str, mounter: Any, tmp_path: Path
) -> None:
    m = mounter(f"s3://{bucket}/src", options=FAST, ExportPath=f"s3://{bucket}/exp")
    root = m.path / "src"
    root.mkdir()
    files = {"a.txt": b"alpha", "d1/b.bin": random.Random(1).randbytes(3 * MIB + 5), "d1/d2/c": b""}
    for i, (rel, data) in enumerate(files.items()):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, 0o600 + i)
        os.chown(p, 1000 + i, 3000 + i)
        os.utime(p, ns=(1_400_000_000_000_000_000 + i, 1_700_000_000_000_000_000 + i))
    wait_for(lambda: keys(s3, bucket, "exp/").issuperset({f"exp/src/{r}" for r in files}), 30, "the export")
    wait_for(lambda: all(head(s3, bucket, f"exp/src/{r}")["Metadata"]["file-mtime"].startswith("17") for r in files))
    m.unmount()

    back = mounter(f"s3://{bucket}/exp")
    for i, (rel, data) in enumerate(files.items()):
        st = os.stat(back.path / "exp/src" / rel)
        assert (back.path / "exp/src" / rel).read_bytes() == data
        assert stat.S_IMODE(st.st_mode) == 0o600 + i and (st.st_uid, st.st_gid) == (1000 + i, 3000 + i)
        assert st.st_mtime_ns == 1_700_000_000_000_000_000 + i
    assert stat.S_ISDIR(os.stat(back.path / "exp/src/d1/d2").st_mode)


def test_write_into_a_large_imported_file_fetches_only_what_it_needs(s3: Any, bucket: str, mounter: Any) -> None:
    data = bytearray(random.Random(2).randbytes(64 * MIB))
    s3.put_object(Bucket=bucket, Key="big.bin", Body=bytes(data))
    m = mounter(f"s3://{bucket}", options="export_delay=3600")
    with open(m.path / "big.bin", "r+b") as f:
        f.seek(30 * MIB + 100)
        f.write(b"X" * 4096)
    data[30 * MIB + 100 : 30 * MIB + 100 + 4096] = b"X" * 4096
    stats = m.stats()
    assert stats["cache"]["bytes_fetched"] == MIB  # one part copied before the write, not the object
    assert stats["requests"]["GET"] == 1
    with open(m.path / "big.bin", "rb") as f:
        f.seek(30 * MIB)
        assert f.read(MIB) == data[30 * MIB : 31 * MIB]
    assert os.stat(m.path / "big.bin").st_size == 64 * MIB


def test_export_of_a_modified_large_file_replaces_the_object(s3: Any, bucket: str, mounter: Any) -> None:
    data = bytearray(random.Random(3).randbytes(20 * MIB + 3))
    s3.put_object(Bucket=bucket, Key="d/big.bin", Body=bytes(data))
    m = mounter(f"s3://{bucket}/d", options=FAST, ExportPath=f"s3://{bucket}/d")  # the import prefix itself
    old_etag = head(s3, bucket, "d/big.bin")["ETag"]
    with open(m.path / "d/big.bin", "r+b") as f:
        f.seek(9 * MIB)
        f.write(b"changed")
        f.truncate(15 * MIB)
    del data[15 * MIB :]
    data[9 * MIB : 9 * MIB + 7] = b"changed"
    wait_for(lambda: head(s3, bucket, "d/big.bin")["ETag"] != old_etag, 60, "the multipart export")
    assert hashlib.sha256(body(s3, bucket, "d/big.bin")).digest() == hashlib.sha256(data).digest()
    assert keys(s3, bucket, "d/") == {"d/big.bin"}


def test_rename_and_delete_are_exported(s3: Any, bucket: str, mounter: Any) -> None:
    for i in range(200):
        s3.put_object(Bucket=bucket, Key=f"p/tree/f{i:03d}", Body=b"%d" % i)
    s3.put_object(Bucket=bucket, Key="p/gone.txt", Body=b"bye")
    m = mounter(f"s3://{bucket}/p", options=FAST, ExportPath=f"s3://{bucket}/p")
    os.rename(m.path / "p/tree", m.path / "p/moved")
    os.unlink(m.path / "p/gone.txt")
    expected = {f"p/moved/f{i:03d}" for i in range(200)} | {"p/moved/"}
    wait_for(lambda: keys(s3, bucket, "p/") == expected, 60, "the moved tree")
    assert body(s3, bucket, "p/moved/f123") == b"123"
    assert head(s3, bucket, "p/moved/f007")["Metadata"]["file-permissions"] == "0100755"
    requests = m.stats()["requests"]
    assert requests["COPY"] == 200 and requests["GET"] == 0  # moved server-side, never downloaded
    assert sorted(os.listdir(m.path / "p/moved"))[:2] == ["f000", "f001"]
    assert not (m.path / "p/tree").exists()


def test_fsynced_data_survives_kill_9(moto: MotoEndpoint, s3: Any, bucket: str, home: Path, tmp_path: Path) -> None:
    fs_id = create_fs(moto, f"s3://{bucket}", ExportPath=f"s3://{bucket}/exp")
    res, m = mount_fs(fs_id, tmp_path / "mnt", "export_delay=3600")
    assert m is not None, res.stderr
    payload = random.Random(4).randbytes(3 * MIB)
    fd = os.open(m.path / "precious.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    assert os.write(fd, payload) == len(payload)
    os.fsync(fd)
    os.kill(m.pid, signal.SIGKILL)
    with pytest.raises(OSError):
        os.close(fd)  # the daemon is gone
    wait_for(lambda: not Path(f"/proc/{m.pid}").exists() or "Z" in Path(f"/proc/{m.pid}/stat").read_text().split()[2])
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=True, timeout=30)
    assert head(s3, bucket, "exp/precious.bin") is None
    res, m = mount_fs(fs_id, tmp_path / "mnt", FAST)
    assert m is not None, res.stderr
    try:
        assert (m.path / "precious.bin").read_bytes() == payload
        wait_for(lambda: head(s3, bucket, "exp/precious.bin"), 30, "the export after restart")
        assert body(s3, bucket, "exp/precious.bin") == payload
    finally:
        m.cleanup()


def test_export_survives_an_endpoint_outage(moto: MotoEndpoint, s3: Any, bucket: str, mounter: Any) -> None:
    m = mounter(f"s3://{bucket}", options=FAST, ExportPath=f"s3://{bucket}/exp")
    assert os.listdir(m.path) == []  # a directory must be loaded from S3 before it can change
    moto.stop()
    try:
        (m.path / "during-outage.txt").write_bytes(b"kept")
        wait_for(lambda: any(e["code"] == "S3ExportFailed" for e in m.events()), 30, "a failed export")
        assert (m.path / "during-outage.txt").read_bytes() == b"kept"
    finally:
        moto.start()
    wait_for(lambda: head(s3, bucket, "exp/during-outage.txt"), 60, "the export after the outage")
    assert body(s3, bucket, "exp/during-outage.txt") == b"kept"


def test_cache_full_of_dirty_data_gives_enospc(s3: Any, bucket: str, mounter: Any) -> None:
    m = mounter(f"s3://{bucket}", options=f"cache_size={4 / 1024},export_delay=3600")
    chunk = b"z" * MIB
    with pytest.raises(OSError) as exc, open(m.path / "fill.bin", "wb") as f:
        for _ in range(8):
            f.write(chunk)
            f.flush()
    assert exc.value.errno == errno.ENOSPC
    size = os.stat(m.path / "fill.bin").st_size
    assert 3 * MIB <= size <= 4 * MIB
    with open(m.path / "fill.bin", "rb") as f:
        assert f.read() == b"z" * size  # what was acknowledged is intact


def test_unmount_exports_dirty_data(s3: Any, bucket: str, mounter: Any) -> None:
    m = mounter(f"s3://{bucket}", options="export_delay=3600", ExportPath=f"s3://{bucket}/exp")
    (m.path / "late.txt").write_bytes(b"exported at unmount")
    assert head(s3, bucket, "exp/late.txt") is None
    m.unmount()
    assert body(s3, bucket, "exp/late.txt") == b"exported at unmount"


def test_permissions_are_checked_for_other_users(moto: MotoEndpoint, bucket: str, home: Path) -> None:
    fs_id = create_fs(moto, f"s3://{bucket}")
    top = Path(tempfile.mkdtemp(prefix="lustrefs-perm-"))  # reachable by other users, unlike tmp_path
    os.chmod(top, 0o755)
    res, m = mount_fs(fs_id, top / "mnt", "allow_other")
    assert m is not None, res.stderr
    try:
        check_permissions(m.path)
    finally:
        m.cleanup()
        shutil.rmtree(top, ignore_errors=True)


def check_permissions(mnt: Path) -> None:
    os.chmod(mnt, 0o755)
    secret, public = mnt / "secret", mnt / "public"
    secret.write_bytes(b"s")
    public.write_bytes(b"p")
    os.chown(secret, 1000, 1000)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)

    def cat_as(uid: int, path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["cat", str(path)], user=uid, group=uid, capture_output=True, text=True, timeout=30)

    assert cat_as(2000, public).stdout == "p"
    denied = cat_as(2000, secret)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert cat_as(1000, secret).stdout == "s"
    touch = subprocess.run(["touch", str(mnt / "new")], user=2000, capture_output=True, text=True, timeout=30)
    assert touch.returncode != 0 and "Permission denied" in touch.stderr


def test_unsupported_operations_fail_clearly(s3: Any, bucket: str, mounter: Any) -> None:
    m = mounter(f"s3://{bucket}")
    (m.path / "d").mkdir()
    with pytest.raises(OSError) as exc:
        os.link(m.path / "d", m.path / "hard")  # hard links to directories
    assert exc.value.errno == errno.EPERM
    (m.path / "d/x").write_bytes(b"")
    with pytest.raises(OSError) as exc:
        os.rmdir(m.path / "d")
    assert exc.value.errno == errno.ENOTEMPTY
    sv = os.statvfs(m.path)
    assert sv.f_blocks * sv.f_frsize == 1200 * 1024**3  # total = the cache capacity (StorageCapacity)


def test_auto_export_policy_limits_what_is_exported(s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key="e/old.txt", Body=b"old")
    policy = "{Events=[NEW]}"  # the AWS CLI shorthand
    m = mounter(f"s3://{bucket}/e", options=FAST, ExportPath=f"s3://{bucket}/e", AutoExportPolicy=policy)
    (m.path / "e/new.txt").write_bytes(b"new")
    (m.path / "e/old.txt").write_bytes(b"changed locally")  # CHANGED: not exported under this policy
    wait_for(lambda: head(s3, bucket, "e/new.txt"), 20, "the NEW export")
    wait_for(lambda: any(e["code"] == "ExportSkippedByPolicy" for e in m.events()), 20, "the skip")
    assert body(s3, bucket, "e/old.txt") == b"old"
    assert (m.path / "e/old.txt").read_bytes() == b"changed locally"  # kept, still dirty, never dropped


def test_exports_follow_the_bucket_encryption_or_a_kms_key(s3: Any, bucket: str, mounter: Any) -> None:
    rule = {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [rule]})
    plain = mounter(f"s3://{bucket}/a", options=FAST, ExportPath=f"s3://{bucket}/a")
    (plain.path / "a").mkdir()
    (plain.path / "a/default.txt").write_bytes(b"d")
    h = wait_for(lambda: head(s3, bucket, "a/default.txt"), 20, "the export")
    assert h["ServerSideEncryption"] == "AES256"  # the bucket's default: lustrefs sends no SSE header
    kms = mounter(f"s3://{bucket}/k", options=f"{FAST},sse_kms_key_id=alias/lustrefs-test", ExportPath=f"s3://{bucket}/k")
    (kms.path / "k").mkdir()
    (kms.path / "k/kms.txt").write_bytes(b"k")
    h = wait_for(lambda: head(s3, bucket, "k/kms.txt"), 20, "the KMS export")
    assert h["ServerSideEncryption"] == "aws:kms" and h["SSEKMSKeyId"].endswith("alias/lustrefs-test")


def test_reads_after_an_export_see_the_written_data(s3: Any, bucket: str, mounter: Any) -> None:
    data = bytearray(random.Random(7).randbytes(2 * MIB))
    s3.put_object(Bucket=bucket, Key="r/f.bin", Body=bytes(data))
    m = mounter(f"s3://{bucket}/r", options=FAST, ExportPath=f"s3://{bucket}/r")
    assert (m.path / "r/f.bin").read_bytes() == data  # clean parts cached first
    old_etag = head(s3, bucket, "r/f.bin")["ETag"]
    with open(m.path / "r/f.bin", "r+b") as f:
        f.seek(10)
        f.write(b"NEW DATA")
    data[10:18] = b"NEW DATA"
    wait_for(lambda: head(s3, bucket, "r/f.bin")["ETag"] != old_etag, 30, "the export")
    wait_for(lambda: m.stats()["export_queue"] == 0, 30, "the export to be recorded")
    with open(m.path / "r/f.bin", "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # read from the cache, not the page cache
        assert f.read() == data
    assert body(s3, bucket, "r/f.bin") == data
