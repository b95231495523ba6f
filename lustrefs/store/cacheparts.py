"""The ``cache_parts`` table: the index of the local data cache (lustrefs.data.parts keeps it in memory too).

A part is identified by ``(ino, etag, part)``; ``etag`` '' marks local data (the content of a dirty file).
"""

from __future__ import annotations

import sqlite3

PartKey = tuple[int, str, int]  # (ino, etag, part index)
LOCAL = ""  # the "ETag" of local data: parts written here, authoritative while the file is dirty


class CachePartStore:
    """Typed access to ``cache_parts`` on one connection (in the caller's transaction, if any)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def all(self) -> list[tuple[PartKey, int, int]]:
        """Every part as ``(key, size, last_use)``, least recently used first."""
        rows = self.conn.execute("SELECT ino, etag, part, size, last_use FROM cache_parts ORDER BY last_use")
        return [((ino, etag, part), size, last_use) for ino, etag, part, size, last_use in rows]

    def add(self, key: PartKey, size: int, last_use: int) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO cache_parts (ino, etag, part, size, last_use) VALUES (?, ?, ?, ?, ?)",
            (*key, size, last_use),
        )

    def resize(self, key: PartKey, size: int) -> None:
        self.conn.execute("UPDATE cache_parts SET size = ? WHERE ino = ? AND etag = ? AND part = ?", (size, *key))

    def retag(self, key: PartKey, etag: str) -> None:
        """The part becomes a part of object version ``etag`` (after an export)."""
        self.conn.execute("UPDATE cache_parts SET etag = ? WHERE ino = ? AND etag = ? AND part = ?", (etag, *key))

    def remove(self, key: PartKey) -> None:
        self.conn.execute("DELETE FROM cache_parts WHERE ino = ? AND etag = ? AND part = ?", key)

    def set_last_use(self, uses: list[tuple[PartKey, int]]) -> None:
        """The LRU clock value of each part read since the last flush."""
        self.conn.executemany(
            "UPDATE cache_parts SET last_use = ? WHERE ino = ? AND etag = ? AND part = ?",
            [(last_use, *key) for key, last_use in uses],
        )

    def files_with_local_data(self) -> int:
        """How many files have local data (not exported yet)."""
        return self.conn.execute("SELECT count(DISTINCT ino) FROM cache_parts WHERE etag = ?", (LOCAL,)).fetchone()[0]

    def clear(self) -> None:
        """Forget the whole index (the cache layout changed and no local data is in it)."""
        self.conn.execute("DELETE FROM cache_parts")
