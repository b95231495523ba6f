"""The mount's durable state: the namespace loaded from S3 (shared tables) and the data cache index (local).

The embedded engine keeps both in one SQLite file. The cluster engine keeps the shared tables in PostgreSQL
(lustrefs.store.pg, which turns ``SHARED_SCHEMA`` into its types) and the local ones in each host's SQLite file.
The stores' SQL is written in the dialect both engines accept, with ``?`` placeholders. Only the trio thread
touches a connection (the one-owner rule); no worker thread ever sees it.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

SCHEMA_VERSION = 6

# Settings of the state: the schema version and the values the cache layout depends on. In both parts.
_SETTINGS = """
CREATE TABLE IF NOT EXISTS settings (
    name       TEXT PRIMARY KEY,                  -- setting name
    value      TEXT NOT NULL                      -- its value
);
"""

# The namespace and its export state: one host's (SQLite), or every host's of a cluster (PostgreSQL).
SHARED_SCHEMA = (
    """
-- One row per file, directory, symlink, FIFO, socket or device node the mount knows. Rows are created lazily,
-- when their parent directory is first listed; inode numbers are never reused (AUTOINCREMENT).
CREATE TABLE IF NOT EXISTS inodes (
    ino        INTEGER PRIMARY KEY AUTOINCREMENT, -- inode number given to the kernel; root is 1
    parent     INTEGER NOT NULL,                  -- inode of the parent directory (the root is its own parent)
    name       TEXT NOT NULL,                     -- entry name in the parent ('' for the root)
    mode       INTEGER NOT NULL,                  -- st_mode: type bits and permission bits
    uid        INTEGER NOT NULL,                  -- st_uid
    gid        INTEGER NOT NULL,                  -- st_gid
    size       INTEGER NOT NULL,                  -- st_size: file size with local writes; symlinks: target length
    mtime_ns   INTEGER NOT NULL,                  -- st_mtime in ns: file-mtime metadata, else Last-Modified
    atime_ns   INTEGER NOT NULL,                  -- st_atime in ns: file-atime metadata, else mtime
    ctime_ns   INTEGER NOT NULL,                  -- st_ctime in ns: when the row was created or its attributes set
    key        TEXT NOT NULL,                     -- S3 key of the file's clean data ('' if none), or the prefix ending
                                                  -- in '/' that lists a directory
    etag       TEXT,                              -- ETag of that object; GETs pinned to it (If-Match); NULL: none
    src_limit  INTEGER NOT NULL DEFAULT 0,        -- bytes of that object that are the file's data (less after truncate)
    meta_etag  TEXT,                              -- ETag whose POSIX metadata is applied; NULL = HEAD pending
    listed     INTEGER NOT NULL DEFAULT 0,        -- directories: 1 once every entry has been loaded from S3
    target     TEXT,                              -- symlinks: the target, once read from the object body
    dirty      INTEGER NOT NULL DEFAULT 0,        -- export needed: 1 data (local parts are authoritative), 2 metadata
    data_gen   INTEGER NOT NULL DEFAULT 0,        -- bumped by each local change; export clears dirty if unchanged
    exported_key TEXT,                            -- key where the entry was last exported (or imported, when the export
                                                  -- prefix is the import prefix); NULL: not in the export prefix
    import_etag TEXT,                             -- ETag of the object at this path when last imported ('' for a
                                                  -- directory from a listing); NULL: created or moved here locally
    rdev       INTEGER NOT NULL DEFAULT 0,        -- st_rdev of a character or block device (0 for the others)
    link_of    INTEGER,                           -- hard links: the inode whose data and attributes this name shares
                                                  -- (its row holds them; here only the name and its export state:
                                                  -- parent, name, dirty, data_gen, exported_key, import_etag, and
                                                  -- etag = the ETag of this name's exported object). NULL: the row
                                                  -- is an inode itself (and, unless orphaned, its first name)
    holder     TEXT,                              -- cluster engine: the host whose cache has this file's data not
                                                  -- yet in shared storage (written, not closed), or that holds it
                                                  -- open once unlinked (parent 0). NULL: none; always NULL embedded
    UNIQUE (parent, name)
);

-- Names removed locally whose objects may still be in S3: the importer does not bring them back.
CREATE TABLE IF NOT EXISTS whiteouts (
    parent     INTEGER NOT NULL,                  -- directory inode
    name       TEXT NOT NULL,                     -- removed name
    PRIMARY KEY (parent, name)
);
CREATE INDEX IF NOT EXISTS inodes_dirty ON inodes (dirty) WHERE dirty != 0;
-- A directory's entries in inode (listing) order: readdir pages and the small-file prefetch read one page of
-- them, not the whole directory (without it each page of a 100,000-entry directory scanned all its entries).
CREATE INDEX IF NOT EXISTS inodes_children ON inodes (parent, ino);
-- The subdirectories of each directory: a directory's link count (st_nlink) reads only them.
CREATE INDEX IF NOT EXISTS inodes_subdirs ON inodes (parent) WHERE (mode & 61440) = 16384;
-- The export ledger's look-ups: who is exported at a key, who reads its clean data from a key.
CREATE INDEX IF NOT EXISTS inodes_exported_key ON inodes (exported_key) WHERE exported_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS inodes_key ON inodes (key);
-- The other names of each hard-linked inode (its link count, the names an inode change makes dirty).
CREATE INDEX IF NOT EXISTS inodes_links ON inodes (link_of) WHERE link_of IS NOT NULL;

-- Keys to delete from the export prefix (unlinked or renamed entries), durable until done.
CREATE TABLE IF NOT EXISTS pending_deletes (
    key        TEXT PRIMARY KEY,                  -- S3 key to delete
    since_ns   INTEGER NOT NULL                   -- when the deletion was recorded
);

-- Keys an export may be writing right now (PUT, COPY or multipart upload): recorded before the request is sent
-- and removed in the transaction that records its outcome, so a crash never leaves an object nobody knows of.
-- Every object lustrefs may have created in the export prefix is an entry's exported_key, an intent here, or a
-- pending delete (lustrefs.store.exports owns these three).
CREATE TABLE IF NOT EXISTS export_intents (
    key        TEXT PRIMARY KEY,                  -- S3 key being written (one request per key at a time)
    ino        INTEGER NOT NULL,                  -- inode being exported there
    since_ns   INTEGER NOT NULL                   -- when the request was started
);
"""
    + _SETTINGS
)

# The data cache index: always in the host's own SQLite file.
LOCAL_SCHEMA = (
    """
-- One row per part of file data present in the local cache. A part is `part_size` bytes at offset
-- part * part_size, of one object version (clean, evictable) or of the local data of a dirty file (etag '':
-- never evicted); its file lives on cache target (offset // chunk_size) % targets.
CREATE TABLE IF NOT EXISTS cache_parts (
    ino        INTEGER NOT NULL,                  -- inode of the file the data belongs to
    etag       TEXT NOT NULL,                     -- object version (ETag) the data was fetched at; '' = local data
    part       INTEGER NOT NULL,                  -- part index within the object
    size       INTEGER NOT NULL,                  -- bytes in the part file (a short local part reads as zeros after)
    last_use   INTEGER NOT NULL,                  -- LRU clock value of the last read (evict lowest first)
    PRIMARY KEY (ino, etag, part)
);
CREATE INDEX IF NOT EXISTS cache_parts_lru ON cache_parts (last_use);
"""
    + _SETTINGS
)


class Connection(Protocol):
    """What the stores use of a connection: ``sqlite3.Connection``, or lustrefs.store.pg.PgConnection."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...

    @property
    def in_transaction(self) -> bool: ...


def connect(path: Path, local: bool = False) -> sqlite3.Connection:
    """Open (and create or upgrade) the state database: both parts, or only the ``local`` one (cluster engine)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    version = _version(conn)
    if version in (2, 3, 4, 5) and not local:
        # Version 3 added export_intents (created below), version 4 the device number of inodes, version 5 the
        # names of hard links, version 6 the cluster's holder of a file.
        if version < 4:
            conn.execute("ALTER TABLE inodes ADD COLUMN rdev INTEGER NOT NULL DEFAULT 0")
        if version < 5:
            conn.execute("ALTER TABLE inodes ADD COLUMN link_of INTEGER")
        conn.execute("ALTER TABLE inodes ADD COLUMN holder TEXT")
        conn.execute("UPDATE settings SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION),))
    elif version is not None and version < SCHEMA_VERSION:
        # Version 1 was read-only: it holds nothing that S3 cannot give again. Rebuild it.
        log.warning("state database %s is from schema version %d: rebuilding it from S3", path, version)
        conn.executescript("DROP TABLE IF EXISTS inodes; DROP TABLE IF EXISTS cache_parts; DELETE FROM settings;")
    elif version is not None and version > SCHEMA_VERSION:
        raise RuntimeError(f"{path} was written by a newer lustrefs (schema {version}); upgrade lustrefs")
    conn.executescript(LOCAL_SCHEMA if local else SHARED_SCHEMA + LOCAL_SCHEMA)
    conn.execute(
        "INSERT INTO settings (name, value) VALUES ('schema_version', ?) ON CONFLICT DO NOTHING", (str(SCHEMA_VERSION),)
    )
    return conn


def _version(conn: sqlite3.Connection) -> int | None:
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'settings'").fetchone():
        return None
    row = conn.execute("SELECT value FROM settings WHERE name = 'schema_version'").fetchone()
    return int(row[0]) if row else None


@contextlib.contextmanager
def transaction(conn: Connection) -> Iterator[None]:
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


@contextlib.contextmanager
def durable(conn: Connection) -> Iterator[None]:
    """A transaction whose commit is on disk when the block ends (fsync of the WAL), for fsync(2). PostgreSQL's
    commits are (``synchronous_commit`` on, its default)."""
    if not isinstance(conn, sqlite3.Connection):
        with transaction(conn):
            yield
        return
    conn.execute("PRAGMA synchronous=FULL")
    try:
        with transaction(conn):
            yield
    finally:
        conn.execute("PRAGMA synchronous=NORMAL")


def get_setting(conn: Connection, name: str) -> str | None:
    row = conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


def set_setting(conn: Connection, name: str, value: str) -> None:
    conn.execute(
        "INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (name, value),
    )
