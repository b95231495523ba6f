"""The mount's durable local state in SQLite: the namespace loaded from S3 and the data cache index.

Only the trio thread touches the connection (the one-owner rule); no worker thread ever sees it.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

SCHEMA_VERSION = 1

SCHEMA = """
-- One row per file, directory or symlink the mount knows. Rows are created lazily, when their parent
-- directory is first listed; inode numbers are never reused (AUTOINCREMENT).
CREATE TABLE IF NOT EXISTS inodes (
    ino        INTEGER PRIMARY KEY AUTOINCREMENT, -- inode number given to the kernel; root is 1
    parent     INTEGER NOT NULL,                  -- inode of the parent directory (the root is its own parent)
    name       TEXT NOT NULL,                     -- entry name in the parent ('' for the root)
    mode       INTEGER NOT NULL,                  -- st_mode: type bits and permission bits
    uid        INTEGER NOT NULL,                  -- st_uid
    gid        INTEGER NOT NULL,                  -- st_gid
    size       INTEGER NOT NULL,                  -- st_size: object size (files), target length (symlinks)
    mtime_ns   INTEGER NOT NULL,                  -- st_mtime in ns: file-mtime metadata, else Last-Modified
    atime_ns   INTEGER NOT NULL,                  -- st_atime in ns: file-atime metadata, else mtime
    ctime_ns   INTEGER NOT NULL,                  -- st_ctime in ns: when the row was created or its attributes set
    key        TEXT NOT NULL,                     -- S3 key: the object's (files), the prefix ending in '/' (dirs)
    etag       TEXT,                              -- ETag seen when listed; reads are pinned to it (If-Match)
    meta_etag  TEXT,                              -- ETag whose POSIX metadata is applied; NULL = HEAD pending
    listed     INTEGER NOT NULL DEFAULT 0,        -- directories: 1 once every entry has been loaded from S3
    target     TEXT,                              -- symlinks: the target, once read from the object body
    UNIQUE (parent, name)
);

-- One row per part of object data present in the local cache. A part is `part_size` bytes of one object
-- version at offset part * part_size; its file lives on cache target (offset // chunk_size) % targets.
CREATE TABLE IF NOT EXISTS cache_parts (
    ino        INTEGER NOT NULL,                  -- inode of the file the data belongs to
    etag       TEXT NOT NULL,                     -- object version (ETag) the data was fetched at
    part       INTEGER NOT NULL,                  -- part index within the object
    size       INTEGER NOT NULL,                  -- bytes in the part file (the last part may be short)
    last_use   INTEGER NOT NULL,                  -- LRU clock value of the last read (evict lowest first)
    PRIMARY KEY (ino, etag, part)
);
CREATE INDEX IF NOT EXISTS cache_parts_lru ON cache_parts (last_use);

-- Settings of the state: schema version and the values the cache layout depends on.
CREATE TABLE IF NOT EXISTS settings (
    name       TEXT PRIMARY KEY,                  -- setting name
    value      TEXT NOT NULL                      -- its value
);
"""


def connect(path: Path) -> sqlite3.Connection:
    """Open (and create or upgrade) the state database."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    conn.execute("INSERT OR IGNORE INTO settings (name, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """Run the block in one transaction (the connection is in autocommit mode otherwise); nests as a no-op."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def get_setting(conn: sqlite3.Connection, name: str) -> str | None:
    row = conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


def set_setting(conn: sqlite3.Connection, name: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO settings (name, value) VALUES (?, ?)", (name, value))
