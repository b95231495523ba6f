"""The daemon process: the wiring of a mount and its lifecycle (``python -m lustrefs.daemon.process``).

``lustrefs mount`` (lustrefs.client.mount) checks the mount request and starts this process, which plans the
mount again, serves it and tells the command READY through a pipe; ``mount --foreground`` calls :func:`serve`
in the command's own process. The daemon owns one trio thread: pyfuse3's request tasks, the namespace's
background work and housekeeping all run in it. At the unmount it exports what is dirty and writes its exit
status file, which ``lustrefs umount`` waits for.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import cachetools
import psycopg
import pyfuse3
import trio

from lustrefs import associations, engine, options, records, s3client
from lustrefs.client import associations as client_associations
from lustrefs.client.mount import EXIT_FILE, MOUNT_FAILURE, MountError, MountPlan, plan
from lustrefs.constants import STAGING_NAME
from lustrefs.daemon import sdnotify
from lustrefs.daemon.core import AssociationSource, ClusterLink, Core, EventSource, Settings
from lustrefs.data.cache import Cache
from lustrefs.errors import FsxError
from lustrefs.events import EventLog
from lustrefs.s3.fastpath import FastPath
from lustrefs.s3.repository import Repository
from lustrefs.s3.routing import RoutedStore
from lustrefs.store import db, pg
from lustrefs.store.cacheparts import CachePartStore
from lustrefs.sync import s3events
from lustrefs.sync.exporter import EVENTS
from lustrefs.sync.importer import read_policy
from lustrefs.tree.loader import Defaults

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0  # seconds requests still running after the export get (aborting a multipart upload)
FLUSH_INTERVAL = 30.0
RECORD_TTL = 2.0  # seconds a mount reuses the file system's record it read


def write_exit_status(
    home: Path, pid: int, left: list[tuple[str, str]], association_of: Callable[[str], str | None] | None = None
) -> None:
    """Record the clean end of daemon ``pid``: what it could not export (``unexported.json``, each entry with its
    association if any), then the exit status file that ``umount`` requires. A daemon that dies before this
    leaves no exit status."""
    report = home / "unexported.json"
    if left:
        entries = [{"path": path, "reason": why} for path, why in left]
        for entry in entries if association_of else ():
            if found := association_of(entry["path"]):  # type: ignore[misc]
                entry["associationId"] = found
        report.write_text(json.dumps(entries, indent=1))
    else:
        report.unlink(missing_ok=True)
    tmp = home / (EXIT_FILE + ".tmp")
    tmp.write_text(json.dumps({"pid": pid, "unexported": len(left)}))
    os.replace(tmp, home / EXIT_FILE)


def _setup_logging(level: str, logfile: Path | None) -> None:
    from lustrefs.events import SafeFormatter

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
    repo_conf = p.record["LustreConfiguration"].get("DataRepositoryConfiguration") or {}
    chunk_size = int(repo_conf.get("ImportedFileChunkSize", 1024)) * options.MIB
    capacity_gib = p.opts.cache_size_gib or float(p.record.get("StorageCapacity", 1200))

    try:
        setting = engine.configured(records.home_dir())
        if setting.shared:
            conn: db.Connection = pg.connect(setting.conninfo, p.fs_id)
            local = db.connect(home / "cache.db", local=True)
        else:
            conn = local = db.connect(home / "state.db")
    except (engine.EngineConfigError, psycopg.Error, RuntimeError) as exc:
        log.error("cannot open the file system's metadata: %s", exc)
        return MOUNT_FAILURE
    try:
        targets = _cache_targets(p, home)
    except OSError as exc:
        log.error("cannot use the cache targets: %s", exc)
        return MOUNT_FAILURE
    old_layout = db.get_setting(local, "cache_layout")
    part_size = _part_size(p.opts.part_size_mib, chunk_size, old_layout)
    layout = json.dumps({"targets": [str(t) for t in targets], "part": part_size, "chunk": chunk_size})
    if old_layout not in (None, layout):
        dirty = CachePartStore(local).files_with_local_data()
        if dirty:
            log.error(
                "the cache layout changed (cache_dir or part_size) while %d files have data not yet exported;"
                " mount with the previous options (%s) to export it first",
                dirty,
                old_layout,
            )
            return MOUNT_FAILURE
        log.info("cache layout changed; starting with an empty cache index")
        CachePartStore(local).clear()
    db.set_setting(local, "cache_layout", layout)

    record = record_reader(p.fs_id)
    client = p.client(max_pool_connections=p.opts.max_connections, io_timeout=p.opts.io_timeout)
    credentials = boto3.session.Session(profile_name=p.profile).get_credentials()

    def bucket_repository(bucket: str) -> Repository:
        fast = FastPath.create(client, bucket, credentials, p.opts.max_connections)
        return Repository(
            client, bucket, p.opts.max_connections, p.opts.sse_kms_key_id, fast, io_timeout=p.opts.io_timeout
        )

    repo: Repository | RoutedStore
    links = None
    if p.bucket:  # the legacy link: one bucket, the import prefix filters
        repo = bucket_repository(p.bucket)
        export_url = s3client.S3Url.parse(repo_conf.get("ExportPath") or repo_conf["ImportPath"])
        export_prefix = export_url.prefix if export_url else p.import_prefix
    else:  # data repository associations (or none yet): keys are paths, routed to each association's bucket
        repo = RoutedStore(associations.Associations.routed(associations.from_record(p.record)), bucket_repository)
        export_prefix = ""
        links = association_source(p.fs_id)
    events = EventLog(home / "events.jsonl", p.fs_id, repo.association_of if isinstance(repo, RoutedStore) else None)
    settings = Settings(
        import_prefix=p.import_prefix,
        export_prefix=export_prefix,
        cache_targets=targets,
        cache_capacity=int(capacity_gib * options.GIB),
        chunk_size=chunk_size,
        part_size=part_size,
        import_state_file=home / "repository-state.json",
        defaults=Defaults(p.opts.uid, p.opts.gid, p.opts.file_mode, p.opts.dir_mode),
        posix_metadata=p.opts.posix_metadata,
        devices=not p.opts.nodev and os.geteuid() == 0,
        max_connections=p.opts.max_connections,
        export_delay=p.opts.export_delay,
        export_policy=export_policy(record),
        import_policy=read_policy(record),
        poll_interval=p.opts.poll_interval,
        read_ahead=p.opts.read_ahead_mib * options.MIB,
        attr_timeout=p.opts.attr_timeout,
        negative_timeout=(
            p.opts.negative_timeout if p.opts.negative_timeout is not None else 0.0 if setting.shared else 5.0
        ),
        cluster=ClusterLink(
            setting.conninfo, p.fs_id, _host_name(home), f"{STAGING_NAME}/{p.fs_id}/"
        ) if setting.shared else None,
        associations=links,
        events=event_source(p, repo) if p.opts.event_queue else None,
    )  # fmt: skip
    core = Core(conn, repo, events, settings, local)

    fuse_opts = set(pyfuse3.default_options) | {f"fsname={p.fs_id}", "subtype=lustrefs"}
    if p.opts.ro:
        fuse_opts.add("ro")
    if p.opts.allow_other:
        fuse_opts.add("allow_other")
    if p.opts.nodev or os.geteuid() != 0:
        fuse_opts.add("nodev")
    else:
        fuse_opts.add("dev")  # device nodes on the mount open the kernel's devices (root's mounts only)
    try:
        pyfuse3.init(core.ops, p.mountpoint, fuse_opts)
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
        left = trio.run(_main, core, repo, ready_fd, p.opts.export_timeout, closed)
        for path, why in left:
            log.error("not exported (kept in the cache for the next mount): %s: %s", path, why)
    except BaseException:
        log.exception("the file system failed")
        raise
    finally:
        with contextlib.suppress(Exception):
            core.cache.flush()
        if not closed[0]:
            pyfuse3.close(unmount=False)
        state_file.unlink(missing_ok=True)
        (home / "repository-state.json").unlink(missing_ok=True)
        conn.close()
        local.close()
        events.close()
        log.info("unmounted %s", p.mountpoint)
    write_exit_status(home, os.getpid(), left, events.association_of)
    return 0


def _host_name(home: Path) -> str:
    """This host's name in the cluster: the machine's name and an id kept in the file system's directory (two
    mounts of one machine with their own LUSTREFS_HOME are two hosts)."""
    path = home / "host-id"
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = secrets.token_hex(6)
        path.write_text(token + "\n")
    return f"{socket.gethostname()}:{token}"


def event_source(p: MountPlan, repo: Repository | RoutedStore) -> EventSource:
    """The mount's ``event_queue``: where an event's (bucket, key) is in this file system (the import prefix
    filters the legacy link's bucket; associations re-root theirs)."""
    assert p.opts.event_queue is not None

    def locate(bucket: str, key: str) -> str | None:
        if isinstance(repo, RoutedStore):
            return repo.map.virtual(bucket, key)
        return key if bucket == p.bucket and key.startswith(p.import_prefix) else None

    client = s3events.make_client(p.endpoint_url, p.region)
    return EventSource(client, p.opts.event_queue, locate)


def association_source(fs_id: str) -> AssociationSource:
    """Where the daemon reads the file system's associations (its record, read afresh) and reports on them."""

    async def read() -> list[associations.Association]:
        record = await trio.to_thread.run_sync(records.load_record, fs_id)
        return associations.from_record(record)

    async def report(dra_id: str, lifecycle: str, failure: str | None) -> None:
        await trio.to_thread.run_sync(client_associations.report_lifecycle, fs_id, dra_id, lifecycle, failure)

    async def forget(dra_id: str) -> None:
        await trio.to_thread.run_sync(client_associations.forget, fs_id, dra_id)

    return AssociationSource(read, report, forget)


def record_reader(fs_id: str) -> Callable[[], dict[str, Any]]:
    """The file system's record, read again once it is RECORD_TTL seconds old: updates apply while mounted, and
    the exports and polls that ask for its policies do not each read it (in a cluster, a database query)."""
    return cachetools.cached(cachetools.TTLCache(maxsize=1, ttl=RECORD_TTL))(lambda: records.load_record(fs_id))


def export_policy(record: Callable[[], dict[str, Any]]) -> Callable[[str], frozenset[str] | None]:
    """The export events of a key (None: the key is in no association, not exported), from the file system's
    record as ``record`` gives it: its legacy AutoExportPolicy, or the events of the association holding it."""

    def events(key: str) -> frozenset[str] | None:
        try:
            current = record()
        except FsxError:
            return frozenset(EVENTS)
        if current.get("_Associations") is not None:
            return associations.Associations.routed(associations.from_record(current)).export_events(key)
        conf = current.get("LustreConfiguration", {}).get("DataRepositoryConfiguration") or {}
        return frozenset((conf.get("AutoExportPolicy") or {}).get("Events", EVENTS))

    return events


async def _main(
    core: Core, repo: Repository | RoutedStore, ready_fd: int | None, export_timeout: float, closed: list[bool]
) -> list[tuple[str, str]]:
    """Serve until unmounted; then export what is dirty, for at most ``export_timeout`` seconds (requests still
    running then get SHUTDOWN_GRACE more). Returns what could not be exported."""
    async with trio.open_nursery() as nursery:
        await nursery.start(core.run)
        nursery.start_soon(_housekeeping, core.cache)
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
        log.info("unmounted; exporting %d dirty entries", core.writeback.queue_length())
        left = await core.export_all(export_timeout)
        repo.stop_at = trio.current_time() + SHUTDOWN_GRACE  # bounds the shielded aborts of multipart uploads
        nursery.cancel_scope.cancel()
    return left


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
