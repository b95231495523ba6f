"""``make demo-cluster`` (lustrefs.demo.cluster) run to the end with ``--no-wait``: two hosts mount one file system
over a private PostgreSQL and moto, agree on a write and a rename, and everything started is stopped after."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lustrefs import records

pytestmark = pytest.mark.fuse

DEMO_TIMEOUT = 240.0  # the run takes about 30 s


def test_demo_cluster_runs_to_the_end_and_cleans_up(tmp_path: Path) -> None:
    mnt_a, mnt_b = tmp_path / "mnt-a", tmp_path / "mnt-b"
    env = {k: v for k, v in os.environ.items() if k not in ("LUSTREFS_HOME", "LUSTREFS_METADATA_ENGINE")}
    res = subprocess.run(
        [sys.executable, "-m", "lustrefs.demo.cluster", "--mountpoints", str(mnt_a), str(mnt_b), "--no-wait"],
        capture_output=True, text=True, timeout=DEMO_TIMEOUT, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    out = res.stdout
    assert res.returncode == 0, out[-4000:] + res.stderr[-2000:]
    # The walk-through: B knows the file system, reads A's write, A sees B's rename, the leader exports it.
    assert "describe-file-systems" in out and '"Lifecycle": "AVAILABLE"' in out
    assert re.search(r"^written on host A at \d\d:\d\d:\d\d$", out, re.MULTILINE)
    assert "host B found the name" in out and "read the new bytes" in out
    assert "host A saw the rename" in out
    assert "host A leads" in out
    assert re.search(r"s3://lustrefs-demo/\S*data/renamed-on-b\.txt: 'written on host A at", out)
    assert out.rstrip().endswith("done.")
    # Clean-up: both hosts unmounted with lustrefs umount, the mount points it made removed, the servers stopped
    # (by PID), the state directory deleted.
    assert out.count("lustrefs.client.cli umount") == 2
    assert not mnt_a.exists() and not mnt_b.exists()
    pids = [int(p) for p in re.findall(r"^stopped (?:PostgreSQL|the local S3 endpoint) \(pid (\d+)\)", out, re.M)]
    assert len(pids) == 2
    assert not any(records.process_alive(pid) for pid in pids)
    work = Path(re.findall(r"command output in (\S+)/host-a/mount\.log", out)[0])
    assert not work.exists()
