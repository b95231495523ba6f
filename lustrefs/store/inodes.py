"""The ``inodes`` and ``whiteouts`` tables: the tree, its names and attributes, as ``Inode`` records.

lustrefs.tree.namespace changes the tree through this store; lustrefs.sync.importer, lustrefs.daemon.tasks and the
FUSE layer read it. The export state columns (``dirty``, ``exported_key`` and the data location an export records)
are written by lustrefs.store.exports only.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass, fields

from lustrefs.constants import ROOT_INODE
from lustrefs.store import db

ORPHAN = 0  # parent of unlinked inodes still open or known to the kernel
IMPLIED = ""  # meta_etag of an entry whose attributes need no HEAD (no object, or set locally)
_TYPE_BITS = stat.S_IFMT(0xFFFF)  # the file type bits of st_mode, for queries on the type
_IS_DIR = f"(mode & {_TYPE_BITS}) = {stat.S_IFDIR}"  # literal, as the index inodes_subdirs states it


@dataclass(frozen=True, slots=True)
class Inode:
    """One row of ``inodes`` (docs in the schema, lustrefs.store.db)."""

    ino: int
    parent: int
    name: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    key: str
    etag: str | None
    src_limit: int
    meta_etag: str | None
    listed: int
    target: str | None
    dirty: int
    data_gen: int
    exported_key: str | None
    import_etag: str | None
    rdev: int
    link_of: int | None
    holder: str | None
    links: int  # not a column: how many rows name this inode besides its own (its hard links), when read

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_orphan(self) -> bool:
        return self.parent == ORPHAN

    @property
    def node(self) -> int:
        """The inode this name is of (the kernel's inode number): ``link_of`` for a hard link's row."""
        return self.ino if self.link_of is None else self.link_of


# The columns of an Inode, and its link count computed in SQLite with each row (an index probe, no query of its own).
COLUMNS = ", ".join(f.name for f in fields(Inode) if f.name != "links")
ROW = f"{COLUMNS}, (SELECT count(*) FROM inodes AS name WHERE name.link_of = inodes.ino)"
_SELECT = f"SELECT {ROW} FROM inodes"
# Attributes a setattr may change (the FUSE layer's names are the columns').
SETTABLE = frozenset({"mode", "uid", "gid", "size", "atime_ns", "mtime_ns", "src_limit"})


_INSERTED = (
    "parent, name, mode, uid, gid, size, mtime_ns, atime_ns, ctime_ns, key, etag, src_limit, meta_etag,"
    " exported_key, import_etag, rdev, link_of"
)


class NameTaken(Exception):
    """An insert found its name taken: by another host of a cluster, since this one looked."""


def _inode(row: Iterable[object] | None) -> Inode | None:
    return None if row is None else Inode(*row)  # type: ignore[arg-type]


class InodeStore:
    """Typed access to ``inodes`` and ``whiteouts`` on one connection."""

    def __init__(self, conn: db.Connection) -> None:
        self.conn = conn

    # ------------------------------------------------------------------------------------- reading

    def find(self, ino: int) -> Inode | None:
        return _inode(self.conn.execute(f"{_SELECT} WHERE ino = ?", (ino,)).fetchone())

    def child(self, parent: int, name: str) -> Inode | None:
        """The entry ``name`` of directory ``parent`` (the root is nobody's child)."""
        row = self.conn.execute(
            f"{_SELECT} WHERE parent = ? AND name = ? AND ino != ?", (parent, name, ROOT_INODE)
        ).fetchone()
        return _inode(row)

    def children(self, parent: int) -> list[Inode]:
        rows = self.conn.execute(f"{_SELECT} WHERE parent = ? AND ino != ?", (parent, ROOT_INODE))
        return [Inode(*r) for r in rows]

    def child_inos(self, parent: int) -> list[int]:
        rows = self.conn.execute("SELECT ino FROM inodes WHERE parent = ? AND ino != ?", (parent, ROOT_INODE))
        return [r[0] for r in rows]

    def has_children(self, parent: int) -> bool:
        sql = "SELECT 1 FROM inodes WHERE parent = ? AND ino != ? LIMIT 1"
        return self.conn.execute(sql, (parent, ROOT_INODE)).fetchone() is not None

    def page(self, parent: int, after: int, limit: int, hidden: str | None = None) -> list[Inode]:
        """Up to ``limit`` entries of ``parent`` above inode ``after``, in inode (listing) order; ``hidden``: a
        name at the root that is not listed."""
        rows = self.conn.execute(
            f"{_SELECT} WHERE parent = ? AND ino > ? AND ino != ? AND NOT (parent = ? AND name IS NOT DISTINCT FROM ?)"
            " ORDER BY ino LIMIT ?",
            (parent, after, ROOT_INODE, ROOT_INODE, hidden, limit),
        )
        return [Inode(*r) for r in rows]

    def files_after(self, parent: int, ino: int, limit: int) -> list[Inode]:
        """The next ``limit`` regular files of ``parent`` after inode ``ino``, in listing order."""
        rows = self.conn.execute(
            f"{_SELECT} WHERE parent = ? AND ino > ? AND (mode & ?) = ? AND link_of IS NULL ORDER BY ino LIMIT ?",
            (parent, ino, _TYPE_BITS, stat.S_IFREG, limit),
        )
        return [Inode(*r) for r in rows]

    def unlisted_subdirs(self, parent: int) -> list[int]:
        rows = self.conn.execute(
            f"SELECT ino FROM inodes WHERE parent = ? AND listed = 0 AND {_IS_DIR} AND ino != ?", (parent, ROOT_INODE)
        )
        return [r[0] for r in rows]

    def loaded_dirs(self) -> list[tuple[int, int]]:
        """(ino, parent) of live directories listed, or partly known through lookups."""
        rows = self.conn.execute(
            f"SELECT ino, parent FROM inodes AS d WHERE {_IS_DIR} AND parent != ? AND (listed = 1 OR EXISTS"
            " (SELECT 1 FROM inodes AS c WHERE c.parent = d.ino AND c.ino != c.parent))",
            (ORPHAN,),
        )
        return [(r[0], r[1]) for r in rows]

    def awaiting_head(self) -> list[int]:
        """Entries whose POSIX metadata has not been read yet."""
        return [r[0] for r in self.conn.execute("SELECT ino FROM inodes WHERE meta_etag IS NULL")]

    def orphans(self, holder: str | None) -> list[int]:
        """Unlinked inodes held open by ``holder`` (None: the embedded engine's, which has no other host)."""
        sql = "SELECT ino FROM inodes WHERE parent = ? AND holder IS NOT DISTINCT FROM ?"
        return [r[0] for r in self.conn.execute(sql, (ORPHAN, holder))]

    def held(self, holder: str) -> list[int]:
        """Files whose data not yet in shared storage is in ``holder``'s cache (cluster engine)."""
        sql = "SELECT ino FROM inodes WHERE holder = ? AND parent != ?"
        return [r[0] for r in self.conn.execute(sql, (holder, ORPHAN))]

    def count_subdirs(self, parent: int) -> int:
        """How many directories ``parent`` holds (a directory's link count is 2 more)."""
        sql = f"SELECT count(*) FROM inodes WHERE parent = ? AND {_IS_DIR} AND ino != ?"  # the partial index's terms
        return self.conn.execute(sql, (parent, ROOT_INODE)).fetchone()[0]

    def count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM inodes").fetchone()[0]

    def links(self, ino: int) -> list[Inode]:
        """The rows of the other names of ``ino`` (its hard links), oldest first."""
        rows = self.conn.execute(f"{_SELECT} WHERE link_of = ? ORDER BY ino", (ino,))
        return [Inode(*r) for r in rows]

    # ------------------------------------------------------------------------------------- writing

    def insert(
        self,
        *,
        parent: int,
        name: str,
        mode: int,
        owner: tuple[int, int],
        key: str,
        size: int,
        mtime_ns: int,
        ctime_ns: int,
        etag: str | None,
        src_limit: int,
        meta_etag: str | None,
        exported_key: str | None,
        import_etag: str | None,
        ino: int | None = None,
        rdev: int = 0,
        link_of: int | None = None,
    ) -> int:
        """Insert an entry (``link_of``: a new name of that inode); returns its number (never reused)."""
        values = (parent, name, mode, *owner, size, mtime_ns, mtime_ns, ctime_ns, key, etag, src_limit, meta_etag,
                  exported_key, import_etag, rdev, link_of)  # fmt: skip
        columns = _INSERTED if ino is None else "ino, " + _INSERTED
        row = self.conn.execute(
            f"INSERT INTO inodes ({columns}) VALUES ({', '.join('?' * (len(values) + (ino is not None)))})"
            " ON CONFLICT (parent, name) DO NOTHING RETURNING ino",
            values if ino is None else (ino, *values),
        ).fetchone()
        if row is None:  # another host of a cluster created the name first
            raise NameTaken(parent, name)
        return row[0]

    def delete(self, ino: int) -> None:
        self.conn.execute("DELETE FROM inodes WHERE ino = ?", (ino,))

    def move(self, ino: int, parent: int, name: str) -> None:
        """Give ``ino`` a new place in the tree (``ORPHAN`` and ``#ino``: detached)."""
        self.conn.execute("UPDATE inodes SET parent = ?, name = ? WHERE ino = ?", (parent, name, ino))

    def set_holder(self, ino: int, holder: str | None) -> None:
        self.conn.execute("UPDATE inodes SET holder = ? WHERE ino = ?", (holder, ino))

    def relist(self, ino: int, key: str) -> None:
        """A directory is listed again from S3 at ``key`` (an association now links it)."""
        self.conn.execute("UPDATE inodes SET listed = 0, key = ? WHERE ino = ?", (key, ino))

    def set_listed(self, ino: int) -> None:
        self.conn.execute("UPDATE inodes SET listed = 1 WHERE ino = ?", (ino,))

    def set_target(self, ino: int, target: str, size: int) -> None:
        self.conn.execute("UPDATE inodes SET target = ?, size = ? WHERE ino = ?", (target, size, ino))

    def separate(self, ino: int, node: Inode) -> None:
        """A hard link's name becomes an inode of its own (another writer replaced its object in S3), with the
        attributes of ``node`` until its object's are read."""
        self.conn.execute(
            "UPDATE inodes SET link_of = NULL, mode = ?, uid = ?, gid = ? WHERE ino = ?",
            (node.mode, node.uid, node.gid, ino),
        )

    def set_ctime(self, ino: int, ctime_ns: int) -> None:
        self.conn.execute("UPDATE inodes SET ctime_ns = ? WHERE ino = ?", (ctime_ns, ino))

    def set_times(self, ino: int, mtime_ns: int, ctime_ns: int) -> None:
        self.conn.execute("UPDATE inodes SET mtime_ns = ?, ctime_ns = ? WHERE ino = ?", (mtime_ns, ctime_ns, ino))

    def set_attrs(self, ino: int, changes: dict[str, int]) -> None:
        """Set some of ``SETTABLE`` (a setattr)."""
        assert changes and set(changes) <= SETTABLE, changes
        sets = ", ".join(f"{column} = ?" for column in changes)
        self.conn.execute(f"UPDATE inodes SET {sets} WHERE ino = ?", (*changes.values(), ino))

    def wrote(self, ino: int, end: int, now_ns: int) -> None:
        """Data was written up to ``end``: size, mtime, ctime and the change counter (of every name's export)."""
        self.conn.execute(
            "UPDATE inodes SET size = CASE WHEN size > ? THEN size ELSE ? END, mtime_ns = ?, ctime_ns = ?,"
            " data_gen = data_gen + 1 WHERE ino = ?",
            (end, end, now_ns, now_ns, ino),
        )
        self.conn.execute("UPDATE inodes SET data_gen = data_gen + 1 WHERE link_of = ?", (ino,))

    def set_meta_implied(self, ino: int) -> None:
        """No object to read attributes from (an implied directory, a file deleted since it was listed)."""
        self.conn.execute("UPDATE inodes SET meta_etag = ? WHERE ino = ?", (IMPLIED, ino))

    def apply_meta(
        self,
        ino: int,
        *,
        mode: int,
        rdev: int,
        owner: tuple[int, int],
        mtime_ns: int,
        atime_ns: int,
        size: int,
        etag: str | None,
        meta_etag: str,
        ctime_ns: int,
    ) -> None:
        """The attributes an object's HEAD gave (``meta_etag``: the version they belong to)."""
        self.conn.execute(
            "UPDATE inodes SET mode = ?, rdev = ?, uid = ?, gid = ?, mtime_ns = ?, atime_ns = ?, size = ?, etag = ?,"
            " meta_etag = ?, ctime_ns = ?, src_limit = ? WHERE ino = ?",
            (mode, rdev, *owner, mtime_ns, atime_ns, size, etag, meta_etag, ctime_ns, size, ino),
        )

    def make_dir(self, ino: int, mode: int, key: str, meta_etag: str | None, ctime_ns: int) -> None:
        """A file turns out to be a directory (a directory wins over a file of the same name)."""
        self.conn.execute(
            "UPDATE inodes SET mode = ?, size = 0, key = ?, etag = NULL, meta_etag = ?, target = NULL, ctime_ns = ?"
            " WHERE ino = ?",
            (mode, key, meta_etag, ctime_ns, ino),
        )

    def reimport(
        self, ino: int, key: str, etag: str, size: int, mtime_ns: int, ctime_ns: int, meta: str | None
    ) -> None:
        """The object of a clean file changed in S3: its new version, size and time (``meta``: meta_etag)."""
        self.conn.execute(
            "UPDATE inodes SET key = ?, etag = ?, import_etag = ?, size = ?, src_limit = ?, mtime_ns = ?,"
            " ctime_ns = ?, meta_etag = ?, target = NULL WHERE ino = ?",
            (key, etag, etag, size, size, mtime_ns, ctime_ns, meta, ino),
        )

    def set_import_etag(self, ino: int, etag: str | None) -> None:
        """The object at the entry's path as last imported (None: created or moved here locally)."""
        self.conn.execute("UPDATE inodes SET import_etag = ? WHERE ino = ?", (etag, ino))

    def sync(self, ino: int) -> None:
        """A write in the caller's durable transaction (fsync): commits make every earlier commit durable."""
        self.conn.execute("UPDATE inodes SET size = size WHERE ino = ?", (ino,))

    # ------------------------------------------------------------------------------------- whiteouts

    def whiteout(self, parent: int, name: str) -> None:
        """``name`` was removed or renamed away locally: the importer does not bring its object back."""
        self.conn.execute("INSERT INTO whiteouts (parent, name) VALUES (?, ?) ON CONFLICT DO NOTHING", (parent, name))

    def drop_whiteout(self, parent: int, name: str) -> None:
        self.conn.execute("DELETE FROM whiteouts WHERE parent = ? AND name = ?", (parent, name))

    def drop_whiteouts(self, parent: int) -> None:
        self.conn.execute("DELETE FROM whiteouts WHERE parent = ?", (parent,))

    def whiteouts(self, parent: int) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT name FROM whiteouts WHERE parent = ?", (parent,))}
