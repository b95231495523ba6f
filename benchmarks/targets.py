"""The read-performance issue's targets, evaluated on the figures of one run (ratios within the run)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .report import Results

PEERS = ("s3fs", "rclone", "rclone-modtime")


@dataclass(frozen=True)
class Target:
    """``value`` compared with ``reference``: ratio value/reference at least/at most ``bound``.

    With ``absolute`` the bound applies to the value itself (e.g. seconds) and the reference is unused.
    """

    name: str
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
        return {"name": self.name, "value": self.value, "reference": ref, "reference_name": ref_name,
                "ratio": None if self.absolute else compared, "goal": goal, "met": met}  # fmt: skip


Ref = tuple[float | None, str]
NONE: Ref = (None, "")


def _best(candidates: list[Ref]) -> Ref:
    """The highest figure present among ``(value, name)`` candidates."""
    present = [c for c in candidates if c[0] is not None]
    return max(present, key=lambda c: c[0] or 0.0) if present else (None, "")


def _sum(name: str, *values: float | None) -> Ref:
    return (None if any(v is None for v in values) else sum(v for v in values if v is not None)), name


def evaluate(results: Results) -> list[dict[str, Any]]:
    """Every target of the issue, with its ratio and whether it is met (None: a figure is missing)."""
    f: Callable[[str, str], float | None] = results.figure
    lus, off = "lustrefs", "lustrefs-nometa"

    def ref(section: str, metric: str, name: str) -> Ref:
        return f(section, metric), name

    raw_reads = (("raw_get_mbps", "whole GET"), ("raw_range4_mbps", "ranged ×4"), ("raw_range8_mbps", "ranged ×8"))
    best_raw = _best([ref("raw", k, f"raw {name}") for k, name in raw_reads])
    best_peer_read = _best([ref(p, "read_cold_mbps", results.systems[p].label) for p in PEERS if p in results.systems])
    targets = [
        Target("cold sequential read ≥ 90% of the best raw boto3 figure", f(lus, "read_cold_mbps"), best_raw,
               0.9, at_least=True),
        Target("cold sequential read ahead of every peer", f(lus, "read_cold_mbps"), best_peer_read, 1.0,
               at_least=True),
        Target("page-cache re-read ≥ 50% of a local page-cache read", f(lus, "read_page_mbps"),
               ref("local", "local_read_page_mbps", "local page-cache read"), 0.5, at_least=True),
        Target("disk-cache re-read ≥ 50% of a cold local-disk read", f(lus, "read_dropped_mbps"),
               ref("local", "local_read_cold_mbps", "local cold read"), 0.5, at_least=True),
    ]  # fmt: skip
    for what, metric, warm_goal, raw_list, raw_head in (
        ("find+stat of the tree", "find", 0.5, "raw_tree_list_lazy_s", "raw_tree_head16_s"),
        ("ls -l of the wide directory", "ls", 0.1, "raw_wide_list_s", "raw_wide_head16_s"),
    ):
        cold, warm = f"{metric}_cold_s", f"{metric}_warm_s"
        targets += [
            Target(f"{what}, posix_metadata=off, cold ≤ 1/5 of s3fs", f(off, cold), ref("s3fs", cold, "s3fs"), 0.2,
                   at_least=False),
            Target(f"{what}, posix_metadata=off, cold ahead of rclone --use-server-modtime", f(off, cold),
                   ref("rclone-modtime", cold, "rclone server-modtime"), 1.0, at_least=False),
            Target(f"{what}, posix_metadata=off, warm ≤ {warm_goal:g} s", f(off, warm), NONE, warm_goal,
                   at_least=False, absolute=True),
            Target(f"{what}, POSIX metadata on, cold within 1.25× of raw LISTs + HEADs ×16", f(lus, cold),
                   _sum("raw LISTs + HEADs ×16", f("raw", raw_list), f("raw", raw_head)), 1.25, at_least=False),
        ]  # fmt: skip
    for key, label in ((lus, "POSIX metadata on"), (off, "posix_metadata=off")):
        targets.append(Target(f"small-file cat ≥ 85% of raw 4 KiB GETs ×8 ({label})", f(key, "cat_fps"),
                              ref("raw", "raw_small_get8_fps", "raw GETs ×8"), 0.85, at_least=True))  # fmt: skip
    targets.append(Target("first-byte latency ≤ 2× raw 4 KiB ranged GET latency", f(lus, "latency_ms"),
                          ref("raw", "raw_latency_ms", "raw ranged GET"), 2.0, at_least=False))  # fmt: skip
    return [t.evaluate() for t in targets]
