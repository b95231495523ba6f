"""The values the data cache works on and hands out: object versions, file data, counters, buffers.

Owns no state and has no await points.
"""

from __future__ import annotations

from dataclasses import dataclass

Buffer = bytes | bytearray | memoryview  # what reads return: memoryviews of fetched data are answered without a copy


@dataclass(frozen=True)
class ObjectVersion:
    """What a read is pinned to: one version (ETag) of one object."""

    ino: int
    key: str
    etag: str
    size: int


@dataclass(frozen=True)
class FileData:
    """What reads and writes of one file work on: local parts over the file's clean data in S3.

    Byte ``i`` of the file is, in order of precedence: the local part holding it (``local``), the source object
    when ``i < source.size`` (``source.size`` is the number of valid bytes, less than the object after a
    truncate), else zero.
    """

    ino: int
    size: int
    source: ObjectVersion | None
    local: bool


@dataclass
class CacheStats:
    hits: int = 0  # parts read that were present
    misses: int = 0  # parts that had to be fetched
    bytes_fetched: int = 0
    evictions: int = 0
    direct_reads: int = 0  # small reads answered by their own GET while their part was fetched
    reads: int = 0  # reads of file data (FUSE read requests and exports)
    read_bytes: int = 0
    memory_hits: int = 0  # parts read from the in-memory set of recent GETs


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first leaf of a nursery's exception group (callers map one error to one errno)."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def joined(pieces: list[Buffer]) -> Buffer:
    """One buffer of ``pieces``, without a copy when there is only one."""
    pieces = [p for p in pieces if len(p)]
    if len(pieces) == 1:
        return pieces[0]
    return b"".join(pieces)
