"""What a run measured (:class:`Results`), and its Markdown and JSON renderings."""

from __future__ import annotations

import json
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
    Metric("rss_read_mib", "serving process peak RSS (VmHWM), big-file cases, MiB", 0),
    Metric("rss_meta_mib", "serving process peak RSS (VmHWM), tree cases, MiB", 0),
]
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


def targets_table(results: Results) -> str:
    rows = ["| target | lustrefs | reference | ratio | goal | result |", "|---|---|---|---|---|---|"]
    for t in results.targets:
        reference = _num(t["reference"]) + (f" ({t['reference_name']})" if t["reference"] is not None else "")
        cells = [_num(t["value"]), reference, _num(t["ratio"], 2), t["goal"]]
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
    for key in ("endpoint", "machine", "dataset", "populate", "page_cache", "lustrefs", "command", "wall_time"):
        if key in meta:
            out.append(f"- {key.replace('_', ' ')}: {meta[key]}")
    if results.systems:
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
