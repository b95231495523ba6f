"""Boot integration: the systemd unit, sd_notify readiness (READY=1 / STOPPING=1) and the mount(8) helper."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import LUSTREFS, MotoEndpoint, Mounted, create_fs, wait_for

from lustrefs import options, records
from lustrefs.client import cli
from lustrefs.daemon import sdnotify

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "lustrefs@.service"
ENV_EXAMPLE = ROOT / "systemd" / "lustrefs.env.example"
INSTALLED = "/usr/local/bin/lustrefs"  # where `make install` links the command
FS_ID = "fs-0123456789abcdef0"


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound unix datagram socket (a short path: sun_path is 108 bytes) and its address."""
    folder = tempfile.mkdtemp(prefix="lustrefs-notify-")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    yield sock, path
    sock.close()
    shutil.rmtree(folder, ignore_errors=True)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    text = UNIT.read_text()
    if not os.access(INSTALLED, os.X_OK):  # verify checks that ExecStart's binary exists
        text = text.replace(INSTALLED, LUSTREFS)
    (tmp_path / UNIT.name).write_text(text)
    res = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / f"lustrefs@{FS_ID}.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (res.returncode, res.stderr) == (0, "")  # warnings (a misspelt value) go to stderr with status 0


def test_unit_runs_the_daemon_in_the_foreground_as_a_notify_service() -> None:
    directives = [line.strip() for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")]
    for expected in (
        "Type=notify",
        "EnvironmentFile=/etc/lustrefs/%i.env",
        f"ExecStart={INSTALLED} mount %i ${{MOUNTPOINT}} -o ${{OPTIONS}} --foreground",
        "TimeoutStopSec=10min",
        "Restart=on-failure",
        "After=network-online.target",
        "Wants=network-online.target",
    ):
        assert expected in directives


def test_env_example_options_are_accepted() -> None:
    env = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and line[0] != "#")
    assert env["MOUNTPOINT"].startswith("/")
    assert options.parse_options(cli.filter_mount_options(env["OPTIONS"])).allow_other


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"lustrefs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert sock.recv(4096) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sdnotify.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert not sdnotify.notify("READY=1")  # never raises


@pytest.mark.fuse
def test_foreground_mount_notifies_systemd_and_stops_cleanly_on_sigterm(
    moto: MotoEndpoint, s3: Any, bucket: str, home: Path, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, address = notify_socket
    fs_id = create_fs(moto, f"s3://{bucket}", ExportPath=f"s3://{bucket}/exp")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [LUSTREFS, "mount", fs_id, str(mnt), "-o", "defaults,export_delay=3600", "--foreground"],
        env={**os.environ, "NOTIFY_SOCKET": address},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert sock.recv(4096) == b"READY=1"
        assert os.path.ismount(mnt) and os.listdir(mnt) == []  # the mount answers once READY=1 is sent
        (mnt / "dirty.txt").write_bytes(b"exported at stop")
        proc.send_signal(signal.SIGTERM)  # what `systemctl stop` sends
        assert sock.recv(4096) == b"STOPPING=1"
        assert proc.wait(timeout=120) == 0
        assert not os.path.ismount(mnt)
        assert s3.get_object(Bucket=bucket, Key="exp/dirty.txt")["Body"].read() == b"exported at stop"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)


@pytest.mark.fuse
def test_fstab_line_mounts_through_the_helper(moto: MotoEndpoint, s3: Any, bucket: str, home: Path) -> None:
    s3.put_object(Bucket=bucket, Key="hello.txt", Body=b"hello")
    fs_id = create_fs(moto, f"s3://{bucket}")
    top = Path(tempfile.mkdtemp(prefix="lustrefs-fstab-"))
    fstab_line = f"{fs_id} {top}/fsx lustrefs defaults,_netdev,nofail,noatime,x-systemd.automount 0 0"
    spec, mountpoint, fstype, opts, *_ = fstab_line.split()
    assert fstype == "lustrefs"
    Path(mountpoint).mkdir()
    helper = str(Path(LUSTREFS).with_name("mount.lustrefs"))
    try:
        # mount(8) runs /sbin/mount.lustrefs SPEC DIR -o OPTS; the helper returns once the mount answers.
        res = subprocess.run([helper, spec, mountpoint, "-o", opts], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert (Path(mountpoint) / "hello.txt").read_bytes() == b"hello"
        res = subprocess.run([LUSTREFS, "umount", mountpoint], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: not os.path.ismount(mountpoint), 30, "the unmount")
    finally:
        state = records.mount_state(fs_id)
        if state is not None:
            Mounted(fs_id, Path(mountpoint), int(state["pid"])).cleanup()
        shutil.rmtree(top, ignore_errors=True)
