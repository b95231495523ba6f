"""Mounting and unmounting: checks before mounting, the daemon process, and its lifecycle.

``mount`` checks everything that can fail early (record, options, mount point, bucket access), then either
serves in the foreground or starts a detached daemon and returns once the mount answers. The daemon owns
one trio thread: pyfuse3's request tasks, the namespace's background work and housekeeping all run in it.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pyfuse3
import trio

from . import db, options, records, s3client, sdnotify
from .cache import Cache
from .control_channel import Control
from .errors import FsxError
from .events import EventLog
from .fastpath import FastPath
from .fs import Operations
from .importer import Importer, Notifier, read_policy
from .namespace import Defaults, Namespace
from .prefetch import Prefetcher
from .repository import Repository
from .writeback import EVENTS, ExportTarget, Writeback

log = logging.getLogger(__name__)

MOUNT_FAILURE = 32  # mount(8)'s exit status for "mount failure"
READY_TIMEOUT = 60.0
UMOUNT_MARGIN = 15.0  # seconds umount waits past export_timeout: the grace below, closing the state, exiting
SHUTDOWN_GRACE = 5.0  # seconds requests still running after the export get (aborting a multipart upload)
FLUSH_INTERVAL = 30.0
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
    url = s3client.S3Url.parse(repo_conf.get("ImportPath", ""))
    if url is None:
        raise MountError(f"file system {fs_id} has no data repository (ImportPath); nothing to mount")
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
        bucket=url.bucket,
        import_prefix=url.prefix,
        endpoint_url=opts.endpoint_url or endpoint_url or record.get("_EndpointUrl"),
        region=region or record.get("_Region"),
        profile=profile,
    )


def check_bucket(p: MountPlan) -> None:
    """Fail fast, with a clear message, if the import bucket cannot be read."""
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
        return serve(p, ready_fd=None)
    return _start_daemon(p)


def _daemon_argv(p: MountPlan, ready_fd: int) -> list[str]:
    argv = [sys.executable, "-m", "lustrefs.daemon", p.fs_id, p.mountpoint, "--ready-fd", str(ready_fd)]
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
    """Whether /proc/mounts lists ``mountpoint`` as a lustrefs FUSE mount (also when its daemon is gone)."""
    target = os.path.realpath(mountpoint)
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "fuse.lustrefs" and _unescape(fields[1]) == target:
                return True
    return False


def _unescape(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


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


def write_exit_status(home: Path, pid: int, left: list[tuple[str, str]]) -> None:
    """Record the clean end of daemon ``pid``: what it could not export (``unexported.json``), then the exit
    status file that ``umount`` requires. A daemon that dies before this leaves no exit status."""
    report = home / "unexported.json"
    if left:
        report.write_text(json.dumps([{"path": path, "reason": why} for path, why in left], indent=1))
    else:
        report.unlink(missing_ok=True)
    tmp = home / (EXIT_FILE + ".tmp")
    tmp.write_text(json.dumps({"pid": pid, "unexported": len(left)}))
    os.replace(tmp, home / EXIT_FILE)


def _exit_confirmed(home: Path, pid: int) -> bool:
    try:
        return json.loads((home / EXIT_FILE).read_text())["pid"] == pid
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ----------------------------------------------------------------------------------------------- the daemon


def _setup_logging(level: str, logfile: Path | None) -> None:
    from .events import SafeFormatter  # every line is a record's: control characters (in S3 keys…) are escaped

    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if logfile is not None and not _stderr_is(logfile):
        handlers.append(logging.FileHandler(logfile, encoding="utf-8", errors="backslashreplace"))
    formatter = SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=handlers, force=True)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):  # never log requests (credentials)
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _stderr_is(path: Path) -> bool:
    try:
        a, b = os.fstat(2), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _cache_targets(p: MountPlan, home: Path) -> list[Path]:
    """The cache target directories; a target given by option gets a subdirectory per file system, created
    in the existing target only (FileNotFoundError if the target has gone)."""
    if not p.opts.cache_dirs:
        return [records.private_dir(home / "cache")]
    targets = [Path(d) / p.fs_id for d in p.opts.cache_dirs]
    for target in targets:
        target.mkdir(mode=0o700, exist_ok=True)
        os.chmod(target, 0o700)
    return targets


def _part_size(option_mib: int | None, chunk_size: int, old_layout: str | None) -> int:
    """The cache's part size: the option, else the existing cache's, else 4 MiB; capped at the chunk size,
    and 1 MiB if the chunk size is not a multiple of it."""
    if option_mib is not None:
        size = option_mib * options.MIB
    elif old_layout is not None:
        size = json.loads(old_layout)["part"]
    else:
        size = options.DEFAULT_PART_MIB * options.MIB
    size = min(size, chunk_size)
    return size if chunk_size % size == 0 else options.MIB


def serve(p: MountPlan, ready_fd: int | None) -> int:
    """Run the file system until it is unmounted or signalled. Returns the exit status."""
    home = records.fs_dir(p.fs_id)
    _setup_logging(p.opts.log_level, home / "daemon.log")
    faulthandler.register(signal.SIGUSR1)
    repo_conf = p.record["LustreConfiguration"]["DataRepositoryConfiguration"]
    chunk_size = int(repo_conf.get("ImportedFileChunkSize", 1024)) * options.MIB
    capacity_gib = p.opts.cache_size_gib or float(p.record.get("StorageCapacity", 1200))

    conn = db.connect(home / "state.db")
    events = EventLog(home / "events.jsonl", p.fs_id)
    try:
        targets = _cache_targets(p, home)
    except OSError as exc:
        log.error("cannot use the cache targets: %s", exc)
        return MOUNT_FAILURE
    old_layout = db.get_setting(conn, "cache_layout")
    part_size = _part_size(p.opts.part_size_mib, chunk_size, old_layout)
    layout = json.dumps({"targets": [str(t) for t in targets], "part": part_size, "chunk": chunk_size})
    if old_layout not in (None, layout):
        dirty = conn.execute("SELECT count(DISTINCT ino) FROM cache_parts WHERE etag = ''").fetchone()[0]
        if dirty:
            log.error(
                "the cache layout changed (cache_dir or part_size) while %d files have data not yet exported;"
                " mount with the previous options (%s) to export it first",
                dirty,
                old_layout,
            )
            return MOUNT_FAILURE
        log.info("cache layout changed; starting with an empty cache index")
        conn.execute("DELETE FROM cache_parts")
    db.set_setting(conn, "cache_layout", layout)

    client = p.client(max_pool_connections=p.opts.max_connections, io_timeout=p.opts.io_timeout)
    credentials = boto3.session.Session(profile_name=p.profile).get_credentials()
    fast = FastPath.create(client, p.bucket, credentials, p.opts.max_connections)
    repo = Repository(
        client, p.bucket, p.opts.max_connections, p.opts.sse_kms_key_id, fast, io_timeout=p.opts.io_timeout
    )
    defaults = Defaults(p.opts.uid, p.opts.gid, p.opts.file_mode, p.opts.dir_mode)
    export_url = s3client.S3Url.parse(repo_conf.get("ExportPath") or repo_conf["ImportPath"])
    target = ExportTarget.of(p.import_prefix, export_url.prefix if export_url else p.import_prefix)
    ns = Namespace(
        conn,
        repo,
        events,
        p.import_prefix,
        defaults,
        p.opts.posix_metadata,
        p.opts.max_connections,
        export_is_import=target.base == "",
    )
    cache = Cache(conn, repo, targets, int(capacity_gib * options.GIB), chunk_size, part_size)
    cache.load()
    writeback = Writeback(ns, cache, repo, events, target, export_policy(p.fs_id), p.opts.export_delay)
    ns.on_purge = cache.drop_inode
    ns.on_change = writeback.schedule
    ns.purge_orphans()
    prefetcher = Prefetcher(cache, p.opts.read_ahead_mib * options.MIB, small_file=part_size, files_ahead=16)
    notifier = Notifier(ns)
    importer = Importer(
        ns,
        cache,
        repo,
        events,
        notifier,
        read_policy(lambda: records.load_record(p.fs_id)),
        home / "repository-state.json",
        p.opts.poll_interval,
    )
    ns.on_closed = importer.closed
    control = Control(ns, cache, writeback, importer=importer)
    ops = Operations(ns, cache, prefetcher, writeback, control, p.opts.attr_timeout, p.opts.negative_timeout)

    fuse_opts = set(pyfuse3.default_options) | {f"fsname={p.fs_id}", "subtype=lustrefs"}
    if p.opts.ro:
        fuse_opts.add("ro")
    if p.opts.allow_other:
        fuse_opts.add("allow_other")
    try:
        pyfuse3.init(ops, p.mountpoint, fuse_opts)
    except RuntimeError as exc:
        log.error("cannot mount %s: %s", p.mountpoint, exc)
        return MOUNT_FAILURE
    (home / EXIT_FILE).unlink(missing_ok=True)
    (home / "unexported.json").unlink(missing_ok=True)
    state_file = home / "mount.json"
    state_file.write_text(
        json.dumps({"pid": os.getpid(), "mountpoint": p.mountpoint, "export_timeout": p.opts.export_timeout})
    )
    log.info("mounted %s (s3://%s/%s) at %s", p.fs_id, p.bucket, p.import_prefix, p.mountpoint)
    closed = [False]
    try:
        main_args = (ns, cache, writeback, importer, notifier, repo, ready_fd, p.opts.export_timeout, closed, control)
        left = trio.run(_main, *main_args)
        for path, why in left:
            log.error("not exported (kept in the cache for the next mount): %s: %s", path, why)
    except BaseException:
        log.exception("the file system failed")
        raise
    finally:
        with contextlib.suppress(Exception):
            cache.flush()
        if not closed[0]:
            pyfuse3.close(unmount=False)
        state_file.unlink(missing_ok=True)
        (home / "repository-state.json").unlink(missing_ok=True)
        conn.close()
        events.close()
        log.info("unmounted %s", p.mountpoint)
    write_exit_status(home, os.getpid(), left)
    return 0


def export_policy(fs_id: str) -> Callable[[], frozenset[str]]:
    """The file system's AutoExportPolicy events, read from its record each time (updates apply while mounted)."""

    def events() -> frozenset[str]:
        try:
            conf = records.load_record(fs_id)["LustreConfiguration"]["DataRepositoryConfiguration"]
        except (FsxError, KeyError):
            return frozenset(EVENTS)
        return frozenset((conf.get("AutoExportPolicy") or {}).get("Events", EVENTS))

    return events


async def _main(
    ns: Namespace,
    cache: Cache,
    writeback: Writeback,
    importer: Importer,
    notifier: Notifier,
    repo: Repository,
    ready_fd: int | None,
    export_timeout: float,
    closed: list[bool],
    control: Control,
) -> list[tuple[str, str]]:
    """Serve until unmounted; then export what is dirty, for at most ``export_timeout`` seconds (requests still
    running then get SHUTDOWN_GRACE more). Returns what could not be exported."""
    async with trio.open_nursery() as nursery:
        await nursery.start(ns.run)
        await nursery.start(cache.run)
        await nursery.start(writeback.run)
        await nursery.start(notifier.run)
        await nursery.start(importer.run)
        await nursery.start(control.run)
        nursery.start_soon(_housekeeping, cache)
        nursery.start_soon(_signals)
        fuse_done = trio.Event()

        async def fuse_main() -> None:
            try:
                await pyfuse3.main()
            finally:
                fuse_done.set()

        nursery.start_soon(fuse_main)
        await trio.lowlevel.checkpoint()
        if ready_fd is not None:
            os.write(ready_fd, b"READY\n")
            os.close(ready_fd)
        sdnotify.notify("READY=1")  # systemd Type=notify
        await fuse_done.wait()
        sdnotify.notify("STOPPING=1")
        pyfuse3.close(unmount=True)  # no process waits on a mount that is no longer served
        closed[0] = True
        log.info("unmounted; exporting %d dirty entries", writeback.queue_length())
        left = await writeback.flush(export_timeout)
        repo.stop_at = trio.current_time() + SHUTDOWN_GRACE  # bounds the shielded aborts of multipart uploads
        nursery.cancel_scope.cancel()
    return left


def tune_kernel(mountpoint: str, read_ahead_kib: int, max_background: int) -> None:
    """Raise the kernel's read-ahead and FUSE background-request limit for this mount (root only).

    The defaults (128 KiB read-ahead, 12 background requests) keep a sequential reader to one small request
    at a time; larger values let the kernel ask for several reads ahead in parallel. Failures are harmless.
    """
    device = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == mountpoint:
                device = fields[2]  # "major:minor"
    if device is None:
        return
    for path, value in (
        (f"/sys/class/bdi/{device}/read_ahead_kb", read_ahead_kib),
        (f"/sys/fs/fuse/connections/{device.split(':')[1]}/max_background", max_background),
    ):
        try:
            Path(path).write_text(str(value))
        except OSError as exc:
            log.debug("cannot set %s: %s", path, exc)


async def _housekeeping(cache: Cache) -> None:
    while True:
        await trio.sleep(FLUSH_INTERVAL)
        cache.flush()


async def _signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def main(argv: list[str] | None = None) -> int:
    """Entry of the daemon process started by ``mount`` (not a user command)."""
    ap = argparse.ArgumentParser(prog="lustrefs-daemon")
    ap.add_argument("fs_id")
    ap.add_argument("mountpoint")
    ap.add_argument("-o", dest="options", default="")
    ap.add_argument("--ready-fd", type=int)
    ap.add_argument("--endpoint-url")
    ap.add_argument("--region")
    ap.add_argument("--profile")
    a = ap.parse_args(argv)
    try:
        p = plan(a.fs_id, a.mountpoint, a.options, a.endpoint_url, a.region, a.profile)
    except MountError as exc:
        print(f"lustrefs daemon: {exc}", file=sys.stderr)
        return MOUNT_FAILURE
    return serve(p, a.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
