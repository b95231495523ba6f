"""Shared fixtures: an S3 endpoint on 127.0.0.1 (moto's threaded server), file systems, and FUSE mounts."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import MotoEndpoint, Mounted, create_fs, fuse_available, mount_fs, wait_for

from lustrefs import records
from lustrefs.demo.localpg import PostgresNotInstalled, PostgresServer

logging.getLogger("werkzeug").setLevel(logging.WARNING)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_fuse = fuse_available()
    for item in items:
        if no_fuse and "fuse" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=no_fuse))
        if "slow" in item.keywords and not os.environ.get("LUSTREFS_SLOW"):
            item.add_marker(pytest.mark.skip(reason="slow stress case: set LUSTREFS_SLOW=1"))


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoEndpoint]:
    endpoint = MotoEndpoint()
    endpoint.start()
    yield endpoint
    endpoint.stop()


@pytest.fixture
def s3(moto: MotoEndpoint) -> Any:
    return moto.client()


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("LUSTREFS_HOME", str(path))
    return path


@pytest.fixture
def fake_daemon() -> Iterator[Callable[[str, str], int]]:
    """``fake_daemon(fs_id, mountpoint)``: a live process posing as the daemon of ``fs_id`` (its mount.json)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(fs_id: str, mountpoint: str) -> int:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", fs_id])
        procs.append(proc)
        # Popen may return before the child's exec has replaced its command line (vfork).
        wait_for(lambda: fs_id.encode() in Path(f"/proc/{proc.pid}/cmdline").read_bytes(), 10, "the fake daemon")
        (records.fs_dir(fs_id) / "mount.json").write_text(json.dumps({"pid": proc.pid, "mountpoint": mountpoint}))
        return proc.pid

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def mounter(moto: MotoEndpoint, home: Path, tmp_path: Path) -> Iterator[Callable[..., Mounted]]:
    """``mounter(import_path, chunk_mib=1, options="", capacity=1200)``: create a file system and mount it."""
    made: list[Mounted] = []

    def make(import_path: str, chunk_mib: int = 1, options: str = "", capacity: int = 1200, **conf: str) -> Mounted:
        fs_id = create_fs(moto, import_path, chunk_mib, capacity, **conf)
        res, m = mount_fs(fs_id, tmp_path / f"mnt{len(made)}", options)
        assert m is not None, f"mount failed ({res.returncode}): {res.stderr}"
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the session (lustrefs/demo/localpg.py): unix socket only, thrown away at the end.
    Fails (does not skip) when PostgreSQL is not installed: `make system-deps` installs it."""
    try:
        server = PostgresServer()
    except PostgresNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture
def pg_database(postgres_server: PostgresServer) -> Iterator[str]:
    """The conninfo of a fresh database of its own for this test on ``postgres_server``; dropped afterwards."""
    if not postgres_server.running:  # a test stopped or killed the shared server
        postgres_server.start()
    name = f"test_{uuid.uuid4().hex[:16]}"
    yield postgres_server.create_database(name)
    if postgres_server.running:
        postgres_server.drop_database(name)
