"""FIFOs, sockets and device nodes through a real mount: created, stat-ed, used, exported, kept across a remount,
imported by a new file system; directory link counts; hard links."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import MotoEndpoint, create_fs, mount_fs, wait_for

pytestmark = pytest.mark.fuse


def test_special_files_through_a_mount(moto: MotoEndpoint, s3: Any, bucket: str, home: Path, tmp_path: Path) -> None:
    fs_id = create_fs(moto, f"s3://{bucket}", ExportPath=f"s3://{bucket}")  # exports to the imported keys
    res, m = mount_fs(fs_id, tmp_path / "mnt", "export_delay=0.2")
    assert m is not None, res.stderr
    try:
        root = m.path
        os.mkfifo(root / "fifo", 0o640)
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # as root: CAP_MKNOD
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(root / "sock"))
        assert stat.S_ISFIFO(os.stat(root / "fifo").st_mode)
        assert stat.S_ISSOCK(os.stat(root / "sock").st_mode)
        st = os.stat(root / "null")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
        with open(root / "null", "rb") as f:  # the kernel serves the device, not lustrefs
            assert f.read(10) == b""
        fd = os.open(root / "fifo", os.O_RDWR | os.O_NONBLOCK)  # a pipe on the mount
        try:
            os.write(fd, b"through the fifo")
            assert os.read(fd, 100) == b"through the fifo"
        finally:
            os.close(fd)
        os.makedirs(root / "d/a")
        os.mkdir(root / "d/b")
        assert os.stat(root / "d").st_nlink == 4
        os.rmdir(root / "d/b")
        assert os.stat(root / "d").st_nlink == 3

        def exported() -> bool:
            names = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
            return {"fifo", "null", "sock"} <= names

        wait_for(exported, 30, "the special files in S3")
        meta = s3.head_object(Bucket=bucket, Key="null")["Metadata"]
        assert meta["file-permissions"] == "020644" and meta["file-rdev"] == "1,3"  # 0666 less the umask
        assert s3.head_object(Bucket=bucket, Key="fifo")["Metadata"]["file-permissions"] == "010640"
        m.unmount()
        res, m = mount_fs(fs_id, tmp_path / "mnt", "")
        assert m is not None, res.stderr
        assert stat.S_ISFIFO(os.stat(m.path / "fifo").st_mode) and stat.S_ISSOCK(os.stat(m.path / "sock").st_mode)
        assert os.stat(m.path / "null").st_rdev == os.makedev(1, 3)
    finally:
        m.cleanup()
    other = create_fs(moto, f"s3://{bucket}")  # a new file system on the bucket recreates them
    res, m2 = mount_fs(other, tmp_path / "mnt2", "")
    assert m2 is not None, res.stderr
    try:
        assert stat.S_ISFIFO(os.stat(m2.path / "fifo").st_mode)
        assert os.stat(m2.path / "null").st_rdev == os.makedev(1, 3)
    finally:
        m2.cleanup()
    res, m3 = mount_fs(create_fs(moto, f"s3://{bucket}"), tmp_path / "mnt3", "nodev")
    assert m3 is not None, res.stderr
    try:
        assert stat.S_ISREG(os.stat(m3.path / "null").st_mode)  # nodev: no device comes from S3
    finally:
        m3.cleanup()


def test_hard_links_through_a_mount(moto: MotoEndpoint, s3: Any, bucket: str, home: Path, tmp_path: Path) -> None:
    fs_id = create_fs(moto, f"s3://{bucket}", ExportPath=f"s3://{bucket}")
    res, m = mount_fs(fs_id, tmp_path / "mnt", "export_delay=0.2")
    assert m is not None, res.stderr
    try:
        root = m.path
        os.mkdir(root / "d")
        (root / "a").write_bytes(b"linked")
        os.link(root / "a", root / "d/b")
        os.link(root / "a", root / "c")
        st = os.stat(root / "d/b")
        assert st.st_ino == os.stat(root / "a").st_ino and st.st_nlink == 3
        with open(root / "c", "ab") as f:  # a change through one name is seen through the others
            f.write(b" thrice")
        assert (root / "d/b").read_bytes() == b"linked thrice"
        os.rename(root / "a", root / "c")  # onto another name of the same inode: nothing happens
        assert (root / "a").exists() and os.stat(root / "c").st_nlink == 3
        os.unlink(root / "a")
        assert os.stat(root / "c").st_nlink == 2
        os.rename(root / "c", root / "d/e")
        assert os.stat(root / "d/b").st_nlink == 2
        assert subprocess.run(["cp", "-al", str(root / "d"), str(root / "copy")], check=False).returncode == 0
        assert os.stat(root / "copy/e").st_ino == st.st_ino and os.stat(root / "d/e").st_nlink == 4

        def exported() -> bool:
            names = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
            return names == {"d/", "d/b", "d/e", "copy/", "copy/b", "copy/e"}

        wait_for(exported, 30, "one object per name")
        for key in ("d/b", "d/e", "copy/b", "copy/e"):
            assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"linked thrice"
        m.unmount()
        res, m = mount_fs(fs_id, tmp_path / "mnt", "")
        assert m is not None, res.stderr
        assert os.stat(m.path / "copy/b").st_ino == os.stat(m.path / "d/e").st_ino
        assert os.stat(m.path / "d/b").st_nlink == 4
    finally:
        m.cleanup()
    other = create_fs(moto, f"s3://{bucket}")  # a new file system imports each name as a file of its own
    res, m2 = mount_fs(other, tmp_path / "mnt2", "")
    assert m2 is not None, res.stderr
    try:
        assert os.stat(m2.path / "d/b").st_ino != os.stat(m2.path / "d/e").st_ino
        assert os.stat(m2.path / "d/b").st_nlink == 1 and (m2.path / "copy/e").read_bytes() == b"linked thrice"
    finally:
        m2.cleanup()
