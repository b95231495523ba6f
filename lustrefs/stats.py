"""A snapshot of a mount's counters, read through the mount as the ``user.lustrefs.stats`` xattr."""

from __future__ import annotations

from typing import Any

from .cache import Cache
from .namespace import Namespace


def snapshot(ns: Namespace, cache: Cache) -> dict[str, Any]:
    """Requests made, cache use per target, hits and misses, inode count."""
    return {
        "requests": dict(ns.repo.requests),
        "cache": {
            "capacity": cache.capacity,
            "used": cache.used,
            "targets": [
                {"path": str(t), "used": u} for t, u in zip(cache.targets, cache.usage_by_target(), strict=True)
            ],
            "hits": cache.stats.hits,
            "misses": cache.stats.misses,
            "bytes_fetched": cache.stats.bytes_fetched,
            "evictions": cache.stats.evictions,
            "direct_reads": cache.stats.direct_reads,
        },
        "inodes": ns.count(),
    }
