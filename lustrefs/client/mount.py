"""``lustrefs mount`` and ``lustrefs umount``: the checks before a mount, starting the daemon, waiting for it.

``mount`` checks everything that can fail early (record, options, mount point, bucket access), then starts
a detached daemon process (``python -m lustrefs.daemon.process``, which plans the mount again with :func:`plan`)
and returns once the mount answers; with ``--foreground`` it serves in this process instead (lustrefs.daemon.process
is imported only then). ``umount`` unmounts, then waits for the daemon's export and its exit status file.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lustrefs import options, records, s3client
from lustrefs.errors import FsxError
from lustrefs.mounts import mounted_at, tune_kernel

MOUNT_FAILURE = 32  # mount(8)'s exit status for "mount failure"
READY_TIMEOUT = 60.0
UMOUNT_MARGIN = 15.0  # seconds umount waits past export_timeout: the daemon's shutdown grace, closing, exiting
EXIT_FILE = "exit.json"  # written last by a daemon that ended cleanly: {"pid", "unexported"}


class MountError(Exception):
    """A mount that cannot be made; the message says why."""


@dataclass
class MountPlan:
    """Everything a daemon needs, resolved and checked before it starts."""

    fs_id: str
    mountpoint: str
    opts: options.MountOptions
    record: dict[str, Any]
    bucket: str
    import_prefix: str
    endpoint_url: str | None
    region: str | None
    profile: str | None

    def client(self, **kwargs: Any) -> Any:
        return s3client.make_client(self.endpoint_url, self.region, self.profile, **kwargs)


def plan(
    fs_id: str,
    mountpoint: str,
    opts_text: str | None,
    endpoint_url: str | None,
    region: str | None,
    profile: str | None,
) -> MountPlan:
    """Resolve and check a mount request. Raises MountError."""
    try:
        record = records.load_record(fs_id)
    except FsxError as exc:
        raise MountError(str(exc)) from None
    try:
        opts = options.parse_options(opts_text)
    except options.OptionError as exc:
        raise MountError(str(exc)) from None
    repo_conf = record.get("LustreConfiguration", {}).get("DataRepositoryConfiguration") or {}
    url = s3client.S3Url.parse(repo_conf.get("ImportPath", ""))  # None: linked by associations (or not yet)
    if repo_conf and url is None:
        raise MountError(f"file system {fs_id} has an ImportPath that is not an S3 URL")
    for target in opts.cache_dirs:
        if not os.path.isdir(target):  # an unmounted disk must not send the cache to the root file system
            raise MountError(f"cache_dir {target} does not exist or is not a directory")
    mountpoint = os.path.realpath(mountpoint)
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} does not exist or is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point")
    state = records.mount_state(fs_id)
    if state is not None:
        raise MountError(f"file system {fs_id} is already mounted at {state['mountpoint']} (pid {state['pid']})")
    return MountPlan(
        fs_id=fs_id,
        mountpoint=mountpoint,
        opts=opts,
        record=record,
        bucket=url.bucket if url else "",
        import_prefix=url.prefix if url else "",
        endpoint_url=opts.endpoint_url or endpoint_url or record.get("_EndpointUrl"),
        region=region or record.get("_Region"),
        profile=profile,
    )


def check_bucket(p: MountPlan) -> None:
    """Fail fast, with a clear message, if the import bucket cannot be read (associations: each is checked by
    the daemon, which reports MISCONFIGURED)."""
    if not p.bucket:
        return
    client = p.client(io_timeout=p.opts.io_timeout, max_attempts=2)
    try:
        client.list_objects_v2(Bucket=p.bucket, Prefix=p.import_prefix, MaxKeys=1)
    except Exception as exc:
        where = p.endpoint_url or "the default S3 endpoint"
        raise MountError(f"cannot read s3://{p.bucket}/{p.import_prefix} at {where}: {exc}") from None


# ----------------------------------------------------------------------------------------------- commands


def mount(
    fs_id: str,
    mountpoint: str,
    options: str | None = None,
    foreground: bool = False,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
) -> int:
    """``lustrefs mount``: returns once the mount answers (or at unmount with ``foreground``)."""
    try:
        p = plan(fs_id, mountpoint, options, endpoint_url, region, profile)
        check_bucket(p)
    except MountError as exc:
        print(f"lustrefs mount: {exc}", file=sys.stderr)
        return MOUNT_FAILURE
    if foreground:
        from lustrefs.daemon import process as daemon

        return daemon.serve(p, ready_fd=None)
    return _start_daemon(p)


def _daemon_argv(p: MountPlan, ready_fd: int) -> list[str]:
    argv = [sys.executable, "-m", "lustrefs.daemon.process", p.fs_id, p.mountpoint, "--ready-fd", str(ready_fd)]
    argv += ["-o", options.to_string(p.opts)]
    for flag, value in (("--endpoint-url", p.endpoint_url), ("--region", p.region), ("--profile", p.profile)):
        if value:
            argv += [flag, value]
    return argv


def _start_daemon(p: MountPlan) -> int:
    """Start the daemon detached; wait until it reports the mount ready and the mount point answers."""
    logfile = records.fs_dir(p.fs_id) / "daemon.log"
    r, w = os.pipe()
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            _daemon_argv(p, w),
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    os.close(w)
    with os.fdopen(r, "rb") as ready:
        line = _read_line_with_timeout(ready, READY_TIMEOUT)
    if line.strip() != b"READY":
        if proc.poll() is None:
            proc.terminate()
        print(f"lustrefs mount: the daemon did not start; {_tail(logfile)}", file=sys.stderr)
        return MOUNT_FAILURE
    if not _answers(p.mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", p.mountpoint], capture_output=True)
        proc.terminate()
        print(f"lustrefs mount: {p.mountpoint} did not answer, unmounted it; see {logfile}", file=sys.stderr)
        return MOUNT_FAILURE
    if p.opts.kernel_read_ahead_kib:  # after the first answer: the kernel resets it when FUSE starts
        tune_kernel(p.mountpoint, p.opts.kernel_read_ahead_kib, max_background=64)
    return 0


def _read_line_with_timeout(f: Any, timeout: float) -> bytes:
    result: list[bytes] = [b""]
    t = threading.Thread(target=lambda: result.__setitem__(0, f.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return result[0]


def _answers(mountpoint: str, timeout: float = 20.0) -> bool:
    """Whether ``stat`` of the mount point succeeds within ``timeout`` (a hung mount must not hang us)."""
    ok: list[bool] = [False]

    def probe() -> None:
        with contextlib.suppress(OSError):
            os.stat(mountpoint)
            ok[0] = True

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return ok[0]


def _tail(logfile: Path, lines: int = 5) -> str:
    try:
        text = logfile.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return f"see {logfile}"
    return "last lines of its log:\n  " + "\n  ".join(text) if text else f"see {logfile}"


def find_daemon(mountpoint: str) -> dict[str, Any] | None:
    """The mount state (fs id, pid) of the daemon serving ``mountpoint``, if any."""
    target = os.path.realpath(mountpoint)
    for rec in records.list_records():
        state = records.mount_state(rec["FileSystemId"])
        if state and os.path.realpath(state["mountpoint"]) == target:
            return {**state, "fs_id": rec["FileSystemId"]}
    return None


def is_lustrefs_mount(mountpoint: str) -> bool:
    """Whether the mount table lists ``mountpoint`` as a lustrefs FUSE mount (also when its daemon is gone)."""
    return any(m.fstype == "fuse.lustrefs" for m in mounted_at(os.path.realpath(mountpoint)))


def umount(mountpoint: str) -> int:
    """``lustrefs umount``: unmount, wait for the daemon's export and report what it could not export."""
    state = find_daemon(mountpoint)
    if state is None and not is_lustrefs_mount(mountpoint):
        print(f"lustrefs umount: {mountpoint} is not a lustrefs mount", file=sys.stderr)
        return 1
    res = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if res.returncode != 0:
        print(f"lustrefs umount: {res.stderr.strip() or 'fusermount3 failed'}", file=sys.stderr)
        return 1
    if state is None:
        print(
            f"lustrefs umount: unmounted {mountpoint}, but no daemon was serving it (it had exited, or it uses"
            " another LUSTREFS_HOME): nothing confirms that everything was exported",
            file=sys.stderr,
        )
        return 1
    return _wait_for_export(state)


def _wait_for_export(state: dict[str, Any]) -> int:
    """Wait at most export_timeout + UMOUNT_MARGIN for the daemon to exit; its exit status file says how."""
    pid = int(state["pid"])
    home = records.home_dir() / state["fs_id"]
    timeout = float(state.get("export_timeout", options.MountOptions().export_timeout)) + UMOUNT_MARGIN
    deadline = time.monotonic() + timeout
    while records.process_alive(pid):
        if time.monotonic() > deadline:
            print(
                f"lustrefs umount: daemon {pid} still running {timeout:g} s after the unmount (export_timeout +"
                f" {UMOUNT_MARGIN:g} s); it has not confirmed that everything was exported; see {home / 'daemon.log'}",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.05)
    if not _exit_confirmed(home, pid):
        print(
            f"lustrefs umount: daemon {pid} exited without confirming that everything was exported (it may have"
            f" crashed; see {home / 'daemon.log'}); entries not exported stay dirty in the cache and are exported"
            " at the next mount",
            file=sys.stderr,
        )
        return 1
    report = home / "unexported.json"
    if report.exists():
        left = json.loads(report.read_text())
        print(
            f"lustrefs umount: {len(left)} entries could not be exported; they stay dirty in the cache and are"
            " exported at the next mount:",
            file=sys.stderr,
        )
        for item in left:
            print(f"  {item['path']}: {item['reason']}", file=sys.stderr)
        return 2
    return 0


def _exit_confirmed(home: Path, pid: int) -> bool:
    try:
        return json.loads((home / EXIT_FILE).read_text())["pid"] == pid
    except (OSError, ValueError, KeyError, TypeError):
        return False
