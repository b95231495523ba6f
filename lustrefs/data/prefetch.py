"""Reading ahead of the reader: a growing window per open file, and the next small files of a directory.

Per open file: a read that continues where the previous one ended is sequential, and doubles the read-ahead
window (from one part up to ``max_window``); a read far from the previous one resets it. The window ahead
of the reader is handed to the cache, which fills it with concurrent ranged GETs in the background.

Per directory: opening files of one directory in increasing inode order (listing order, as ``cat *`` or a
loader walking a directory does) fetches the next few small files whole, so small-file scans do not pay
one blocking GET per ``open``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cachetools

from lustrefs.data.cache import Cache, ObjectVersion


@dataclass
class ReadAhead:
    """Sequential-read detector and read-ahead window of one open file."""

    initial: int
    maximum: int
    next_off: int = 0  # where a sequential read would start
    window: int = 0
    ahead_to: int = 0  # end of what has been handed to the cache already

    def plan(self, off: int, size: int, file_size: int) -> tuple[int, int] | None:
        """Register a read; returns the byte range to fetch ahead, or None."""
        if off == self.next_off and off > 0:
            self.window = min(max(self.window * 2, self.initial), self.maximum)
        elif abs(off - self.next_off) > self.maximum or self.window == 0:
            self.window = self.initial if off == 0 else 0  # a random read: no read-ahead until it proves sequential
            self.ahead_to = off + size
        self.next_off = off + size
        end = min(self.next_off + self.window, file_size)
        start = max(self.ahead_to, self.next_off)
        if end <= start or (start > self.next_off and end - start < self.window // 2 and end < file_size):
            return None  # enough is on its way: ask again for a big range (few, large GETs), not a sliver
        self.ahead_to = end
        return start, end


class Prefetcher:
    """Decides what to fetch ahead; the cache does the fetching."""

    def __init__(self, cache: Cache, max_window: int, small_file: int, files_ahead: int) -> None:
        self.cache = cache
        self.max_window = max_window
        self.small_file = small_file
        self.files_ahead = files_ahead
        # directory inode -> inode of the last file opened in it
        self._last_open: cachetools.LRUCache[int, int] = cachetools.LRUCache(maxsize=10_000)

    def new_handle(self) -> ReadAhead:
        return ReadAhead(initial=self.cache.part_size, maximum=self.max_window)

    def on_read(self, ra: ReadAhead, obj: ObjectVersion, off: int, size: int) -> None:
        rng = ra.plan(off, size, obj.size)
        if rng is not None:
            self.cache.prefetch(obj, *rng)  # what is missing comes from S3,
            self.cache.warm(obj, *rng)  # what is on disk into the page cache, ahead of the reader

    def on_open(self, parent: int, ino: int, siblings: Callable[[int], list[ObjectVersion]]) -> None:
        """A file was opened; ``siblings(n)`` gives the next ``n`` files of its directory in listing order."""
        last = self._last_open.get(parent)
        self._last_open[parent] = ino
        if last is None or ino <= last:
            return  # not a forward scan (yet)
        for obj in siblings(self.files_ahead):
            if obj.size <= self.small_file:
                self.cache.prefetch(obj, 0, obj.size)
