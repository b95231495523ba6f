"""The order of a run: endpoint, data set, raw endpoint, local disk, then each file system on fresh mounts.

On each file system the cases run in the order of CASES, each on its own fresh mount(s); the serving process's
CPU time and peak RSS are read from ``/proc`` around them.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from lustrefs.mounts import mounts as mount_table

from . import cases, dataset, raw, report, targets
from .dataset import DataSet
from .endpoints import Endpoint, open_endpoint
from .host import Bystanders, CaseError, OpTimeout, PageCache, cpu_seconds, load_average, machine, peak_rss
from .mounts import SOURCE_DIR, FileSystem, Lustrefs, Mounted, file_systems
from .report import Results, SystemResult, log, measure, measure_sample, record_sample

OUT = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parent.parent
MIB = 1024**2
GIB = 1024**3
CASES = ("latency", "random", "read", "tree", "cat", "write")  # on each file system, in this order
CPU_SETTLE = 1.0  # seconds a case's background work (cache writes, uploads) gets before its CPU time is read
REPEATS = 3  # fresh mounts for the big-file read and write cases (each figure: the median), as the harness


@dataclass
class Settings:
    """What the command line asked for."""

    endpoint_kind: str | None
    endpoint_url: str | None
    big_size: int
    quick: bool
    systems: list[str]
    timeout: float
    samples: int
    populate: str  # "api" (S3 PUTs), "disk" (s3rver: write its store directly) or "auto" (see dataset.populate*)
    allow_install: bool
    keep_work: bool
    million: int  # 0: the normal suite; else the many-objects metadata case with this many objects
    lustrefs_rev: str | None  # benchmark this git revision of lustrefs/ (exported) instead of the working tree
    argv: str
    cases: tuple[str, ...] = CASES  # the file-system cases to run (the raw endpoint and local disk always run)


class Run:
    """One benchmark run; ``results`` fills up as it goes."""

    def __init__(self, settings: Settings, endpoint: Endpoint, work: Path, results: Results, watch: Bystanders) -> None:
        self.s = settings
        self.watch = watch  # what else runs on the machine
        self.ep = endpoint
        self.work = work
        self.results = results
        self.cache = PageCache()
        self.ds = DataSet.make(settings.big_size, settings.quick)
        self.client = endpoint.client(pool=20)
        self.offsets = cases.spread_offsets(self.ds.big_size, settings.samples, seed=1)
        self._write_data: bytes | None = None

    def cold(self, *paths: Path) -> None:
        """Drop the page cache (with fadvise: of ``paths`` and of the endpoint's store)."""
        self.cache.drop(*paths, *([self.ep.data_dir] if self.ep.data_dir else []))

    def after_drop(self, fn: Callable[[], float], *paths: Path) -> Callable[[], float]:
        """``fn``, to be run right after dropping the page cache (see :meth:`cold`)."""

        def run() -> float:
            self.cold(*paths)
            return fn()

        return run

    @staticmethod
    def with_cpu(
        res: SystemResult, metric: str, m: Mounted, per: float, fn: Callable[[], float]
    ) -> Callable[[], float]:
        """``fn``, also recording as a sample of ``metric`` the CPU seconds the serving process spent on it (and in
        the CPU_SETTLE seconds after it) divided by ``per`` (GiB, thousands of files)."""

        def run() -> float:
            before = cpu_seconds(m.pid)
            value = fn()
            time.sleep(CPU_SETTLE)
            after = cpu_seconds(m.pid)
            if before is not None and after is not None:
                record_sample(res, metric, (after - before) / per)
            return value

        return run

    def write_key(self, fs: FileSystem, suffix: str) -> str:
        """The key (and path in the mount) of the file the write case writes on ``fs``."""
        return f"{self.ds.write_prefix}{fs.key}{suffix}.bin"

    def write_data(self) -> bytes:
        """The random content of the write case (made once, outside any timing)."""
        if self._write_data is None:
            self._write_data = os.urandom(self.ds.write_size)
        return self._write_data

    # ------------------------------------------------------------------------------------------ suite

    def suite(self) -> None:
        meta = self.results.meta
        meta["page_cache"] = f"dropped with {self.cache.describe()}"
        meta["dataset"] = self.ds.describe()
        systems = file_systems(self.ep, self.ds, self.work, self.s.systems)
        for fs in systems:  # before any timing: installing a missing peer takes a while
            res = self.results.systems[fs.key] = SystemResult(fs.label)
            res.skipped = fs.unavailable(self.s.allow_install)
            if res.skipped:
                log(f"{fs.label}: skipped: {res.skipped}")
            else:
                res.command = fs.describe()
        log(f"populating: {meta['dataset']}")
        seconds, how = dataset.populate(self.ds, self.ep, self.s.populate)
        meta["populate"] = f"{seconds:.0f} s, {how}"
        self.raw_endpoint()
        self.local_disk()
        for fs in systems:
            if not self.results.systems[fs.key].skipped:
                self.file_system(fs)

    def raw_endpoint(self) -> None:
        """The ceilings, measured with boto3 (page cache dropped before each: s3rver serves from its disk)."""
        res, ds, c, b = self.results.raw, self.ds, self.client, self.ds.bucket
        size, tree, wide = ds.big_size, ds.tree, ds.wide
        cold = self.after_drop
        measure(res, "raw_get_mbps", cold(lambda: raw.whole_get(c, b, ds.big_key, size)))
        measure(res, "raw_range4_mbps", cold(lambda: raw.ranged_gets(c, b, ds.big_key, size, 4)))
        measure(res, "raw_range8_mbps", cold(lambda: raw.ranged_gets(c, b, ds.big_key, size, 8)))

        def latency_ms() -> float:
            samples = raw.ranged_latencies(c, b, ds.big_key, self.offsets, self.cache)
            res.samples["raw_latency_ms"] = [s * 1000 for s in samples]
            return cases.median(samples) * 1000

        measure(res, "raw_latency_ms", latency_ms)
        measure(res, "raw_tree_list_lazy_s", cold(lambda: self._listed(raw.list_lazy(c, b, tree.prefix), tree)))
        measure(res, "raw_tree_list_flat_s", cold(lambda: self._listed(raw.list_flat(c, b, tree.prefix), tree)))
        measure(res, "raw_tree_head16_s", cold(lambda: raw.heads(c, b, tree.object_keys(), 16)))
        measure(res, "raw_wide_list_s", cold(lambda: self._listed(raw.list_lazy(c, b, wide.prefix), wide)))
        measure(res, "raw_wide_head16_s", cold(lambda: raw.heads(c, b, wide.object_keys(), 16)))
        measure(res, "raw_small_get8_fps", cold(lambda: raw.small_gets(c, b, tree.object_keys(), tree.size, 8)))

    @staticmethod
    def _listed(timed: tuple[float, int], tree: dataset.Tree) -> float:
        seconds, objects = timed
        if objects != tree.count + 1:  # the files and the folder's marker
            raise CaseError(f"listing of {tree.prefix} found {objects} objects, expected {tree.count + 1}")
        return seconds

    def local_disk(self) -> None:
        """Local-disk baseline: a big file and a copy of the tree in the work directory."""
        res, t = self.results.local, self.s.timeout
        log("writing the local copies")
        big, tree_dir = dataset.local_copy(self.ds, self.work / "local")
        size, n = self.ds.big_size, self.ds.tree.count
        measure(res, "local_read_cold_mbps", self.after_drop(lambda: cases.read_mbps(big, size, t), big))
        measure(res, "local_read_page_mbps", lambda: cases.read_mbps(big, size, t))
        measure(res, "local_find_cold_s", self.after_drop(lambda: cases.find_stat(tree_dir, n, t), tree_dir))
        measure(res, "local_find_warm_s", lambda: cases.find_stat(tree_dir, n, t))
        shutil.rmtree(self.work / "local", ignore_errors=True)

    # ------------------------------------------------------------------------------------- file systems

    def session(
        self, fs: FileSystem, rss_metric: str, body: Callable[[Mounted], None], extra_options: str = ""
    ) -> None:
        """One fresh mount: run ``body`` on it, record the server's peak RSS and counters, tear it down."""
        res = self.results.systems[fs.key]
        try:
            with fs.mounted(extra_options) as m:
                start_rss = peak_rss(m.pid)
                if start_rss is not None:
                    res.metrics["rss_start_mib"] = min(res.metrics.get("rss_start_mib", math.inf), start_rss / MIB)
                try:
                    body(m)
                finally:
                    rss = peak_rss(m.pid)
                    if rss is not None:
                        res.metrics[rss_metric] = max(res.metrics.get(rss_metric, 0.0), rss / MIB)
                    if m.stats is not None:
                        with contextlib.suppress(CaseError, OSError):
                            res.stats.append(m.stats())
        except OpTimeout as exc:
            log(f"{fs.label}: mount abandoned after a timeout: {exc}")
        except CaseError as exc:
            res.failed.setdefault("mount", f"error: {exc}")
            log(f"{fs.label}: mount failed: {exc}")

    def file_system(self, fs: FileSystem) -> None:
        res, t, ds = self.results.systems[fs.key], self.s.timeout, self.ds
        log(f"{fs.label}: starting")
        others, started = self.watch.total, time.monotonic()
        backing = [self.work / "lustrefs-home"] if isinstance(fs, Lustrefs) else []
        big_gib, kfiles = ds.big_size / GIB, ds.tree.count / 1000

        def big(m: Mounted) -> Path:
            return m.path / ds.big_key

        def latency(m: Mounted, offset: int) -> None:  # one sample per fresh mount, each at its own offset
            measure_sample(res, "latency_ms", lambda: cases.first_byte_latency(big(m), offset, self.cache, t) * 1000)

        def random_reads(m: Mounted) -> None:
            def run() -> float:
                reads = cases.random_reads(big(m), self.offsets, self.cache, t)
                res.samples["random_read_ms"] = [r * 1000 for r in reads]
                return cases.median(reads) * 1000

            measure(res, "random_read_ms", run)

        def reads(m: Mounted) -> None:
            f, size = big(m), ds.big_size
            read = self.with_cpu(res, "cpu_read_cold_s_gib", m, big_gib, lambda: cases.read_mbps(f, size, t))
            measure_sample(res, "read_cold_mbps", self.after_drop(read, f, *backing))
            measure_sample(res, "read_page_mbps", lambda: cases.read_mbps(f, size, t))
            read = self.with_cpu(res, "cpu_read_dropped_s_gib", m, big_gib, lambda: cases.read_mbps(f, size, t))
            measure_sample(res, "read_dropped_mbps", self.after_drop(read, f, *backing))

        def tree_ops(m: Mounted) -> None:
            tree, wide = m.path / ds.tree.name, m.path / ds.wide.name
            self.cold()
            find = self.with_cpu(res, "cpu_find_cold_s_kfile", m, kfiles,
                                 lambda: cases.find_stat(tree, ds.tree.count, t))  # fmt: skip
            measure(res, "find_cold_s", find)
            measure(res, "find_warm_s", lambda: cases.find_stat(tree, ds.tree.count, t))
            self.cold()  # the wide directory has not been looked at yet on this mount
            measure(res, "ls_cold_s", lambda: cases.ls_long(wide, ds.wide.count, t))
            measure(res, "ls_warm_s", lambda: cases.ls_long(wide, ds.wide.count, t))

        def cat(m: Mounted) -> None:
            self.cold()
            tree, files = m.path / ds.tree.name, ds.tree.relpaths()
            measure(res, "cat_fps", self.with_cpu(res, "cpu_cat_s_kfile", m, kfiles,
                                                  lambda: cases.cat_files(tree, files, t)))  # fmt: skip

        def write(m: Mounted, suffix: str) -> None:
            key, data = self.write_key(fs, suffix), self.write_data()

            def visible() -> bool:
                return raw.has_object(self.client, ds.bucket, key, len(data))

            def timed() -> float:
                timing = cases.write_visible(m.path / key, data, visible, t)
                record_sample(res, f"write{suffix}_visible_s", timing.close_to_visible)
                return len(data) / timing.seconds / cases.MB

            run = timed if suffix else self.with_cpu(res, "cpu_write_s_gib", m, len(data) / GIB, timed)
            measure_sample(res, f"write{suffix}_mbps", run)

        wanted = set(self.s.cases) - (set() if fs.reads else {"latency", "random", "read"})
        if "latency" in wanted:
            for offset in self.offsets:
                self.session(fs, "rss_read_mib", lambda m, offset=offset: latency(m, offset))
        if "random" in wanted:
            self.session(fs, "rss_read_mib", random_reads)
        for _ in range(REPEATS if "read" in wanted else 0):
            self.session(fs, "rss_read_mib", reads)
        if "tree" in wanted:
            self.session(fs, "rss_meta_mib", tree_ops)
        if "cat" in wanted:
            self.session(fs, "rss_meta_mib", cat)
        if "write" in wanted:
            for _, (suffix, options) in itertools.product(range(REPEATS), fs.write_variants().items()):
                self.session(fs, "rss_write_mib", lambda m, suffix=suffix: write(m, suffix), options)
                with contextlib.suppress(BotoCoreError, ClientError):  # the next mounts start without it
                    raw.delete(self.client, ds.bucket, self.write_key(fs, suffix))
        res.metrics["other_cores"] = (self.watch.total - others) / (time.monotonic() - started)

    # ---------------------------------------------------------------------------------------- million

    def many_objects(self) -> None:
        """The metadata-only memory case: list ``million`` objects through lustrefs (posix_metadata=off).

        POSIX metadata stays off: it would cost one HEAD per object (about an hour per million on s3rver).
        """
        tree = dataset.million_tree(self.s.million)
        out = self.results.million
        out["objects"] = f"{tree.count:,} objects of {tree.size} B in {tree.dirs:,} directories of {tree.per_dir:,}"
        log(f"populating {out['objects']}")
        seconds, how = dataset.populate_tree(tree, self.ep, self.ds.bucket, self.s.populate)
        out["populate"] = f"{seconds:.0f} s ({tree.count / seconds:,.0f} objects/s), {how}"
        log(f"populated: {out['populate']}")
        self.cold()  # one directory's delimiter LIST with boto3, for scale (all of them would take minutes)
        first = tree.prefix + tree.relpaths()[0].rsplit("/", 1)[0] + "/"
        seconds, objects = raw.list_lazy(self.client, self.ds.bucket, first)
        out["raw delimiter LIST of one directory, boto3, cold"] = f"{seconds:.2f} s for {objects:,} keys"
        fs = Lustrefs(self.ep, self.ds, self.work, "posix_metadata=off", "lustrefs-nometa",
                      "lustrefs posix_metadata=off", reads=False)  # fmt: skip
        res = self.results.systems[fs.key] = SystemResult(fs.label, fs.describe())

        def rss(m: Mounted) -> str:
            return f"{(peak_rss(m.pid) or 0) / MIB:,.0f} MiB"

        def find(m: Mounted) -> None:
            out["lustrefs peak RSS after mounting"] = rss(m)
            self.cold()
            seconds = measure(res, "find_cold_s", lambda: cases.find_stat(m.path / tree.name, tree.count,
                                                                         self.s.timeout))  # fmt: skip
            rate = f"{seconds:.0f} s ({tree.count / seconds:,.0f} files/s)" if seconds else "failed"
            out["lustrefs `find`+stat, cold"] = rate
            out["lustrefs peak RSS after listing"] = rss(m)
            if m.stats is not None:
                with contextlib.suppress(CaseError, OSError, KeyError):
                    out["lustrefs inodes"] = f"{m.stats()['inodes']:,}"
            db = sum(p.stat().st_size for p in (self.work / "lustrefs-home").rglob("state.db*"))
            out["lustrefs state.db size"] = f"{db / MIB:,.0f} MiB"

        self.session(fs, "rss_meta_mib", find)


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, timeout=60, check=False)


def lustrefs_source(rev: str | None, work: Path) -> str:
    """Export ``rev``'s lustrefs/ into the work directory (see mounts.SOURCE_DIR); describe what runs."""
    if rev is None:
        head = _git("rev-parse", "--short", "HEAD").stdout.decode().strip() or "?"
        dirty = _git("status", "--porcelain", "lustrefs").stdout.strip()
        return f"working tree at {head}" + (" with uncommitted changes in lustrefs/" if dirty else "")
    commit = _git("rev-parse", "--short", f"{rev}^{{commit}}").stdout.decode().strip()
    archive = _git("archive", "--format=tar", commit or rev, "lustrefs")
    if not commit or archive.returncode != 0:
        raise CaseError(f"cannot export lustrefs/ at {rev!r}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(work / SOURCE_DIR, filter="data")
    return f"commit {commit} ({rev}), exported from git"


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    return [m.mountpoint for m in mount_table() if m.mountpoint.startswith(prefix)]


def run(settings: Settings) -> tuple[Results, Path, Path]:
    """Run the benchmark; returns the results and the paths of the Markdown and JSON reports."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = OUT / f"work-{stamp}"
    work.mkdir(parents=True)
    results = Results()
    results.meta |= {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "lustrefs": lustrefs_source(settings.lustrefs_rev, work),
        "command": f"`{settings.argv}`",
        "load": f"load average {load_average()} at the start",
    }
    started = time.perf_counter()
    watch = Bystanders(str(work))
    try:
        with watch, open_endpoint(settings.endpoint_kind, settings.endpoint_url, work, settings.allow_install) as ep:
            results.meta["endpoint"] = f"{ep.kind} ({ep.version}) at {ep.url}"
            results.meta["endpoint_kind"] = ep.kind
            log(f"endpoint: {results.meta['endpoint']}")
            r = Run(settings, ep, work, results, watch)
            if settings.million:
                r.many_objects()
            else:
                r.suite()
    finally:
        results.meta["wall_time"] = f"{(time.perf_counter() - started) / 60:.1f} min"
        results.meta["load"] += f"; {load_average()} at the end"
        results.meta["other_processes"] = watch.describe()
        left = _mounts_under(work)
        if left:
            log(f"not removing {work}: still mounted: {left}")
        elif not settings.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        if not settings.million:
            results.targets = targets.evaluate(results)
        kind = results.meta.get("endpoint_kind", "none") + ("-million" if settings.million else "")
        md, js = report.write(results, OUT, f"bench-{kind}-{stamp}")
    os.sync()
    return results, md, js
