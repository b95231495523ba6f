"""The performance issues' targets, evaluated on the figures of one run (ratios within the run).

Two issues set them: the read-performance issue ("read") and issue 13, ahead of s3fs and rclone on every read
and write path ("13"). A goal both state is one target, tagged with both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lustrefs.options import MountOptions

from .report import Results

PEERS = ("s3fs", "rclone", "rclone-modtime")
RCLONES = ("rclone", "rclone-modtime")
READ, ISSUE13, BOTH = "read", "13", "read, 13"
EXPORT_DELAY = MountOptions().export_delay  # lustrefs's default export_delay (docs/CLI.md, mount options)


@dataclass(frozen=True)
class Target:
    """``value`` compared with ``reference``: ratio value/reference at least/at most ``bound``.

    With ``absolute`` the bound applies to the value itself (e.g. seconds) and the reference is unused.
    """

    name: str
    issues: str  # which issue(s) set it: READ, ISSUE13 or BOTH
    value: float | None
    reference: tuple[float | None, str]  # the figure compared with, and what it is
    bound: float
    at_least: bool
    absolute: bool = False

    def evaluate(self) -> dict[str, Any]:
        ref, ref_name = self.reference
        if self.absolute:
            compared = self.value
            goal = f"{'≥' if self.at_least else '≤'} {self.bound:g}"
        else:
            compared = None if self.value is None or not ref else self.value / ref
            goal = f"ratio {'≥' if self.at_least else '≤'} {self.bound:g}"
        met = None if compared is None else (compared >= self.bound if self.at_least else compared <= self.bound)
        return {"name": self.name, "issues": self.issues, "value": self.value, "reference": ref,
                "reference_name": ref_name, "ratio": None if self.absolute else compared, "goal": goal,
                "met": met}  # fmt: skip


Ref = tuple[float | None, str]
NONE: Ref = (None, "")


def _best(candidates: list[Ref], lowest: bool = False) -> Ref:
    """The highest (``lowest``: the lowest) figure present among ``(value, name)`` candidates."""
    present = [c for c in candidates if c[0] is not None]
    if not present:
        return NONE
    return (min if lowest else max)(present, key=lambda c: c[0] or 0.0)


def _sum(name: str, *values: float | None) -> Ref:
    return (None if any(v is None for v in values) else sum(v for v in values if v is not None)), name


def evaluate(results: Results) -> list[dict[str, Any]]:
    """Every target of both issues, with its ratio and whether it is met (None: a figure is missing)."""
    f: Callable[[str, str], float | None] = results.figure
    lus, off = "lustrefs", "lustrefs-nometa"

    def ref(section: str, metric: str, name: str) -> Ref:
        return f(section, metric), name

    def best_of(systems: tuple[str, ...], metric: str, lowest: bool) -> Ref:
        return _best([ref(p, metric, results.systems[p].label) for p in systems if p in results.systems], lowest)

    raw_reads = (("raw_get_mbps", "whole GET"), ("raw_range4_mbps", "ranged ×4"), ("raw_range8_mbps", "ranged ×8"))
    best_raw = _best([ref("raw", k, f"raw {name}") for k, name in raw_reads])
    best_peer_read = best_of(PEERS, "read_cold_mbps", lowest=False)
    targets = [
        Target("cold sequential read ≥ 90% of the best raw boto3 figure", BOTH, f(lus, "read_cold_mbps"), best_raw,
               0.9, at_least=True),
        Target("cold sequential read ahead of every peer", BOTH, f(lus, "read_cold_mbps"), best_peer_read, 1.0,
               at_least=True),
        Target("cold sequential read, posix_metadata=off, ahead of every peer", ISSUE13, f(off, "read_cold_mbps"),
               best_peer_read, 1.0, at_least=True),
        Target("page-cache re-read ≥ 50% of a local page-cache read", READ, f(lus, "read_page_mbps"),
               ref("local", "local_read_page_mbps", "local page-cache read"), 0.5, at_least=True),
        Target("disk-cache re-read ≥ 50% of a cold local-disk read", BOTH, f(lus, "read_dropped_mbps"),
               ref("local", "local_read_cold_mbps", "local cold read"), 0.5, at_least=True),
    ]  # fmt: skip
    for what, metric, warm_goal, raw_list, raw_head in (
        ("find+stat of the tree", "find", 0.5, "raw_tree_list_lazy_s", "raw_tree_head16_s"),
        ("ls -l of the wide directory", "ls", 0.1, "raw_wide_list_s", "raw_wide_head16_s"),
    ):
        cold, warm = f"{metric}_cold_s", f"{metric}_warm_s"
        targets += [
            Target(f"{what}, posix_metadata=off, cold ≤ 1/5 of s3fs", READ, f(off, cold), ref("s3fs", cold, "s3fs"),
                   0.2, at_least=False),
            Target(f"{what}, posix_metadata=off, cold ahead of rclone --use-server-modtime", READ, f(off, cold),
                   ref("rclone-modtime", cold, "rclone server-modtime"), 1.0, at_least=False),
            Target(f"{what}, posix_metadata=off, warm ≤ {warm_goal:g} s", READ, f(off, warm), NONE, warm_goal,
                   at_least=False, absolute=True),
            Target(f"{what}, POSIX metadata on, cold within 1.25× of raw LISTs + HEADs ×16", READ, f(lus, cold),
                   _sum("raw LISTs + HEADs ×16", f("raw", raw_list), f("raw", raw_head)), 1.25, at_least=False),
        ]  # fmt: skip
    targets += [
        Target("find+stat of the tree, POSIX metadata on, cold ≤ 1.1× the endpoint's HEAD floor", ISSUE13,
               f(lus, "find_cold_s"), ref("raw", "raw_tree_head16_s", "raw HEADs ×16"), 1.1, at_least=False),
        Target("find+stat of the tree, POSIX metadata on, cold ahead of s3fs", ISSUE13, f(lus, "find_cold_s"),
               ref("s3fs", "find_cold_s", "s3fs"), 1.0, at_least=False),
    ]  # fmt: skip
    for key, label in ((lus, "POSIX metadata on"), (off, "posix_metadata=off")):
        targets.append(Target(f"ls -l of the wide directory, {label}, cold ahead of every peer", ISSUE13,
                              f(key, "ls_cold_s"), best_of(PEERS, "ls_cold_s", lowest=True), 1.0,
                              at_least=False))  # fmt: skip
    targets.append(Target("ls -l of the wide directory, POSIX metadata on, warm ≤ rclone (the faster of the two)",
                          ISSUE13, f(lus, "ls_warm_s"), best_of(RCLONES, "ls_warm_s", lowest=True), 1.0,
                          at_least=False))  # fmt: skip
    for key, label in ((lus, "POSIX metadata on"), (off, "posix_metadata=off")):
        targets.append(Target(f"small-file cat ≥ 85% of raw 4 KiB GETs ×8 ({label})", BOTH, f(key, "cat_fps"),
                              ref("raw", "raw_small_get8_fps", "raw GETs ×8"), 0.85, at_least=True))  # fmt: skip
    targets += [
        Target("write → visible in S3 with export_delay=0 ahead of s3fs (MB/s)", ISSUE13,
               f(lus, "write_delay0_mbps"), ref("s3fs", "write_mbps", "s3fs"), 1.0, at_least=True),
        Target(f"write → visible in S3, default export_delay: close to visible ≤ {EXPORT_DELAY:g} + 1 s", ISSUE13,
               f(lus, "write_visible_s"), NONE, EXPORT_DELAY + 1.0, at_least=False, absolute=True),
        Target("first-byte latency ≤ 2× raw 4 KiB ranged GET latency", READ, f(lus, "latency_ms"),
               ref("raw", "raw_latency_ms", "raw ranged GET"), 2.0, at_least=False),
        Target("4 KiB random read (open + pread) ≤ 2× raw 4 KiB ranged GET latency", ISSUE13,
               f(lus, "random_read_ms"), ref("raw", "raw_latency_ms", "raw ranged GET"), 2.0, at_least=False),
    ]  # fmt: skip
    return [t.evaluate() for t in targets]
