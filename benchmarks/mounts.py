"""The file systems under test, each mounted fresh (cold) and torn down even on failure.

lustrefs runs through its own CLI (``create-file-system`` with ``ExportPath`` = ``ImportPath``, then ``mount``;
a fresh file system per mount, deleted afterwards); s3fs and rclone run in the foreground as child processes.
Every mount is unmounted with ``fusermount3 -u`` (lazily if busy) and its process stopped by PID; every wait has
a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lustrefs.client import control_client

from .dataset import DataSet
from .endpoints import Endpoint
from .host import CaseError, OpTimeout, call_with_timeout, ensure_tool, is_mount, stop_pid, tool_version, wait_until

MOUNT_TIMEOUT = 120.0
SOURCE_DIR = "lustrefs-src"  # under the work directory: an exported revision of the lustrefs package, if any
OLD_STATS_XATTR = "user.lustrefs.stats"  # how revisions before the control file (--lustrefs-rev) gave their stats


@dataclass
class Mounted:
    """A live mount: its path, the PID of the process serving it, and (lustrefs) its counters."""

    path: Path
    pid: int
    stats: Callable[[], dict[str, Any]] | None = None


def read_stats(path: Path) -> dict[str, Any]:
    """A lustrefs mount's stats snapshot, through its control file (or the xattr of an older revision)."""
    try:
        return control_client.request(str(path), "stats")
    except control_client.NotLustrefs:
        return json.loads(os.getxattr(path, OLD_STATS_XATTR))


def unmount(path: Path, pid: int | None) -> None:
    """``fusermount3 -u`` (``-z`` if that fails), then stop the serving process by its PID."""
    if is_mount(path):
        for argv in (["fusermount3", "-u", str(path)], ["fusermount3", "-u", "-z", str(path)]):
            with contextlib.suppress(subprocess.TimeoutExpired):
                if subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0:
                    break
    if pid is not None:
        stop_pid(pid, timeout=30)


class FileSystem(ABC):
    """One file system under test (one column of the report)."""

    key: str  # command-line name, e.g. "s3fs"
    label: str  # column heading
    reads: bool = True  # whether the big-file cases run on it (metadata cases always do)

    def __init__(self, endpoint: Endpoint, ds: DataSet, work: Path) -> None:
        self.endpoint = endpoint
        self.ds = ds
        self.work = work
        self.mountpoint = work / "mnt" / self.key
        self._n = 0

    @abstractmethod
    def unavailable(self, allow_install: bool) -> str | None:
        """Why it cannot run here, or None."""

    @abstractmethod
    def describe(self) -> str:
        """The mount command line (for the report), with its version."""

    @abstractmethod
    def mounted(self, extra_options: str = "") -> contextlib.AbstractContextManager[Mounted]:
        """A fresh, cold mount of the bucket at ``self.mountpoint`` (``extra_options``: see write_variants)."""

    def write_variants(self) -> dict[str, str]:
        """The mounts the write case runs on: metric-key suffix -> extra mount options ("" as configured)."""
        return {"": ""}

    def scratch(self) -> Path:
        """A new, empty directory for one mount's private files (config, cache, log)."""
        self._n += 1
        path = self.work / "scratch" / f"{self.key}-{self._n}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


# --------------------------------------------------------------------------------------------------- lustrefs


class Lustrefs(FileSystem):
    """lustrefs through its CLI; each mount is a new file system (empty cache, empty namespace)."""

    def __init__(self, endpoint: Endpoint, ds: DataSet, work: Path, options: str, key: str, label: str,
                 reads: bool) -> None:  # fmt: skip
        self.key, self.label, self.reads, self.options = key, label, reads, options
        super().__init__(endpoint, ds, work)
        self.home = work / "lustrefs-home"
        self.env = {**os.environ, "LUSTREFS_HOME": str(self.home)}
        source = work / SOURCE_DIR
        if source.is_dir():  # an exported revision: imported ahead of the editable install
            self.env["PYTHONPATH"] = str(source)
        # Revisions before the client subpackage (--lustrefs-rev) have their CLI in lustrefs.cli.
        old = source.is_dir() and not (source / "lustrefs" / "client" / "cli.py").exists()
        self.cli_module = "lustrefs.cli" if old else "lustrefs.client.cli"

    def unavailable(self, allow_install: bool) -> str | None:
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing"
        return ensure_tool("fusermount3", "fuse3", allow_install)

    def describe(self) -> str:
        return "lustrefs mount FS_ID MNT" + (f" -o {self.options}" if self.options else "")

    def write_variants(self) -> dict[str, str]:
        """As configured (the default export_delay), and with the export at close (the issue's goal)."""
        return {"": "", "_delay0": "export_delay=0"}

    def _cli(self, *args: str, timeout: float = MOUNT_TIMEOUT) -> str:
        argv = [sys.executable, "-m", self.cli_module, *args]
        try:
            res = subprocess.run(argv, env=self.env, cwd=self.work, capture_output=True, text=True, timeout=timeout,
                                 check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise OpTimeout(f"lustrefs {args[0]} did not finish within {timeout:g} s") from None
        if res.returncode != 0:
            raise CaseError(f"lustrefs {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()[-800:]}")
        return res.stdout

    def _daemon_pid(self, fs_id: str) -> int | None:
        """The daemon's PID from ``$LUSTREFS_HOME/<fs-id>/mount.json``, if it is there."""
        try:
            return int(json.loads((self.home / fs_id / "mount.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    @contextlib.contextmanager
    def mounted(self, extra_options: str = "") -> Iterator[Mounted]:
        bucket = f"s3://{self.ds.bucket}"
        out = self._cli(
            "--endpoint-url",
            self.endpoint.url,
            "create-file-system",
            "--file-system-type",
            "LUSTRE",
            "--storage-capacity",
            "1200",
            "--lustre-configuration",
            f"ImportPath={bucket},ExportPath={bucket}",  # written files go to their own keys, as on the peers
        )
        fs_id = json.loads(out)["FileSystem"]["FileSystemId"]
        pid = None
        try:
            self.mountpoint.mkdir(parents=True, exist_ok=True)
            opts = ",".join(filter(None, [self.options, extra_options]))
            self._cli("mount", fs_id, str(self.mountpoint), *(["-o", opts] if opts else []))
            pid = self._daemon_pid(fs_id)
            if pid is None:
                raise CaseError(f"lustrefs mount of {fs_id} left no mount.json")
            path = self.mountpoint

            def stats() -> dict[str, Any]:
                return call_with_timeout(lambda: read_stats(path), 30, "stats request")

            yield Mounted(path, pid, stats)
        finally:
            unmount(self.mountpoint, pid or self._daemon_pid(fs_id))
            with contextlib.suppress(CaseError):
                self._cli("delete-file-system", "--file-system-id", fs_id)


# ------------------------------------------------------------------------------------------------------ peers


class PeerFs(FileSystem):
    """A peer that serves its mount from a foreground child process."""

    binary: str
    package: str

    def unavailable(self, allow_install: bool) -> str | None:
        return ensure_tool(self.binary, self.package, allow_install)

    @abstractmethod
    def argv(self, scratch: Path) -> list[str]:
        """The foreground mount command; may write config files into ``scratch``."""

    def version(self) -> str:
        return tool_version([self.binary, "--version"])

    @contextlib.contextmanager
    def mounted(self, extra_options: str = "") -> Iterator[Mounted]:
        if extra_options:
            raise ValueError(f"{self.key} takes no extra mount options (asked for {extra_options!r})")
        scratch = self.scratch()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        log_path = scratch / "mount.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(self.argv(scratch), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)  # fmt: skip
        try:
            wait_until(lambda: proc.poll() is not None or os.path.ismount(self.mountpoint), MOUNT_TIMEOUT,
                       f"{self.key} to mount")  # fmt: skip
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise CaseError(f"{self.key} exited {proc.returncode} before mounting: {' | '.join(tail)}")
            yield Mounted(self.mountpoint, proc.pid)
        finally:
            unmount(self.mountpoint, proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            shutil.rmtree(scratch / "cache", ignore_errors=True)


class S3fs(PeerFs):
    key, label, binary, package = "s3fs", "s3fs", "s3fs", "s3fs"

    def _options(self, passwd: Path) -> str:
        return f"url={self.endpoint.url},use_path_request_style,endpoint={self.endpoint.region},passwd_file={passwd}"

    def describe(self) -> str:
        return f"s3fs BUCKET MNT -f -o {self._options(Path('PASSWD'))} ({self.version()})"

    def argv(self, scratch: Path) -> list[str]:
        passwd = scratch / "passwd"
        passwd.write_text(f"{self.endpoint.access_key}:{self.endpoint.secret_key}\n")
        passwd.chmod(0o600)
        return ["s3fs", self.ds.bucket, str(self.mountpoint), "-f", "-o", self._options(passwd)]


class Rclone(PeerFs):
    binary, package = "rclone", "rclone"

    def __init__(self, endpoint: Endpoint, ds: DataSet, work: Path, server_modtime: bool) -> None:
        self.server_modtime = server_modtime
        self.key = "rclone-modtime" if server_modtime else "rclone"
        self.label = "rclone full + server-modtime" if server_modtime else "rclone full"
        super().__init__(endpoint, ds, work)

    def _flags(self) -> list[str]:
        return ["--vfs-cache-mode", "full"] + (["--use-server-modtime"] if self.server_modtime else [])

    def describe(self) -> str:
        return f"rclone mount bench:BUCKET MNT {' '.join(self._flags())} ({self.version()})"

    def version(self) -> str:
        return tool_version(["rclone", "version"])

    def argv(self, scratch: Path) -> list[str]:
        conf = scratch / "rclone.conf"
        conf.write_text(
            "[bench]\ntype = s3\nprovider = Other\nenv_auth = false\n"
            f"access_key_id = {self.endpoint.access_key}\nsecret_access_key = {self.endpoint.secret_key}\n"
            f"endpoint = {self.endpoint.url}\nregion = {self.endpoint.region}\nforce_path_style = true\n"
            "no_check_bucket = true\n"
        )
        conf.chmod(0o600)
        return ["rclone", "mount", f"bench:{self.ds.bucket}", str(self.mountpoint), "--config", str(conf),
                "--cache-dir", str(scratch / "cache"), "--log-level", "NOTICE", *self._flags()]  # fmt: skip


SYSTEM_KEYS = ("lustrefs", "lustrefs-nometa", "s3fs", "rclone", "rclone-modtime")


def file_systems(endpoint: Endpoint, ds: DataSet, work: Path, keys: list[str]) -> list[FileSystem]:
    """The file systems named in ``keys`` (see SYSTEM_KEYS), in report order."""
    make: dict[str, Callable[[], FileSystem]] = {
        "lustrefs": lambda: Lustrefs(endpoint, ds, work, "", "lustrefs", "lustrefs", reads=True),
        "lustrefs-nometa": lambda: Lustrefs(
            endpoint, ds, work, "posix_metadata=off", "lustrefs-nometa", "lustrefs posix_metadata=off", reads=True
        ),
        "s3fs": lambda: S3fs(endpoint, ds, work),
        "rclone": lambda: Rclone(endpoint, ds, work, server_modtime=False),
        "rclone-modtime": lambda: Rclone(endpoint, ds, work, server_modtime=True),
    }
    return [make[k]() for k in SYSTEM_KEYS if k in keys]
