"""What a run measured (:class:`Results`), and its Markdown and JSON renderings."""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from .host import CaseError, OpTimeout

MIB = 1024**2


@dataclass(frozen=True)
class Metric:
    """One measured quantity: its key, its table label, and how many decimals to print."""

    key: str
    label: str
    decimals: int


# Per file system (one column each).
FS_METRICS = [
    Metric("read_cold_mbps", "cold sequential read of the big file, MB/s", 0),
    Metric("read_page_mbps", "re-read from the page cache, MB/s", 0),
    Metric("read_dropped_mbps", "re-read after dropping the page cache (lustrefs: its disk cache), MB/s", 0),
    Metric("latency_ms", "first-byte latency, 4 KiB read at a random offset (cold, median), ms", 1),
    Metric("find_cold_s", "`find`+stat of the tree, cold, s", 2),
    Metric("find_warm_s", "`find`+stat of the tree, warm, s", 3),
    Metric("ls_cold_s", "`ls -l` of the wide directory, cold, s", 2),
    Metric("ls_warm_s", "`ls -l` of the wide directory, warm, s", 3),
    Metric("cat_fps", "`cat` of every file of the tree, cold, files/s", 0),
    Metric("random_read_ms", "4 KiB random read (open + pread) on a mount that knows the file, page cache dropped"
           " (median), ms", 1),
    Metric("write_mbps", "write of a new big file → visible in S3 (open to a HEAD with the full size), MB/s", 0),
    Metric("write_visible_s", "write → visible: seconds from close() to visible in S3", 2),
    Metric("write_delay0_mbps", "write → visible, mounted with export_delay=0, MB/s", 0),
    Metric("write_delay0_visible_s", "write → visible, export_delay=0: seconds from close() to visible", 2),
    Metric("cpu_read_cold_s_gib", "serving process CPU, cold read, s per GiB read", 2),
    Metric("cpu_read_dropped_s_gib", "serving process CPU, re-read after dropping the page cache, s per GiB", 2),
    Metric("cpu_find_cold_s_kfile", "serving process CPU, `find`+stat cold, s per 1,000 files", 3),
    Metric("cpu_cat_s_kfile", "serving process CPU, `cat` cold, s per 1,000 files", 3),
    Metric("cpu_write_s_gib", "serving process CPU, write → visible, s per GiB written", 2),
    Metric("rss_start_mib", "serving process peak RSS (VmHWM) just after mounting, MiB", 0),
    Metric("rss_read_mib", "serving process peak RSS (VmHWM), big-file cases, MiB", 0),
    Metric("rss_meta_mib", "serving process peak RSS (VmHWM), tree cases, MiB", 0),
    Metric("rss_write_mib", "serving process peak RSS (VmHWM), write case, MiB", 0),
    Metric("other_cores", "other processes on the machine during this column's cases, cores (CPU-s per s)", 2),
]  # fmt: skip
RAW_METRICS = [
    Metric("raw_get_mbps", "one GET of the whole big object, MB/s", 0),
    Metric("raw_range4_mbps", "8 MiB ranged GETs, 4 in flight, MB/s", 0),
    Metric("raw_range8_mbps", "8 MiB ranged GETs, 8 in flight, MB/s", 0),
    Metric("raw_latency_ms", "one 4 KiB ranged GET at a random offset (median), ms", 1),
    Metric("raw_tree_list_lazy_s", "tree: delimiter LISTs per directory, one after another, s", 3),
    Metric("raw_tree_list_flat_s", "tree: flat LIST (pages of 1,000), s", 3),
    Metric("raw_tree_head16_s", "tree: HEAD of every file, 16 in flight, s", 2),
    Metric("raw_wide_list_s", "wide directory: delimiter LIST, s", 3),
    Metric("raw_wide_head16_s", "wide directory: HEAD of every file, 16 in flight, s", 2),
    Metric("raw_small_get8_fps", "tree: GET of every 4 KiB file, 8 in flight, files/s", 0),
]
LOCAL_METRICS = [
    Metric("local_read_cold_mbps", "local disk: cold read of a big file (page cache dropped), MB/s", 0),
    Metric("local_read_page_mbps", "local disk: page-cache read of the big file, MB/s", 0),
    Metric("local_find_cold_s", "local disk: `find`+stat of a copy of the tree, cold, s", 3),
    Metric("local_find_warm_s", "local disk: `find`+stat of a copy of the tree, warm, s", 3),
]
LABELS = {m.key: m for m in FS_METRICS + RAW_METRICS + LOCAL_METRICS}


@dataclass(frozen=True)
class IssueRow:
    """One row of issue 13's table. Each system's cell shows ``figures``, separated by ``;``: a metric, with a
    second one in parentheses if given (absent ones are left out). The raw column shows the first present of
    ``reference`` (``(section, metric, short name)``; for throughputs the highest)."""

    label: str
    figures: tuple[tuple[str, str | None], ...]
    reference: tuple[tuple[str, str, str], ...] = ()


def _row(label: str, *metrics: str, reference: tuple[tuple[str, str, str], ...] = ()) -> IssueRow:
    return IssueRow(label, tuple((m, None) for m in metrics), reference)


RAW_READS = (("raw", "raw_range8_mbps", "8 MiB ×8"), ("raw", "raw_range4_mbps", "8 MiB ×4"),
             ("raw", "raw_get_mbps", "whole GET"))  # fmt: skip
ISSUE_ROWS = [
    _row("cold read of the big file, MB/s", "read_cold_mbps", reference=RAW_READS),
    _row("re-read after drop_caches (lustrefs, rclone: their disk cache), MB/s", "read_dropped_mbps",
         reference=(("local", "local_read_cold_mbps", "local disk, cold"),)),
    _row("find + stat of the tree, cold, s", "find_cold_s",
         reference=(("raw", "raw_tree_head16_s", "HEADs ×16: the HEAD floor"),)),
    _row("ls -l of the wide directory, cold, s", "ls_cold_s", reference=(("raw", "raw_wide_list_s", "its LIST"),)),
    _row("ls -l of the wide directory, warm, s", "ls_warm_s"),
    _row("cat of the tree, cold, files/s", "cat_fps", reference=(("raw", "raw_small_get8_fps", "GET/s ×8"),)),
    IssueRow("write → visible in S3, MB/s (s from close to visible); lustrefs: default export_delay; then 0",
             (("write_mbps", "write_visible_s"), ("write_delay0_mbps", "write_delay0_visible_s"))),
    _row("4 KiB random read (open + pread), ms", "random_read_ms",
         reference=(("raw", "raw_latency_ms", "4 KiB ranged GET"),)),
    _row("CPU s per GiB: cold read; disk-cache re-read", "cpu_read_cold_s_gib", "cpu_read_dropped_s_gib"),
    _row("CPU s per 1,000 files: find + stat cold; cat cold", "cpu_find_cold_s_kfile", "cpu_cat_s_kfile"),
    _row("CPU s per GiB written (write → visible)", "cpu_write_s_gib"),
    _row("peak RSS, MiB: after mounting; big-file cases; tree cases", "rss_start_mib", "rss_read_mib",
         "rss_meta_mib"),
    _row("other processes on the machine meanwhile, cores", "other_cores"),
]  # fmt: skip


@dataclass
class SystemResult:
    """The figures of one file system; ``skipped`` says why it did not run at all."""

    label: str
    command: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # metric -> why it has no figure
    samples: dict[str, list[float]] = field(default_factory=dict)  # metric -> the samples of a median
    stats: list[dict[str, Any]] = field(default_factory=list)  # lustrefs counters after each mount
    skipped: str | None = None


@dataclass
class Results:
    """Everything a run measured; sections ``raw`` and ``local`` use the same SystemResult shape."""

    meta: dict[str, Any] = field(default_factory=dict)
    raw: SystemResult = field(default_factory=lambda: SystemResult("raw endpoint (boto3)"))
    local: SystemResult = field(default_factory=lambda: SystemResult("local disk"))
    systems: dict[str, SystemResult] = field(default_factory=dict)
    million: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)

    def figure(self, section: str, metric: str) -> float | None:
        """A measured value: section is ``raw``, ``local`` or a system key; None if missing."""
        res = {"raw": self.raw, "local": self.local}.get(section) or self.systems.get(section)
        return res.metrics.get(metric) if res else None


def log(message: str) -> None:
    """Progress on stderr, with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(res: SystemResult, metric: str, fn: Any) -> float | None:
    """Run ``fn()`` (a number, or None for nothing) and record it; a failure is recorded, not raised.

    An OpTimeout is recorded and then re-raised: the mount it happened on is probably hung.
    """
    try:
        value = fn()
    except (OSError, BotoCoreError, ClientError) as exc:
        res.failed[metric] = f"error: {exc}"
        log(f"{res.label}: {metric}: {res.failed[metric]}")
        return None
    except CaseError as exc:
        res.failed[metric] = f"{'timeout' if isinstance(exc, OpTimeout) else 'error'}: {exc}"
        log(f"{res.label}: {metric}: {res.failed[metric]}")
        if isinstance(exc, OpTimeout):
            raise
        return None
    if value is not None:
        res.metrics[metric] = float(value)
        log(f"{res.label}: {metric} = {value:.4g}")
    return value


def record_sample(res: SystemResult, metric: str, value: float) -> None:
    """Add one sample of ``metric``; its figure is the median of the samples so far."""
    res.samples.setdefault(metric, []).append(float(value))
    res.metrics[metric] = statistics.median(res.samples[metric])


def measure_sample(res: SystemResult, metric: str, fn: Any) -> float | None:
    """:func:`measure` one sample of ``metric`` (see :func:`record_sample`)."""
    value = measure(res, metric, fn)
    if value is not None:
        record_sample(res, metric, value)
    return value


# ---------------------------------------------------------------------------------------------- rendering


def _cell(res: SystemResult, m: Metric) -> str:
    if m.key in res.metrics:
        return f"{res.metrics[m.key]:,.{m.decimals}f}"
    if m.key in res.failed:
        return res.failed[m.key].split(":", 1)[0]
    return "—"


def fs_table(results: Results) -> str:
    """Metrics as rows, file systems as columns (those that ran)."""
    ran = [r for r in results.systems.values() if r.skipped is None]
    rows = ["| metric | " + " | ".join(r.label for r in ran) + " |", "|---" * (len(ran) + 1) + "|"]
    for m in FS_METRICS:
        if any(m.key in r.metrics or m.key in r.failed for r in ran):
            rows.append(f"| {m.label} | " + " | ".join(_cell(r, m) for r in ran) + " |")
    return "\n".join(rows)


def reference_table(results: Results) -> str:
    """The raw endpoint and the local disk, one row per figure."""
    rows = ["| reference | value |", "|---|---|"]
    for res, metrics in ((results.raw, RAW_METRICS), (results.local, LOCAL_METRICS)):
        rows += [f"| {m.label} | {_cell(res, m)} |" for m in metrics if m.key in res.metrics or m.key in res.failed]
    return "\n".join(rows)


def _has(res: SystemResult, key: str) -> bool:
    return key in res.metrics or key in res.failed


def _issue_cell(res: SystemResult, row: IssueRow) -> str:
    parts = [_cell(res, LABELS[m]) + (f" ({_cell(res, LABELS[then])})" if then and _has(res, then) else "")
             for m, then in row.figures if _has(res, m)]  # fmt: skip
    return "; ".join(parts) or "—"


def _reference_cell(results: Results, row: IssueRow) -> str:
    present = [(v, name, key) for section, key, name in row.reference
               if (v := results.figure(section, key)) is not None]  # fmt: skip
    if not present:
        return "—"
    value, name, key = max(present) if row.figures[0][0].endswith("_mbps") else present[0]
    return f"{value:,.{LABELS[key].decimals}f} ({name})"


def issue_table(results: Results) -> str:
    """Issue 13's table: its rows, the raw endpoint (or local disk) and every file system that ran."""
    ran = [r for r in results.systems.values() if r.skipped is None]
    rows = ["| metric | raw / reference | " + " | ".join(r.label for r in ran) + " |", "|---" * (len(ran) + 2) + "|"]
    for row in ISSUE_ROWS:
        if any(_has(r, m) for r in ran for m, _ in row.figures):
            cells = [_reference_cell(results, row), *(_issue_cell(r, row) for r in ran)]
            rows.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def targets_table(results: Results) -> str:
    rows = ["| target | issue | lustrefs | reference | ratio | goal | result |", "|---|---|---|---|---|---|---|"]
    for t in results.targets:
        reference = _num(t["reference"]) + (f" ({t['reference_name']})" if t["reference"] is not None else "")
        cells = [t["issues"], _num(t["value"]), reference, _num(t["ratio"], 2), t["goal"]]
        verdict = "n/a" if t["met"] is None else ("**met**" if t["met"] else "missed")
        rows.append(f"| {t['name']} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(rows)


def _num(v: float | None, decimals: int = 3) -> str:
    if v is None:
        return "—"
    return f"{v:,.{decimals}g}" if abs(v) < 1000 else f"{v:,.0f}"


def markdown(results: Results) -> str:
    """The whole report: context, the tables, targets, failures and skipped peers."""
    meta = results.meta
    out = [f"# lustrefs benchmark — {meta.get('date', '')}", ""]
    keys = ("endpoint", "machine", "load", "other_processes", "dataset", "populate", "page_cache", "lustrefs",
            "command", "wall_time")  # fmt: skip
    for key in keys:
        if key in meta:
            out.append(f"- {key.replace('_', ' ')}: {meta[key]}")
    if results.systems:
        out += ["", "## Issue 13's table", "", issue_table(results)]
        out += ["", "## File systems", "", fs_table(results)]
    if results.raw.metrics or results.local.metrics or results.raw.failed:
        out += ["", "## Raw endpoint (boto3) and local disk, same run", "", reference_table(results)]
    if results.targets:
        out += ["", "## Targets", "", targets_table(results)]
    if results.million:
        out += ["", "## Metadata-only case: many objects", ""]
        out += [f"- {k}: {v}" for k, v in results.million.items()]
    notes = [f"- {r.label}: skipped: {r.skipped}" for r in results.systems.values() if r.skipped]
    for r in [results.raw, results.local, *results.systems.values()]:
        notes += [f"- {r.label}: {LABELS[k].label if k in LABELS else k}: {why}" for k, why in r.failed.items()]
    if notes:
        out += ["", "## Failures and skipped systems", "", *notes]
    commands = [f"- {r.label}: `{r.command}`" for r in results.systems.values() if r.command]
    if commands:
        out += ["", "## Mount commands", "", *commands]
    return "\n".join(out) + "\n"


def write(results: Results, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` into ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    md.write_text(markdown(results))
    js.write_text(json.dumps(asdict(results), indent=1, default=str) + "\n")
    return md, js
