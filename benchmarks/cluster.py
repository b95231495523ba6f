"""``python -m benchmarks.cluster``: the cluster metadata engine (issue 14) against the embedded one, in one run.

Run by hand as root, never by ``make test``. One S3 endpoint on 127.0.0.1 (``--endpoint moto|s3rver``, started as
``python -m benchmarks`` starts it: benchmarks/endpoints.py), one private PostgreSQL server on a unix socket
(lustrefs.demo.localpg), and three lustrefs hosts on this machine, each with its own ``LUSTREFS_HOME``: ``embedded``
(SQLite) mounts one file system; ``host-a`` creates another with the PostgreSQL engine and mounts it first (so it
leads), ``host-b`` mounts the same one. Both file systems link the same bucket (ImportPath = ExportPath).

Cases, in this order (every wait bounded):

1. **Metadata operations**: N files (default 2,000) in a new directory, each operation run over all of them as
   one timed batch: create (``open(O_CREAT|O_EXCL)`` + ``close``), ``stat`` (the kernel's dentries and inodes
   dropped before: each is a LOOKUP served by the daemon), ``rename``, ``unlink``. Embedded, cluster (host A, with
   host B mounted), and cluster again with the server's ``fsync``/``full_page_writes`` turned on (the throwaway
   server runs without them; SQLite's WAL with ``synchronous=NORMAL`` does not sync at each commit either).
2. **Cross-host visibility** (cluster, ``--trials`` each): host B looks a name up (ENOENT, so its kernel may cache
   the miss), host A creates it, time until ``os.path.exists`` is true on B; host B looks a name up (found), host
   A renames it, time until the old name is gone on B; host B has read a 4 KiB file, host A rewrites it and
   closes it, B then opens and reads it: how often the first read returns the new bytes, and the time until one
   does. B polls every millisecond; a latency is measured from the return of A's call.
3. **Cold reads** on an embedded mount and on host B: a big file (``--big-size``, default 256 MiB) with ``dd``, and
   ``cat`` of ``--small`` 4 KiB files (default 1,000) with ``xargs cat``; the page cache dropped before each, and
   every read on a file that host has never read (``--repeats`` files of each kind, the order alternating).
4. **Leader failover** (cluster, remounted with ``export_delay=0``): a file written on the follower, time from its
   close until its object is in S3, with both hosts up (baseline); then ``kill -9`` of the leader's daemon (idle:
   SETTLE_S after the last write), a file written on the other host right after, the same time; the gap is the
   difference. The time from the kill to the
   survivor's "this host leads" log line is reported beside it. Repeated ``--failovers`` times, the killed host
   remounted (as a follower) between trials.

The daemons' and PostgreSQL's CPU time is read from /proc around each case. The Markdown report is printed and
written to ``--out`` (default ``benchmarks/out/cluster-<endpoint>-<time>.md``), with a JSON file beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lustrefs import records
from lustrefs.demo.localpg import PostgresServer, child_pids

from . import cases
from .dataset import KIB, MIB, ApiWriter, DataSet, create_bucket, fmt_size, parse_size
from .endpoints import KINDS, Endpoint, open_endpoint
from .host import (
    Bystanders,
    CaseError,
    OpTimeout,
    PageCache,
    alive,
    call_with_timeout,
    cpu_seconds,
    load_average,
    machine,
    stop_pid,
)
from .mounts import Lustrefs, read_stats, unmount
from .report import log

OUT = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parent.parent
BUCKET = "lustrefs-cluster-bench"
MAIN_OPTIONS = "export_delay=600"  # no export during the cases (they delete what they make); the rest default
FAILOVER_OPTIONS = "export_delay=0"
OP_TIMEOUT = 600.0  # one batch, one read
TRIAL_TIMEOUT = 10.0  # one visibility trial
VISIBLE_TIMEOUT = 60.0  # an object to appear in S3
POLL_S = 0.001  # how often host B checks in the visibility trials
S3_POLL_S = 0.02  # how often the failover case asks the endpoint for the object
LEAD_LINE = "cluster: this host leads"
SETTLE_S = 2.0  # seconds between the failover case's last write and the kill


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# ----------------------------------------------------------------------------------------------------- hosts


class Host(Lustrefs):
    """One lustrefs host: its own ``LUSTREFS_HOME`` and metadata engine setting, mounting a given file system.

    It reuses the suite's lustrefs column (benchmarks/mounts.py: the CLI call, the daemon's PID from mount.json,
    the stats request and the unmount) and splits its create-and-mount into the two steps a cluster needs."""

    def __init__(self, endpoint: Endpoint, ds: DataSet, work: Path, key: str, engine_env: dict[str, str]) -> None:
        super().__init__(endpoint, ds, work, "", key, key, reads=True)
        self.home = work / key / "home"
        self.env = {**os.environ, **engine_env, "LUSTREFS_HOME": str(self.home)}
        self.mountpoint = work / "mnt" / key
        self.fs_id: str | None = None
        self.pid: int | None = None

    def create(self, exports: bool = True) -> str:
        """A file system linked to the bucket (ImportPath = ExportPath); ``exports=False``: ``AutoExportPolicy``
        with no events, so that nothing is exported automatically."""
        bucket = f"s3://{self.ds.bucket}"
        conf: dict[str, Any] = {"ImportPath": bucket, "ExportPath": bucket}
        if not exports:
            conf["AutoExportPolicy"] = {"Events": []}
        out = self._cli(
            "--endpoint-url", self.endpoint.url, "create-file-system", "--file-system-type", "LUSTRE",
            "--storage-capacity", "1200", "--lustre-configuration", json.dumps(conf),
        )  # fmt: skip
        return str(json.loads(out)["FileSystem"]["FileSystemId"])

    def delete(self, fs_id: str) -> None:
        with contextlib.suppress(CaseError):
            self._cli("delete-file-system", "--file-system-id", fs_id)

    def mount(self, fs_id: str, options: str) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._cli("mount", fs_id, str(self.mountpoint), "-o", options)
        self.fs_id = fs_id
        self.pid = self.mount_pid()
        if self.pid is None:
            raise CaseError(f"{self.key}: lustrefs mount of {fs_id} left no live daemon in mount.json")

    def mount_pid(self) -> int | None:
        """The daemon's PID, from ``records.mount_state`` read with this host's ``LUSTREFS_HOME``."""
        assert self.fs_id is not None
        saved = os.environ.get("LUSTREFS_HOME")
        os.environ["LUSTREFS_HOME"] = str(self.home)
        try:
            state = records.mount_state(self.fs_id)
        finally:
            if saved is None:
                os.environ.pop("LUSTREFS_HOME", None)
            else:
                os.environ["LUSTREFS_HOME"] = saved
        return int(state["pid"]) if state else None

    def umount(self) -> None:
        """``lustrefs umount`` (it exports what is left), else ``fusermount3`` and the daemon stopped by PID."""
        if self.pid is None:
            return
        try:
            self._cli("umount", str(self.mountpoint), timeout=300)
        except CaseError as exc:
            log(f"{self.key}: {exc}; unmounting with fusermount3")
        unmount(self.mountpoint, self.pid)
        self.pid = None

    def kill(self) -> float:
        """``kill -9`` the daemon; returns the wall-clock time of the kill. The dead mount is then detached."""
        assert self.pid is not None
        killed_at = time.time()
        os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        unmount(self.mountpoint, None)  # fusermount3 -u (-z): the connection is gone
        self.pid = None
        return killed_at

    def daemon_log(self) -> Path:
        assert self.fs_id is not None
        return self.home / self.fs_id / "daemon.log"

    def requests(self) -> dict[str, int]:
        return dict(call_with_timeout(lambda: read_stats(self.mountpoint), 30, "stats")["requests"])


class Cpu:
    """CPU seconds used by the daemons of ``hosts`` and by the PostgreSQL server's processes since creation."""

    def __init__(self, hosts: list[Host], pg: PostgresServer | None) -> None:
        self.hosts = hosts
        self.pg = pg
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        got = {h.key: cpu_seconds(h.pid) or 0.0 for h in self.hosts if h.pid is not None}
        if self.pg is not None and self.pg.pid is not None:
            pids = [self.pg.pid, *child_pids(self.pg.pid)]
            got["postgres"] = sum(cpu_seconds(p) or 0.0 for p in pids)
        return got

    def used(self) -> dict[str, float]:
        now = self._read()
        return {k: round(now[k] - self.start.get(k, 0.0), 3) for k in now}


# ------------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Data:
    """What the bucket holds: ``repeats`` big files and ``repeats`` folders of small files."""

    big_size: int
    small: int
    repeats: int

    def big_keys(self) -> list[str]:
        return [f"big/big-{k}.bin" for k in range(1, self.repeats + 1)]

    def small_prefixes(self) -> list[str]:
        return [f"small-{k}/" for k in range(1, self.repeats + 1)]

    def small_names(self) -> list[str]:
        return [f"f{i:04d}" for i in range(self.small)]


def populate(endpoint: Endpoint, data: Data) -> float:
    started = time.perf_counter()
    create_bucket(endpoint, BUCKET)
    writer = ApiWriter(endpoint.client(pool=24), BUCKET)
    writer.put_many([("big/", 0), *((p, 0) for p in data.small_prefixes())])
    writer.put_many((p + n, 4 * KIB) for p in data.small_prefixes() for n in data.small_names())
    for key in data.big_keys():
        writer.put_big(key, data.big_size)
    return time.perf_counter() - started


# ----------------------------------------------------------------------------------------------------- cases


def metadata_ops(
    host: Host, label: str, n: int, cache: PageCache, pg: PostgresServer | None, other: Host | None = None
) -> dict[str, Any]:
    """create, stat (dentries dropped first), rename, unlink of ``n`` files in a new directory; one batch each.
    The CPU time of ``other`` (a second host of a cluster, which receives every change) is reported too."""
    folder = host.mountpoint / f"meta-{label.replace(' ', '-').replace('=', '-')}"
    call_with_timeout(lambda: os.mkdir(folder), 60, "mkdir")
    names = [folder / f"f{i:05d}" for i in range(n)]
    renamed = [p.with_name(p.name + ".r") for p in names]
    result: dict[str, Any] = {}

    def create(p: Path) -> None:
        os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))

    def rename(p: Path) -> None:
        os.rename(p, p.with_name(p.name + ".r"))

    def batch(op: str, fn: Callable[[Path], Any], paths: list[Path]) -> None:
        cpu = Cpu([host, *([other] if other else [])], pg)
        requests = host.requests()

        def run() -> float:
            started = time.perf_counter()
            for p in paths:
                fn(p)
            return time.perf_counter() - started

        seconds = call_with_timeout(run, OP_TIMEOUT, f"{op} of {n} files")
        used = cpu.used()
        after = host.requests()
        result[op] = {
            "ops_per_s": n / seconds,
            "seconds": seconds,
            "cpu_s": {
                "daemon": used[host.key],
                **({"other": used[other.key]} if other else {}),
                **({"postgres": used["postgres"]} if "postgres" in used else {}),
            },
            "s3_requests": {k: v - requests.get(k, 0) for k, v in after.items() if v - requests.get(k, 0)},
        }
        log(f"  {label}: {op} {n / seconds:,.0f}/s")

    batch("create", create, names)
    cache.drop()  # the kernel forgets the dentries and inodes: each stat is a LOOKUP
    batch("stat", os.stat, names)
    batch("rename", rename, names)
    batch("unlink", os.unlink, renamed)
    call_with_timeout(lambda: os.rmdir(folder), 60, "rmdir")
    return result


def metadata_embedded(ep: Endpoint, ds: DataSet, work: Path, n: int, cache: PageCache) -> dict[str, Any]:
    """The metadata case on an embedded file system of its own with automatic export off."""
    host = Host(ep, ds, work, "meta-embedded", {"LUSTREFS_METADATA_ENGINE": "sqlite"})
    fs_id = host.create(exports=False)
    try:
        host.mount(fs_id, MAIN_OPTIONS)
        return metadata_ops(host, "embedded", n, cache, None)
    finally:
        host.umount()
        host.delete(fs_id)


def metadata_cluster(
    ep: Endpoint, ds: DataSet, work: Path, n: int, cache: PageCache, pg: PostgresServer, label: str
) -> dict[str, Any]:
    """The metadata case on a cluster file system of its own with automatic export off, on ``pg``: run on the
    first host, a second host mounted beside it (it receives every change, as in a cluster)."""
    slug = label.replace(" ", "-")
    env = {"LUSTREFS_METADATA_ENGINE": "postgresql", "LUSTREFS_DATABASE": pg.create_database(slug.replace("-", "_"))}
    a, b = Host(ep, ds, work, f"meta-{slug}-a", env), Host(ep, ds, work, f"meta-{slug}-b", env)
    fs_id = a.create(exports=False)
    try:
        a.mount(fs_id, MAIN_OPTIONS)
        b.mount(fs_id, MAIN_OPTIONS)
        return metadata_ops(a, label, n, cache, pg, other=b)
    finally:
        b.umount()
        a.umount()
        a.delete(fs_id)


@dataclass
class Trials:
    """One visibility measurement: the latencies (s) of the trials that saw the change, how many saw it at the
    first check, and how many did not see it within TRIAL_TIMEOUT."""

    latencies: list[float] = field(default_factory=list)
    first_check: int = 0
    timeouts: int = 0

    def summary(self) -> dict[str, Any]:
        lat = self.latencies
        n = len(lat) + self.timeouts
        return {
            "trials": n,
            "first_check": self.first_check,
            "timeouts": self.timeouts,
            "p50_ms": percentile(lat, 50) * 1000 if lat else None,
            "p99_ms": percentile(lat, 99) * 1000 if lat else None,
            "max_ms": max(lat) * 1000 if lat else None,
            "mean_ms": statistics.fmean(lat) * 1000 if lat else None,
        }


def _wait_on_b(check: Callable[[], bool], started: float, trials: Trials) -> None:
    """Poll ``check`` (on host B) every POLL_S from ``started`` (when A's call returned); record the outcome."""
    if check():
        trials.first_check += 1
        trials.latencies.append(time.perf_counter() - started)
        return
    while time.perf_counter() - started < TRIAL_TIMEOUT:
        time.sleep(POLL_S)
        if check():
            trials.latencies.append(time.perf_counter() - started)
            return
    trials.timeouts += 1


def visibility(a: Host, b: Host, n: int, pg: PostgresServer) -> dict[str, Any]:
    """Create, rename and close-to-open write on host A, each watched from host B (see the module docstring)."""
    da, db = a.mountpoint / "vis", b.mountpoint / "vis"
    call_with_timeout(lambda: os.mkdir(da), 60, "mkdir vis")
    call_with_timeout(lambda: _until(lambda: db.is_dir(), TRIAL_TIMEOUT), TRIAL_TIMEOUT + 5, "vis on B")
    out: dict[str, Any] = {}

    def create_trials() -> Trials:
        t = Trials()
        for i in range(n):
            name = f"c{i:04d}"
            if os.path.exists(db / name):  # B looks it up first: ENOENT, which its kernel may cache
                raise CaseError(f"{db / name} exists before it was created")
            os.close(os.open(da / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            _wait_on_b(lambda p=db / name: os.path.exists(p), time.perf_counter(), t)
        return t

    def rename_trials() -> Trials:
        t = Trials()
        for i in range(n):
            old, new = f"r{i:04d}", f"r{i:04d}.new"
            os.close(os.open(da / old, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            if not _until(lambda p=db / old: os.path.exists(p), TRIAL_TIMEOUT):  # B finds it: a positive dentry
                raise CaseError(f"{db / old} not seen on host B")
            os.rename(da / old, da / new)
            _wait_on_b(lambda p=db / old: not os.path.exists(p), time.perf_counter(), t)
        return t

    def write_trials() -> Trials:
        t = Trials()
        path_a, path_b = da / "c2o.bin", db / "c2o.bin"
        path_a.write_bytes(b"-" * 4096)
        if not _until(lambda: _read(path_b) == b"-" * 4096, TRIAL_TIMEOUT):
            raise CaseError(f"{path_b}: the first content not seen on host B")
        for i in range(n):
            body = f"{i:08d}".encode() * 512  # 4 KiB, the same size every time: only the bytes tell
            fd = os.open(path_a, os.O_WRONLY)
            try:
                os.pwrite(fd, body, 0)
            finally:
                os.close(fd)
            _wait_on_b(lambda want=body: _read(path_b) == want, time.perf_counter(), t)
        return t

    for name, fn in (("create", create_trials), ("rename", rename_trials), ("close_to_open", write_trials)):
        cpu = Cpu([a, b], pg)
        trials = call_with_timeout(fn, n * (TRIAL_TIMEOUT + 1) + 60, f"{name} trials")
        out[name] = {**trials.summary(), "cpu_s": cpu.used(), "latencies_ms": [x * 1000 for x in trials.latencies]}
        s = out[name]
        log(f"  {name}: p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, at once {s['first_check']}/{s['trials']}")

    def clean() -> None:
        for entry in os.scandir(da):
            os.unlink(entry.path)
        os.rmdir(da)

    call_with_timeout(clean, OP_TIMEOUT, "removing vis/")
    return out


def _until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _read(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def cold_reads(
    embedded: Host, cluster: Host, data: Data, cache: PageCache, pg: PostgresServer, ep: Endpoint
) -> dict[str, Any]:
    """Big-file ``dd`` and small-file ``cat``, cold, each file read once per host; the order alternates."""
    out: dict[str, Any] = {h: {"read_mbps": [], "cat_fps": [], "cpu_read_s": [], "cpu_cat_s": [], "pg_cpu_s": []}
                           for h in ("embedded", "cluster")}  # fmt: skip
    extra = [ep.data_dir] if ep.data_dir else []
    for k, (big, small) in enumerate(zip(data.big_keys(), data.small_prefixes(), strict=True)):
        order = [("embedded", embedded), ("cluster", cluster)]
        for label, host in order if k % 2 == 0 else order[::-1]:
            cache.drop(*extra)
            cpu = Cpu([host], pg)
            mbps = cases.read_mbps(host.mountpoint / big, data.big_size, OP_TIMEOUT)
            used = cpu.used()
            out[label]["read_mbps"].append(mbps)
            out[label]["cpu_read_s"].append(used[host.key])
            cache.drop(*extra)
            cpu = Cpu([host], pg)
            fps = cases.cat_files(host.mountpoint / small.rstrip("/"), data.small_names(), OP_TIMEOUT)
            used2 = cpu.used()
            out[label]["cat_fps"].append(fps)
            out[label]["cpu_cat_s"].append(used2[host.key])
            out[label]["pg_cpu_s"].append(round(used.get("postgres", 0) + used2.get("postgres", 0), 3))
            log(f"  {label} #{k + 1}: dd {mbps:,.0f} MB/s, cat {fps:,.0f} files/s")
    for label in ("embedded", "cluster"):
        out[label]["read_mbps_median"] = statistics.median(out[label]["read_mbps"])
        out[label]["cat_fps_median"] = statistics.median(out[label]["cat_fps"])
    e, c = out["embedded"], out["cluster"]  # each repeat measured both back to back: ratios of the pairs
    for key, metric in (("paired_read_ratio_median", "read_mbps"), ("paired_cat_ratio_median", "cat_fps")):
        out[key] = statistics.median(y / x for x, y in zip(e[metric], c[metric], strict=True))
    return out


def _log_time(line: str) -> float | None:
    """The wall-clock time of a daemon.log line (``2026-12-01 17:23:39,860 INFO ...``, local time)."""
    with contextlib.suppress(ValueError):
        return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def lead_times(host: Host) -> list[float]:
    try:
        text = host.daemon_log().read_text(errors="replace")
    except OSError:
        return []
    return [t for line in text.splitlines() if LEAD_LINE in line and (t := _log_time(line)) is not None]


def write_until_visible(host: Host, rel: str, client: Any) -> float:
    """Write 4 KiB to ``rel`` on ``host`` and close it; seconds from the close until its object is in S3."""

    def write() -> float:
        with open(host.mountpoint / rel, "wb") as f:
            f.write(os.urandom(4096))
        return time.perf_counter()

    closed = call_with_timeout(write, 60, f"write {rel}")
    while True:
        try:
            client.head_object(Bucket=BUCKET, Key=rel)
            return time.perf_counter() - closed
        except client.exceptions.ClientError:
            pass
        if time.perf_counter() - closed > VISIBLE_TIMEOUT:
            raise OpTimeout(f"{rel} not in S3 within {VISIBLE_TIMEOUT:g} s of its close")
        time.sleep(S3_POLL_S)


def failover(a: Host, b: Host, fs_id: str, client: Any, baselines: int, trials: int) -> dict[str, Any]:
    """Baseline write → visible on the follower, then kill -9 of the leader and the same on the survivor."""
    for host in (a, b):
        host.mount(fs_id, FAILOVER_OPTIONS)
    if not _until(lambda: len(lead_times(a)) > 0, 15):
        raise CaseError("host A did not log that it leads")
    call_with_timeout(lambda: os.mkdir(b.mountpoint / "fo"), 60, "mkdir fo")
    base = [write_until_visible(b, f"fo/base-{i}", client) for i in range(baselines)]
    base_median = statistics.median(base)
    log(f"  baseline (both up, written on the follower): median {base_median:.3f} s")
    result: dict[str, Any] = {"baseline_s": base, "baseline_median_s": base_median, "trials": []}
    leader, survivor = a, b
    for t in range(trials):
        time.sleep(SETTLE_S)  # the leader idle when killed (its last export's bookkeeping done)
        leads_before = len(lead_times(survivor))
        cpu = Cpu([survivor], None)
        killed_at = leader.kill()
        visible = write_until_visible(survivor, f"fo/after-kill-{t}", client)
        _until(lambda s=survivor, n=leads_before: len(lead_times(s)) > n, 15)
        led = lead_times(survivor)[leads_before:]
        trial = {
            "killed": leader.key,
            "visible_after_close_s": visible,
            "gap_s": visible - base_median,
            "lead_log_after_kill_s": (led[0] - killed_at) if led else None,
            "survivor_cpu_s": cpu.used(),
        }
        result["trials"].append(trial)
        lead_log = f"{trial['lead_log_after_kill_s']:.3f} s" if led else "none"
        log(f"  kill -9 {leader.key}: visible {visible:.3f} s after close (gap {trial['gap_s']:.3f} s), "
            f"'leads' logged {lead_log} after the kill")  # fmt: skip
        leader.mount(fs_id, FAILOVER_OPTIONS)  # back, as a follower
        leader, survivor = survivor, leader
    gaps = [t["gap_s"] for t in result["trials"]]
    logs = [t["lead_log_after_kill_s"] for t in result["trials"] if t["lead_log_after_kill_s"] is not None]
    result["gap_median_s"] = statistics.median(gaps) if gaps else None
    result["lead_log_median_s"] = statistics.median(logs) if logs else None
    return result


# ---------------------------------------------------------------------------------------------------- report


def _f(value: float | None, decimals: int = 0) -> str:
    return "—" if value is None else f"{value:,.{decimals}f}"


def render(results: dict[str, Any]) -> str:
    r = results
    lines = [
        f"# Cluster engine benchmark ({r['endpoint']})",
        "",
        f"- command: `{r['command']}`; lustrefs {r['commit']}; {r['started']}, {r['minutes']:.1f} min",
        f"- machine: {r['machine']}; load average at the end {r['load']}; other processes: {r['bystanders']}",
        f"- endpoint: {r['endpoint_version']} on 127.0.0.1; PostgreSQL {r['pg_version']} on a unix socket "
        f"(fsync off unless said); page cache: {r['page_cache']}",
        f"- data: {r['data']}",
        "",
        f"## Metadata operations, {r['n']:,} files in one directory",
        "",
        "ops/s (CPU-s for the batch: the daemon; on the cluster host A's daemon / host B's / PostgreSQL). File systems"
        " of their own with automatic export off; the cluster's run on host A with host B mounted.",
        "",
        "| operation | embedded | cluster | cluster ÷ embedded | cluster, fsync on | ÷ embedded | S3 requests "
        "per op (cluster) |",
        "|---|---|---|---|---|---|---|",
    ]
    meta = r["metadata"]

    def cell(x: dict[str, Any] | None) -> str:
        if x is None:
            return "—"
        cpu = x["cpu_s"]
        parts = [cpu["daemon"], *(cpu[k] for k in ("other", "postgres") if k in cpu)]
        return f"{x['ops_per_s']:,.0f} ({' / '.join(f'{v:.1f}' for v in parts)})"

    def requests(x: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v / r['n']:.2f}" for k, v in sorted(x["s3_requests"].items())) or "0"

    ops = ("create", "stat", "rename", "unlink")
    for op in ops:
        e, c, f = meta["embedded"][op], meta["cluster"][op], meta["cluster fsync=on"][op]
        lines.append(f"| {op} | {cell(e)} | {cell(c)} | {c['ops_per_s'] / e['ops_per_s']:.2f} | {cell(f)} "
                     f"| {f['ops_per_s'] / e['ops_per_s']:.2f} | {requests(c)} |")  # fmt: skip
    lines += [
        "",
        "The same on the main file systems (the default export policy: the exporter runs during the batches; on the "
        "cluster, the leader's exporter is host A's):",
        "",
        "| operation | embedded | cluster | cluster ÷ embedded | S3 requests per op: embedded; cluster |",
        "|---|---|---|---|---|",
    ]
    for op in ops:
        e, c = meta["embedded, exports on"][op], meta["cluster, exports on"][op]
        lines.append(f"| {op} | {cell(e)} | {cell(c)} | {c['ops_per_s'] / e['ops_per_s']:.2f} "
                     f"| {requests(e)}; {requests(c)} |")  # fmt: skip
    vis = r["visibility"]
    lines += [
        "",
        f"## Cross-host visibility (host A changes, host B polls every {POLL_S * 1000:g} ms)",
        "",
        "| change on A | seen on B at the first check | p50 ms | p99 ms | max ms | not seen in "
        f"{TRIAL_TIMEOUT:g} s | CPU-s A / B / PostgreSQL |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, what in (("create", "create → exists on B (B had a cached miss)"),
                       ("rename", "rename → old name gone on B (B had it cached)"),
                       ("close_to_open", "write + close → B's open + read returns the new bytes")):  # fmt: skip
        s = vis[name]
        cpu = s["cpu_s"]
        lines.append(
            f"| {what} | {s['first_check']}/{s['trials']} | {_f(s['p50_ms'], 1)} | {_f(s['p99_ms'], 1)} "
            f"| {_f(s['max_ms'], 1)} | {s['timeouts']} | {cpu.get('host-a', 0):.1f} / {cpu.get('host-b', 0):.1f} / "
            f"{cpu.get('postgres', 0):.1f} |"
        )
    rd = r["reads"]
    e, c = rd["embedded"], rd["cluster"]
    lines += [
        "",
        f"## Cold reads (median of {len(e['read_mbps'])}; each a file the host never read, page cache dropped)",
        "",
        "| read | embedded | cluster (host B) | cluster ÷ embedded (medians; median of the pairs) | runs (embedded; "
        "cluster) |",
        "|---|---|---|---|---|",
        f"| `dd` of a {r['big']} file, MB/s | {e['read_mbps_median']:,.0f} | {c['read_mbps_median']:,.0f} | "
        f"{c['read_mbps_median'] / e['read_mbps_median']:.2f}; {rd['paired_read_ratio_median']:.2f} | "
        f"{', '.join(f'{x:.0f}' for x in e['read_mbps'])}; {', '.join(f'{x:.0f}' for x in c['read_mbps'])} |",
        f"| `cat` of {r['small']:,} × 4 KiB, files/s | {e['cat_fps_median']:,.0f} | {c['cat_fps_median']:,.0f} | "
        f"{c['cat_fps_median'] / e['cat_fps_median']:.2f}; {rd['paired_cat_ratio_median']:.2f} | "
        f"{', '.join(f'{x:.0f}' for x in e['cat_fps'])}; {', '.join(f'{x:.0f}' for x in c['cat_fps'])} |",
        f"| daemon CPU-s: dd; cat (medians) | {statistics.median(e['cpu_read_s']):.2f}; "
        f"{statistics.median(e['cpu_cat_s']):.2f} | {statistics.median(c['cpu_read_s']):.2f}; "
        f"{statistics.median(c['cpu_cat_s']):.2f} | | PostgreSQL CPU-s per cluster run: "
        f"{', '.join(f'{x:.2f}' for x in c['pg_cpu_s'])} |",
    ]
    fo = r["failover"]
    lines += [
        "",
        "## Leader failover (export_delay=0; a 4 KiB file written and closed on the surviving host)",
        "",
        "- baseline, both hosts up, written on the follower: close → in S3 "
        f"{', '.join(f'{x:.3f}' for x in fo['baseline_s'])} s (median {fo['baseline_median_s']:.3f})",
        "",
        "| killed | close → in S3 after the kill, s | gap (minus the baseline median), s | kill → \"this host leads\" "
        "in the survivor's log, s |",
        "|---|---|---|---|",
    ]
    for t in fo["trials"]:
        lines.append(f"| {t['killed']} | {t['visible_after_close_s']:.3f} | {t['gap_s']:.3f} | "
                     f"{_f(t['lead_log_after_kill_s'], 3)} |")  # fmt: skip
    lines.append(f"| **median** | | **{_f(fo['gap_median_s'], 3)}** | **{_f(fo['lead_log_median_s'], 3)}** |")
    return "\n".join(lines) + "\n"


def revision() -> tuple[str, bool]:
    """The short HEAD commit, and whether lustrefs/ differs from it (the daemons run the working tree)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()

    return git("rev-parse", "--short", "HEAD") or "?", bool(git("status", "--porcelain", "--", "lustrefs"))


def describe_revisions(start: tuple[str, bool], end: tuple[str, bool]) -> str:
    """``abc1234`` or ``abc1234 + working tree``; both ends when HEAD moved during the run (each mount runs the
    code on disk when it starts)."""
    head = start[0] if start[0] == end[0] else f"{start[0]} (at the start) / {end[0]} (at the end)"
    return head + (" + working tree" if start[1] or end[1] else "")


# ------------------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    started = time.time()
    OUT.mkdir(exist_ok=True)
    work = OUT / f"cluster-work-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir()
    data = Data(args.big_size, args.small, args.repeats)
    ds = DataSet(bucket=BUCKET)
    cache = PageCache()
    results: dict[str, Any] = {
        "command": command,
        "commit": "",
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": machine(),
        "n": args.n,
        "big": fmt_size(args.big_size),
        "small": args.small,
        "page_cache": cache.describe(),
    }
    hosts: list[Host] = []
    at_start = revision()
    try:
        with contextlib.ExitStack() as stack:
            watch = stack.enter_context(Bystanders(str(work)))
            ep = stack.enter_context(open_endpoint(args.endpoint, None, work, args.allow_install))
            pg = stack.enter_context(PostgresServer(timeout=60))
            conninfo = pg.create_database("bench")
            results["endpoint"] = ep.kind
            results["endpoint_version"] = ep.version
            results["pg_version"] = pg.bindir.parent.name
            log(f"endpoint {ep.url} ({ep.version}); PostgreSQL pid {pg.pid}; work {work}")
            seconds = populate(ep, data)
            results["data"] = (
                f"s3://{BUCKET}: {data.repeats} × {fmt_size(data.big_size)} (big/), {data.repeats} folders of "
                f"{data.small:,} × 4 KiB, written with S3 PUTs in {seconds:.0f} s"
            )
            log(f"populated in {seconds:.0f} s")
            cluster_env = {"LUSTREFS_METADATA_ENGINE": "postgresql", "LUSTREFS_DATABASE": conninfo}
            embedded = Host(ep, ds, work, "embedded", {"LUSTREFS_METADATA_ENGINE": "sqlite"})
            a = Host(ep, ds, work, "host-a", cluster_env)
            b = Host(ep, ds, work, "host-b", cluster_env)
            hosts = [b, a, embedded]
            fs_embedded, fs_cluster = embedded.create(), a.create()
            for host, fs_id in ((embedded, fs_embedded), (a, fs_cluster), (b, fs_cluster)):
                host.mount(fs_id, MAIN_OPTIONS)
            log("metadata operations, automatic export off")
            meta = results["metadata"] = {}
            meta["embedded"] = metadata_embedded(ep, ds, work, args.n, cache)
            meta["cluster"] = metadata_cluster(ep, ds, work, args.n, cache, pg, "cluster")
            with PostgresServer(timeout=60, settings={"fsync": "on", "full_page_writes": "on"}) as pg_sync:
                meta["cluster fsync=on"] = metadata_cluster(ep, ds, work, args.n, cache, pg_sync, "cluster fsync")
            log("metadata operations, automatic export on (the default policy)")
            meta["embedded, exports on"] = metadata_ops(embedded, "embedded exports", args.n, cache, None)
            meta["cluster, exports on"] = metadata_ops(a, "cluster exports", args.n, cache, pg, other=b)
            log("cross-host visibility")
            results["visibility"] = visibility(a, b, args.trials, pg)
            log("cold reads")
            results["reads"] = cold_reads(embedded, b, data, cache, pg, ep)
            for host in hosts:
                host.umount()
            log("leader failover")
            results["failover"] = failover(a, b, fs_cluster, ep.client(), args.baselines, args.failovers)
            for host in hosts:
                host.umount()
            a.delete(fs_cluster)
            embedded.delete(fs_embedded)
            results["load"] = load_average()
        results["bystanders"] = watch.describe()
    finally:
        for host in hosts:
            with contextlib.suppress(Exception):
                unmount(host.mountpoint, host.pid)
                if host.pid is not None:
                    stop_pid(host.pid, 10)
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    results["commit"] = describe_revisions(at_start, revision())
    results["minutes"] = (time.time() - started) / 60
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--endpoint", choices=KINDS, default="moto", help="S3 endpoint started on 127.0.0.1 (moto)")
    p.add_argument("--out", type=Path, help="the Markdown report (default benchmarks/out/cluster-<endpoint>-<time>.md)")
    p.add_argument("--n", type=int, default=2000, help="files of the metadata case (2,000)")
    p.add_argument("--trials", type=int, default=200, help="trials of each visibility measurement (200)")
    p.add_argument("--big-size", type=parse_size, default=256 * MIB, help="big file of the read case (256MiB)")
    p.add_argument("--small", type=int, default=1000, help="4 KiB files of the cat case (1,000)")
    p.add_argument("--repeats", type=int, default=3, help="cold reads of each kind per host (3)")
    p.add_argument("--baselines", type=int, default=5, help="baseline writes of the failover case (5)")
    p.add_argument("--failovers", type=int, default=3, help="leader kills (3)")
    p.add_argument("--no-install", dest="allow_install", action="store_false", help="do not npm install s3rver")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory (homes, logs) under out/")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.cluster", *(sys.argv[1:] if argv is None else argv)])
    results = run(args, command)
    md = args.out or OUT / f"cluster-{results['endpoint']}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    text = render(results)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    md.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)
    print(f"written: {md}\n         {md.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
