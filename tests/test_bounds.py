"""Every wait on S3 has a bound: against an endpoint that accepts connections and never answers, requests fail
with EIO within ``io_timeout``, and ``lustrefs umount`` waits at most ``export_timeout`` plus a margin."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
import trio
from helpers import LUSTREFS, MotoEndpoint, create_fs, mount_fs

from lustrefs import options, records, s3client
from lustrefs.client import mount
from lustrefs.daemon import process as daemon
from lustrefs.s3.fastpath import FastPath
from lustrefs.s3.repository import Repository, Unavailable

IO_TIMEOUT = 1.5  # seconds: the bound the tests ask for
SLACK = 3.0  # seconds of scheduling slack on a loaded two-core machine


class HungEndpoint:
    """A TCP server on 127.0.0.1 in front of ``upstream`` (or of nothing). While hung, it accepts connections and
    swallows every byte sent to it: a request never gets an answer."""

    def __init__(self, upstream: int | None = None) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)  # how often the threads look at ``stopped``
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.hung = threading.Event()
        self.stopped = threading.Event()
        self.accepted = 0
        self._sockets: list[socket.socket] = [self.listener]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()
        if upstream is None:
            self.hung.set()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.settimeout(0.1)
            self._sockets.append(conn)
            up = None
            if not self.hung.is_set() and self.upstream is not None:
                up = socket.create_connection(("127.0.0.1", self.upstream))
                up.settimeout(0.1)
                self._sockets.append(up)
                self._start(up, conn)
            self._start(conn, up)

    def _start(self, src: socket.socket, dst: socket.socket | None) -> None:
        t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
        self._threads.append(t)
        t.start()

    def _pump(self, src: socket.socket, dst: socket.socket | None) -> None:
        while not self.stopped.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            if dst is None or self.hung.is_set():
                continue  # swallowed: no answer ever comes
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.stopped.set()
        for t in self._threads:
            t.join(timeout=5)
        for s in self._sockets:
            s.close()


@pytest.fixture
def hung() -> Iterator[HungEndpoint]:
    endpoint = HungEndpoint()
    yield endpoint
    endpoint.close()


def _repository(url: str, max_connections: int = 4) -> Repository:
    client = s3client.make_client(url, io_timeout=IO_TIMEOUT, max_pool_connections=max_connections)
    fast = FastPath.create(client, "bucket", boto3.session.Session().get_credentials(), max_connections)
    assert fast is not None
    return Repository(client, "bucket", max_connections, fast=fast, io_timeout=IO_TIMEOUT)


def _timed(fn: Callable[[], Any]) -> tuple[float, BaseException | None]:
    start = time.monotonic()
    try:
        fn()
    except Exception as exc:
        return time.monotonic() - start, exc
    return time.monotonic() - start, None


def test_the_io_timeout_option() -> None:
    assert options.parse_options("").io_timeout == 30.0
    opts = options.parse_options("io_timeout=2.5")
    assert opts.io_timeout == 2.5 and options.parse_options(options.to_string(opts)) == opts
    for bad in ("0", "-1", "inf", "nan", "soon"):
        with pytest.raises(options.OptionError, match="io_timeout"):
            options.parse_options(f"io_timeout={bad}")


def test_the_client_fits_its_retries_in_io_timeout(hung: HungEndpoint) -> None:
    """boto3 alone (socket timeouts and retries): a call gives up within the bound, after retrying."""
    client = s3client.make_client(hung.url, io_timeout=IO_TIMEOUT)
    elapsed, exc = _timed(lambda: client.head_object(Bucket="bucket", Key="k"))
    assert isinstance(exc, botocore.exceptions.ReadTimeoutError), exc
    assert elapsed < IO_TIMEOUT + SLACK
    assert hung.accepted >= 2  # it did retry


def test_the_fast_path_gives_up_within_its_share(hung: HungEndpoint) -> None:
    client = s3client.make_client(hung.url, io_timeout=IO_TIMEOUT)
    fast = FastPath.create(client, "bucket", boto3.session.Session().get_credentials(), 4)
    assert fast is not None
    start = time.monotonic()
    assert fast.get("k", "etag", 0, 10) is None  # no answer: boto3's turn
    assert time.monotonic() - start < IO_TIMEOUT / 2 + SLACK


@pytest.mark.parametrize("call", ["head", "get_range", "list_page", "put"])
def test_requests_fail_with_eio_within_io_timeout(hung: HungEndpoint, call: str) -> None:
    repo = _repository(hung.url)
    requests = {
        "head": lambda: repo.head("k"),
        "get_range": lambda: repo.get_range("k", "etag", 0, 1024),
        "list_page": lambda: repo.list_page("", None),
        "put": lambda: repo.put("k", b"data", {}),
    }

    async def main() -> None:
        await requests[call]()

    elapsed, exc = _timed(lambda: trio.run(main))
    assert isinstance(exc, Unavailable), exc
    assert exc.errno == errno.EIO and exc.code == "S3EndpointUnavailable"
    assert elapsed < IO_TIMEOUT + SLACK


def test_requests_waiting_for_a_connection_are_bounded_too_and_threads_end(hung: HungEndpoint) -> None:
    """Eight GETs on two connections: the six waiting for a connection fail in the same bound, and the worker
    threads left blocked on their sockets end by their socket timeouts, giving their connections back."""
    repo = _repository(hung.url, max_connections=2)
    failures: list[tuple[float, BaseException]] = []

    async def one(i: int) -> None:
        start = trio.current_time()
        try:
            await repo.get_range(f"k{i}", "etag", 0, 1024)
        except Exception as exc:
            failures.append((trio.current_time() - start, exc))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
        assert len(failures) == 8
        assert all(isinstance(e, Unavailable) and elapsed < IO_TIMEOUT + SLACK for elapsed, e in failures), failures
        with trio.fail_after(IO_TIMEOUT + SLACK):  # an abandoned thread gives its token back when it ends
            while repo.limiter.borrowed_tokens:
                await trio.sleep(0.05)

    trio.run(main)


# ----------------------------------------------------------------------------------------------- umount


@pytest.fixture
def fake_mount(home: Path, tmp_path: Path, fake_daemon: Callable[[str, str], int]) -> tuple[str, str, int]:
    """(fs id, mount point, pid) of a live process posing as the daemon of a mount with export_timeout=1."""
    fs_id = "fs-0123456789abcdef0"
    records.save_record({"FileSystemId": fs_id, "CreationTime": 0})
    mountpoint = str(tmp_path / "mnt")
    pid = fake_daemon(fs_id, mountpoint)
    state = {"pid": pid, "mountpoint": mountpoint, "export_timeout": 1.0}
    (records.fs_dir(fs_id) / "mount.json").write_text(json.dumps(state))
    return fs_id, mountpoint, pid


def _fusermount(monkeypatch: pytest.MonkeyPatch, then: Callable[[], None] = lambda: None) -> None:
    """``fusermount3 -u`` succeeds (there is no kernel mount), and ``then`` happens."""

    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert argv[:2] == ["fusermount3", "-u"]
        then()
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(mount.subprocess, "run", run)


def test_umount_waits_export_timeout_plus_the_margin(
    fake_mount: tuple[str, str, int], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, mountpoint, pid = fake_mount
    monkeypatch.setattr(mount, "UMOUNT_MARGIN", 1.0, raising=False)
    _fusermount(monkeypatch)
    start = time.monotonic()
    assert mount.umount(mountpoint) == 1
    assert 2.0 <= time.monotonic() - start < 2.0 + SLACK  # export_timeout 1 s + margin 1 s
    assert f"daemon {pid} still running" in capsys.readouterr().err


def test_umount_of_a_daemon_that_died_without_confirming_fails(
    fake_mount: tuple[str, str, int], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon crashes during its final export: no false "everything exported"."""
    _, mountpoint, pid = fake_mount
    _fusermount(monkeypatch, lambda: os.kill(pid, signal.SIGKILL))
    assert mount.umount(mountpoint) == 1
    err = capsys.readouterr().err
    assert f"daemon {pid} exited without confirming that everything was exported" in err


@pytest.mark.parametrize("left", [[], [("/dirty.txt", "S3EndpointUnavailable")]])
def test_umount_of_a_daemon_that_confirmed(
    fake_mount: tuple[str, str, int], monkeypatch: pytest.MonkeyPatch, left: list[tuple[str, str]]
) -> None:
    fs_id, mountpoint, pid = fake_mount
    home = records.fs_dir(fs_id)

    def finish() -> None:  # what the daemon does at its end, then its exit
        daemon.write_exit_status(home, pid, left)
        os.kill(pid, signal.SIGKILL)

    _fusermount(monkeypatch, finish)
    assert mount.umount(mountpoint) == (2 if left else 0)


# ----------------------------------------------------------------------------------------------- a mount


@pytest.mark.fuse
def test_a_mount_behind_a_hung_endpoint(moto: MotoEndpoint, s3: Any, bucket: str, home: Path, tmp_path: Path) -> None:
    """A cold read fails with EIO within io_timeout, and umount returns within export_timeout plus the margin,
    reporting the entry it could not export."""
    s3.put_object(Bucket=bucket, Key="cold.txt", Body=b"cold")
    proxy = HungEndpoint(upstream=moto.port)
    fs_id = create_fs(moto, f"s3://{bucket}")
    opts = f"endpoint_url={proxy.url},io_timeout=2,export_timeout=2,export_delay=3600"
    res, m = mount_fs(fs_id, tmp_path / "mnt", opts)
    assert m is not None, res.stderr
    try:
        assert os.listdir(m.path) == ["cold.txt"]
        (m.path / "dirty.txt").write_bytes(b"dirty")
        proxy.hung.set()
        elapsed, exc = _timed((m.path / "cold.txt").read_bytes)
        assert isinstance(exc, OSError) and exc.errno == errno.EIO, exc
        assert elapsed < 2 + SLACK
        start = time.monotonic()
        res = subprocess.run([LUSTREFS, "umount", str(m.path)], capture_output=True, text=True, timeout=150)
        assert time.monotonic() - start < 2 + mount.UMOUNT_MARGIN
        assert res.returncode == 2, res.stderr
        assert "/dirty.txt" in res.stderr
        assert not records.process_alive(m.pid)
    finally:
        m.cleanup()
        proxy.close()
