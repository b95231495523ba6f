"""The export ledger: the only code that writes the export state of entries in SQLite.

The columns and tables it owns: ``inodes.dirty`` and ``inodes.exported_key``, the location of a file's clean
data after an export (``key``, ``etag``, ``src_limit``, ``import_etag``), ``export_intents`` and
``pending_deletes``. lustrefs.sync.exporter drives the state machine below through it; lustrefs.tree.namespace reports
local changes and removals to it. Every method runs in the caller's transaction.

The life of one export of an entry (docs/SEMANTICS.md, "Export")::

    clean --local change--> dirty --begin--> uploading --record--> clean (or dirty again if it changed meanwhile)
                                                  |                     old key -> pending delete -> DELETE
                                                  +--abandon (failure, crash at the next start)--> dirty

Invariant: every object lustrefs may have created in the export prefix is named by a live entry's
``exported_key``, by an intent (a request may be writing it) or by a pending delete. An intent is written
before its request is sent, so an unlink, a rename or a crash at any moment leaves the key known durably, and
the final tree decides whether it is kept (it is some live entry's ``exported_key``) or deleted.
"""

from __future__ import annotations

import collections
import time

from lustrefs.constants import STAGING_NAME
from lustrefs.store import db
from lustrefs.store.inodes import ORPHAN, ROW, Inode

MAX_CHANGES = 100_000  # keys whose last change the ledger remembers in memory (for importers' stale listings)
DATA, META = 1, 2  # dirty flags: content to export, attributes or name to export


class ExportLedger:
    """Durable export state on the mount's connection (the trio thread's)."""

    def __init__(self, conn: db.Connection) -> None:
        self.conn = conn
        # In memory: a clock of this mount's writes and deletions in the export prefix, and each key's last one.
        # A listing taken before a change must not decide about that key (lustrefs.sync.importer).
        self.clock = 0
        self._changes: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._forgotten = 0  # the clock of the newest change no longer remembered

    def _changed(self, key: str) -> None:
        self.clock += 1
        self._changes[key] = self.clock
        self._changes.move_to_end(key)
        if len(self._changes) > MAX_CHANGES:
            self._forgotten = self._changes.popitem(last=False)[1]

    def changed_since(self, clock: int) -> set[str] | None:
        """Keys this mount wrote, deleted or queued for deletion after ``clock``; None if it cannot tell."""
        if clock < self._forgotten:
            return None
        out = set()
        for key, at in reversed(self._changes.items()):
            if at <= clock:
                break
            out.add(key)
        return out

    # ------------------------------------------------------------------------------------- local changes

    def mark_dirty(self, ino: int, flags: int) -> None:
        """A local change of ``ino``: it needs exporting (``data_gen`` counts the changes), under each of its
        names if it is an inode with hard links; only that name if it is a hard link's row."""
        self.conn.execute(
            "UPDATE inodes SET dirty = dirty | ?, data_gen = data_gen + 1, ctime_ns = ? WHERE ino = ? OR link_of = ?",
            (flags, time.time_ns(), ino, ino),
        )

    def mark_moved(self, ino: int) -> None:
        """The name ``ino`` moved (a rename, or a directory above it renamed): it is exported at its new key."""
        self.conn.execute("UPDATE inodes SET dirty = dirty | ?, data_gen = data_gen + 1 WHERE ino = ?", (META, ino))

    def take_name(self, ino: int, link: Inode) -> None:
        """Inode ``ino`` lost its own name and takes the name of its hard link ``link`` (whose row goes): the
        export state of that name comes along. If both are clean, the link's object holds the inode's data: it
        becomes the clean data, so nothing is read from the object of the name removed."""
        inode = self.conn.execute("SELECT dirty, size FROM inodes WHERE ino = ?", (ino,)).fetchone()
        if link.dirty == 0 and inode[0] & DATA == 0 and link.etag is not None:
            self.conn.execute(
                "UPDATE inodes SET key = ?, etag = ?, src_limit = ? WHERE ino = ?",
                (link.exported_key, link.etag, inode[1], ino),
            )
        self.conn.execute(
            "UPDATE inodes SET exported_key = ?, dirty = dirty | ?, data_gen = data_gen + 1 WHERE ino = ?",
            (link.exported_key, link.dirty, ino),
        )

    def detach(self, ino: int, exported_key: str | None) -> None:
        """``ino`` left the tree (unlink, rmdir, replaced by a rename): its object is deleted from the export
        prefix. Its dirty flags stay: an open handle keeps reading its local data until it is purged."""
        if exported_key:
            self.queue_delete(exported_key)
        self.conn.execute("UPDATE inodes SET exported_key = NULL WHERE ino = ?", (ino,))

    def forget_object(self, ino: int) -> None:
        """The object of ``ino`` was deleted in S3 by someone else: nothing of it is left to delete."""
        self.conn.execute("UPDATE inodes SET exported_key = NULL WHERE ino = ?", (ino,))

    # ------------------------------------------------------------------------------------- the export

    def dirty_inodes(self, host: str | None = None) -> list[tuple[int, int]]:
        """(ino, data_gen) of every live entry that needs exporting and whose data is in shared storage or in
        ``host``'s cache (cluster engine; a hard link's name follows its inode's holder)."""
        return self.conn.execute(
            "SELECT i.ino, i.data_gen FROM inodes AS i JOIN inodes AS n ON n.ino = coalesce(i.link_of, i.ino)"
            " WHERE i.dirty != 0 AND i.parent != ? AND (n.holder IS NULL OR n.holder = ?)",
            (ORPHAN, host),
        ).fetchall()

    def count_dirty(self) -> int:
        return self.conn.execute("SELECT count(*) FROM inodes WHERE dirty != 0 AND parent != ?", (ORPHAN,)).fetchone()[
            0
        ]

    def mark_clean(self, ino: int) -> None:
        """Nothing of ``ino`` is exported (the root): it is clean."""
        self.conn.execute("UPDATE inodes SET dirty = 0 WHERE ino = ?", (ino,))

    def begin(self, ino: int, key: str) -> None:
        """An export of ``ino`` to ``key`` is about to send its request: record the intent first.

        A deletion of ``key`` still queued is void (the export replaces the object), and another entry that was
        exported to ``key`` before (it has been renamed or removed since) no longer has its object there.
        """
        self._changed(key)
        self.conn.execute(
            "INSERT INTO export_intents (key, ino, since_ns) VALUES (?, ?, ?)", (key, ino, time.time_ns())
        )
        self.conn.execute("DELETE FROM pending_deletes WHERE key = ?", (key,))
        self.conn.execute("UPDATE inodes SET exported_key = NULL WHERE exported_key = ? AND ino != ?", (key, ino))

    def abandon(self, key: str) -> None:
        """The request writing ``key`` failed, or a crash left its outcome unknown: the object may exist. It is
        deleted unless a live entry is exported there (its next export writes it again)."""
        self._changed(key)
        self.conn.execute("DELETE FROM export_intents WHERE key = ?", (key,))
        if not self.live(key):
            self.queue_delete(key)

    def record(self, ino: int, key: str, gen: int, data: tuple[str, int] | None, import_is_export: bool) -> bool:
        """The export of ``ino`` at ``data_gen`` ``gen`` wrote ``key``; returns whether the entry is now clean.

        ``data``: (ETag, size) of a file's new object, which becomes its clean data. The previous key of the
        entry, if any other, is queued for deletion in the same transaction: the new key is durable before the
        old one can go.
        """
        row = self.conn.execute(
            "SELECT exported_key, data_gen, src_limit, link_of FROM inodes WHERE ino = ?", (ino,)
        ).fetchone()
        self._changed(key)
        self.conn.execute("DELETE FROM export_intents WHERE key = ?", (key,))
        old, unchanged = row[0], row[1] == gen
        self.conn.execute("UPDATE inodes SET exported_key = ? WHERE ino = ?", (key, ino))
        if old and old != key and not self.live(old):
            self.queue_delete(old)
        if data is not None and row[3] is not None:  # a hard link's name: its object, not the inode's data
            self.conn.execute("UPDATE inodes SET etag = ? WHERE ino = ?", (data[0], ino))
            if import_is_export:
                self.conn.execute("UPDATE inodes SET import_etag = ? WHERE ino = ?", (data[0], ino))
        elif data is not None:
            etag, size = data
            limit = size if unchanged else min(size, row[2])
            self.conn.execute(
                "UPDATE inodes SET key = ?, etag = ?, src_limit = ? WHERE ino = ?", (key, etag, limit, ino)
            )
            if import_is_export:  # the object at this path is now this export
                self.conn.execute("UPDATE inodes SET import_etag = ? WHERE ino = ?", (etag, ino))
        if unchanged:
            self.conn.execute("UPDATE inodes SET dirty = 0 WHERE ino = ?", (ino,))
        return unchanged

    def staged(self, ino: int, data: tuple[str, str, int] | None, gen: int, replaced: str | None = None) -> None:
        """Cluster engine: the data of ``ino`` is in shared storage, ``data`` = (staging key, ETag, size), its
        clean data until its export copies it to its key (dirty turns from DATA to META: the bytes are clean, the
        object at its key is still to be written); None: it has no data to stage. No host holds it any more.
        The intent of the staging key goes; ``replaced``, the staging object it had before, is deleted."""
        if data is not None:
            key, etag, size = data
            self._changed(key)
            self.conn.execute("DELETE FROM export_intents WHERE key = ?", (key,))
            self.conn.execute(
                "UPDATE inodes SET key = ?, etag = ?, src_limit = ?, dirty = (dirty & ~?) | ? WHERE ino = ?",
                (key, etag, size, DATA, META, ino),
            )
            if replaced:
                self.queue_delete(replaced)
        self.conn.execute("UPDATE inodes SET holder = NULL WHERE ino = ? AND data_gen = ?", (ino, gen))

    def purged(self, row: Inode) -> None:
        """Inode ``row`` leaves for good: if its clean data is a staging object of the cluster engine (no other
        entry ever reads it), that object is deleted."""
        if row.key.startswith(STAGING_NAME + "/"):
            self.queue_delete(row.key)

    def relocate(self, ino: int, key: str, etag: str) -> None:
        """The clean data of ``ino`` is the object ``key`` at ``etag`` (a lost copy source, found again)."""
        self.conn.execute("UPDATE inodes SET key = ?, etag = ? WHERE ino = ?", (key, etag, ino))

    def intents(self) -> list[tuple[str, int]]:
        """(key, since_ns) of the requests in flight (this run's, another host's, or left by an earlier run)."""
        return [(r[0], r[1]) for r in self.conn.execute("SELECT key, since_ns FROM export_intents ORDER BY since_ns")]

    # ------------------------------------------------------------------------------------- deletions

    def live(self, key: str) -> bool:
        """Whether a live entry is exported at ``key``."""
        return (
            self.conn.execute(
                "SELECT 1 FROM inodes WHERE exported_key = ? AND parent != ? LIMIT 1", (key, ORPHAN)
            ).fetchone()
            is not None
        )

    def queue_delete(self, key: str) -> None:
        self._changed(key)
        self.conn.execute(
            "INSERT INTO pending_deletes (key, since_ns) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET since_ns = excluded.since_ns",
            (key, time.time_ns()),
        )

    def pending_deletes(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT key FROM pending_deletes ORDER BY since_ns")]

    def count_pending_deletes(self) -> int:
        return self.conn.execute("SELECT count(*) FROM pending_deletes").fetchone()[0]

    def any_pending_delete(self) -> bool:
        return self.conn.execute("SELECT 1 FROM pending_deletes LIMIT 1").fetchone() is not None

    def deleted(self, key: str) -> None:
        """The deletion of ``key`` is done (or void: the policy refuses it, or a live entry is there)."""
        self._changed(key)
        self.conn.execute("DELETE FROM pending_deletes WHERE key = ?", (key,))

    def own_keys_under(self, prefix: str) -> set[str]:
        """Keys under ``prefix`` that are this mount's own objects on their way in or out (an intent or a pending
        delete): an import must not take them for another writer's objects."""
        hi = prefix + "\U0010ffff"
        rows = self.conn.execute(
            "SELECT key FROM pending_deletes WHERE key >= ? AND key < ?"
            " UNION SELECT key FROM export_intents WHERE key >= ? AND key < ?",
            (prefix, hi, prefix, hi),
        )
        return {r[0] for r in rows}

    def readers_of(self, key: str) -> list[Inode]:
        """Entries (live, or unlinked) whose clean data is the object ``key`` and that have bytes to read from it."""
        sql = f"SELECT {ROW} FROM inodes WHERE key = ? AND etag IS NOT NULL AND src_limit > 0 AND (dirty & ?) = 0"
        return [Inode(*r) for r in self.conn.execute(sql, (key, DATA))]
