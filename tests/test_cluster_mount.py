"""The cluster engine through real mounts: two hosts (their own LUSTREFS_HOME, daemon and cache) mounting one file
system of one PostgreSQL database, on moto's server."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import MotoEndpoint, Mounted, create_fs, mount_fs, wait_for

pytestmark = pytest.mark.fuse


def test_two_hosts_share_one_file_system(
    moto: MotoEndpoint, s3: Any, bucket: str, tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put_object(Bucket=bucket, Key="in/s3.txt", Body=b"from s3")
    monkeypatch.setenv("LUSTREFS_METADATA_ENGINE", "postgresql")
    monkeypatch.setenv("LUSTREFS_DATABASE", pg_database)
    homes = [tmp_path / "host-a", tmp_path / "host-b"]
    mounts: list[Mounted] = []

    def on(i: int) -> None:  # the commands that follow run as host i
        monkeypatch.setenv("LUSTREFS_HOME", str(homes[i]))

    try:
        on(0)
        fs_id = create_fs(moto, f"s3://{bucket}", ExportPath=f"s3://{bucket}")
        for i in (0, 1):
            on(i)  # the file system created on host A is known to host B through the database
            res, m = mount_fs(fs_id, tmp_path / f"mnt{i}", "export_delay=0.5")
            assert m is not None, res.stderr
            mounts.append(m)
        a, b = (m.path for m in mounts)
        assert (b / "in/s3.txt").read_bytes() == b"from s3"
        # Close-to-open: what A closed, B reads at once (no export yet: the delay has not passed).
        os.makedirs(a / "results")
        (a / "results/r1").write_bytes(b"first result")
        assert (b / "results/r1").read_bytes() == b"first result"
        assert os.stat(b / "results/r1").st_size == 12
        assert sorted(os.listdir(b / "results")) == ["r1"]
        # A rewrite on B, read on A (A's kernel had the old pages and size).
        (b / "results/r1").write_bytes(b"rewritten on B, longer")
        assert (a / "results/r1").read_bytes() == b"rewritten on B, longer"
        # A name created on A is found by B's next lookup, even right after B looked it up in vain.
        for i in range(20):
            assert not (b / f"results/new{i}").exists()
            (a / f"results/new{i}").write_bytes(b"")
            assert (b / f"results/new{i}").exists()
        # O_EXCL across hosts.
        with pytest.raises(FileExistsError):
            os.open(b / "results/r1", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        # Renames and unlinks on one host reach the other's kernel caches (bounded wait, measured).
        started = time.monotonic()
        os.rename(a / "results/r1", a / "results/r2")
        wait_for(lambda: not (b / "results/r1").exists() and (b / "results/r2").exists(), 5, "the rename on B")
        assert time.monotonic() - started < 5
        # The leader exports everything, whoever wrote it; staging objects are gone after.
        wait_for(
            lambda: {"results/r2"} <= {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])},
            30,
            "the export",
        )
        assert s3.get_object(Bucket=bucket, Key="results/r2")["Body"].read() == b"rewritten on B, longer"

        def staged() -> list[str]:
            listing = s3.list_objects_v2(Bucket=bucket, Prefix=".lustrefs-staging/").get("Contents", [])
            return [o["Key"] for o in listing]

        wait_for(lambda: not staged(), 30, "the staging objects deleted")
        assert ".lustrefs-staging" not in os.listdir(a)
        for i, m in reversed(list(enumerate(mounts))):
            on(i)
            m.unmount()
    finally:
        for i, m in enumerate(mounts):
            on(i)
            m.cleanup()
