"""A snapshot of a mount's counters, read through the mount's control file (the ``stats`` request)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lustrefs.data.cache import Cache
from lustrefs.tree.namespace import Namespace


@dataclass
class FuseCounters:
    """Counts of FUSE requests kept by the request handlers (lustrefs.daemon.fs)."""

    # getxattr, setxattr, listxattr and removexattr that reached the daemon. They are answered ENOSYS, after which
    # the kernel sends no more of that kind on the connection: at most one of each per mount.
    xattr_requests: int = 0


def snapshot(ns: Namespace, cache: Cache, fuse: FuseCounters | None = None) -> dict[str, Any]:
    """Requests made, cache use per target, hits and misses, inode count, FUSE request counts."""
    return {
        "requests": dict(ns.repo.requests),
        # GETs and HEADs answered by the fast path, and those it left to boto3 (errors, retries; lustrefs.s3.fastpath)
        "fast_path": {"answered": fast.answered, "passed": fast.passed} if (fast := ns.repo.fast) else None,
        "cache": {
            "capacity": cache.capacity,
            "used": cache.held,
            "writing": cache.writing,  # bytes fetched (and served from memory) not yet written to disk
            "targets": [
                {"path": str(t), "used": u} for t, u in zip(cache.targets, cache.usage_by_target(), strict=True)
            ],
            "hits": cache.stats.hits,
            "misses": cache.stats.misses,
            "bytes_fetched": cache.stats.bytes_fetched,
            "evictions": cache.stats.evictions,
            "direct_reads": cache.stats.direct_reads,
            "reads": cache.stats.reads,
            "read_bytes": cache.stats.read_bytes,
            "memory_hits": cache.stats.memory_hits,
        },
        "inodes": ns.count(),
        "fuse": asdict(fuse or FuseCounters()),
    }
