"""Test helpers: the S3 endpoint on 127.0.0.1 (moto's threaded server), file systems, FUSE mounts, waiting."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Tests never see real credentials or a real endpoint.
for var in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
    os.environ.pop(var, None)
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_CONFIG_FILE="/dev/null",
    AWS_SHARED_CREDENTIALS_FILE="/dev/null",
)

import pytest  # noqa: E402
from moto import mock_aws  # noqa: E402
from moto.core import DEFAULT_ACCOUNT_ID  # noqa: E402
from moto.s3.models import s3_backends  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from lustrefs import records, s3client  # noqa: E402
from lustrefs.client import cli, control_client  # noqa: E402

LUSTREFS = str(Path(sys.executable).parent / "lustrefs")


def fuse_available() -> str | None:
    """Why FUSE mounts cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoEndpoint:
    """moto's server in this process, on 127.0.0.1; its state is shared with ``backend`` for fast set-up."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def backend(self) -> Any:
        return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]

    def client(self) -> Any:
        return s3client.make_client(self.url, max_attempts=1)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run the ``lustrefs`` CLI in this process; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def create_fs(moto: MotoEndpoint, import_path: str, chunk_mib: int = 1, capacity: int = 1200, **extra: str) -> str:
    conf = f"ImportPath={import_path},ImportedFileChunkSize={chunk_mib}"
    conf += "".join(f",{k}={v}" for k, v in extra.items())
    rc, out, err = run_cli(
        "--endpoint-url", moto.url, "create-file-system", "--file-system-type", "LUSTRE",
        "--storage-capacity", str(capacity), "--lustre-configuration", conf,
    )  # fmt: skip
    assert rc == 0, err
    return json.loads(out)["FileSystem"]["FileSystemId"]


@dataclass
class Mounted:
    """A lustrefs mount made by a test, through the real ``lustrefs mount`` command."""

    fs_id: str
    path: Path
    pid: int

    @property
    def state_dir(self) -> Path:
        return records.home_dir() / self.fs_id

    def stats(self) -> dict[str, Any]:
        return control_client.request(str(self.path), "stats")

    def events(self) -> list[dict[str, Any]]:
        path = self.state_dir / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def unmount(self) -> None:
        """Unmount with ``lustrefs umount`` and check that the daemon exited."""
        res = subprocess.run([LUSTREFS, "umount", str(self.path)], capture_output=True, text=True, timeout=150)
        assert res.returncode == 0, res.stderr
        assert not os.path.ismount(self.path)
        assert not records.process_alive(self.pid)

    def cleanup(self) -> None:
        """Best-effort teardown: unmount (lazily if busy) and stop the daemon by its PID."""
        if os.path.ismount(self.path):
            res = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True, timeout=30)
            if res.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True, timeout=30)
        deadline = time.monotonic() + 30
        while records.process_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if records.process_alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)


def mount_fs(fs_id: str, path: Path, options: str = "") -> tuple[subprocess.CompletedProcess[str], Mounted | None]:
    """Run ``lustrefs mount``; returns the finished command and, if it mounted, the mount."""
    path.mkdir(parents=True, exist_ok=True)
    argv = [LUSTREFS, "mount", fs_id, str(path)] + (["-o", options] if options else [])
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    state = records.mount_state(fs_id)
    return res, (Mounted(fs_id, path, int(state["pid"])) if res.returncode == 0 and state else None)


@contextlib.contextmanager
def in_process_moto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto in this process (no endpoint), an isolated LUSTREFS_HOME and no AWS configuration from outside."""
    monkeypatch.setenv("LUSTREFS_HOME", str(tmp_path / "home"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REGION", "AWS_ACCOUNT_ID"):
        monkeypatch.delenv(name, raising=False)
    with mock_aws():
        yield s3client.make_client()
