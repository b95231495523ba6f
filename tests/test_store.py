"""Unit tests of the store layer (SQLite only) and of listing one directory (in-memory repository)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio
from memrepo import Bucket, MemoryRepository

from lustrefs import paths
from lustrefs.constants import ROOT_INODE
from lustrefs.store import db
from lustrefs.store.cacheparts import LOCAL, CachePartStore
from lustrefs.store.exports import DATA, META, ExportLedger
from lustrefs.store.inodes import ORPHAN, InodeStore
from lustrefs.tree import listing


@pytest.fixture
def conn(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = db.connect(tmp_path / "state.db")
    yield c
    c.close()


def add(inodes: InodeStore, parent: int, name: str, mode: int = stat.S_IFREG | 0o644, **kw: object) -> int:
    values: dict[str, object] = dict(
        key=name, size=0, mtime_ns=1, ctime_ns=1, etag=None, src_limit=0, meta_etag="", exported_key=None,
        import_etag=None,
    )  # fmt: skip
    values.update(kw)
    return inodes.insert(parent=parent, name=name, mode=mode, owner=(0, 0), **values)  # type: ignore[arg-type]


def test_inodes_are_typed_records_and_never_reused(conn) -> None:  # type: ignore[no-untyped-def]
    inodes = InodeStore(conn)
    add(inodes, ROOT_INODE, "", stat.S_IFDIR | 0o755, ino=ROOT_INODE)
    d = add(inodes, ROOT_INODE, "d", stat.S_IFDIR | 0o755)
    f = add(inodes, d, "f", size=5, etag="e1", src_limit=5)
    row = inodes.find(f)
    assert row is not None and (row.name, row.parent, row.size, row.etag, row.is_dir) == ("f", d, 5, "e1", False)
    assert inodes.child(d, "f") == row and inodes.child(ROOT_INODE, "") is None  # the root is nobody's child
    assert inodes.has_children(d) and not inodes.has_children(f)
    inodes.move(f, ORPHAN, f"#{f}")
    assert inodes.orphans(None) == [f] and inodes.child(d, "f") is None and inodes.find(f).is_orphan  # type: ignore[union-attr]
    inodes.delete(f)
    g = add(inodes, d, "g")
    assert g > f  # AUTOINCREMENT: numbers given to the kernel are never handed out again


def test_pages_and_files_after_follow_inode_order(conn) -> None:  # type: ignore[no-untyped-def]
    inodes = InodeStore(conn)
    add(inodes, ROOT_INODE, "", stat.S_IFDIR | 0o755, ino=ROOT_INODE)
    made = [add(inodes, ROOT_INODE, f"n{i}") for i in range(5)]
    sub = add(inodes, ROOT_INODE, "sub", stat.S_IFDIR | 0o755)
    control = add(inodes, ROOT_INODE, paths.CONTROL_NAME)
    assert [r.ino for r in inodes.page(ROOT_INODE, 0, 3)] == made[:3]
    assert [r.ino for r in inodes.page(ROOT_INODE, made[2], 10, hidden=paths.CONTROL_NAME)] == [*made[3:], sub]
    assert control in [r.ino for r in inodes.page(ROOT_INODE, 0, 100)]
    assert [r.ino for r in inodes.files_after(ROOT_INODE, made[3], 10)] == [made[4], control]
    assert inodes.unlisted_subdirs(ROOT_INODE) == [sub]
    inodes.set_listed(sub)
    assert inodes.unlisted_subdirs(ROOT_INODE) == []


def test_setattr_columns_are_checked(conn) -> None:  # type: ignore[no-untyped-def]
    inodes = InodeStore(conn)
    f = add(inodes, ROOT_INODE, "f")
    inodes.set_attrs(f, {"mode": stat.S_IFREG | 0o600, "uid": 7})
    row = inodes.find(f)
    assert row is not None and (row.mode & 0o777, row.uid) == (0o600, 7)
    with pytest.raises(AssertionError):
        inodes.set_attrs(f, {"parent": 5})  # not an attribute a setattr may change


def test_whiteouts(conn) -> None:  # type: ignore[no-untyped-def]
    inodes = InodeStore(conn)
    inodes.whiteout(ROOT_INODE, "a")
    inodes.whiteout(ROOT_INODE, "a")
    assert inodes.whiteouts(ROOT_INODE) == {"a"}
    inodes.drop_whiteout(ROOT_INODE, "a")
    assert inodes.whiteouts(ROOT_INODE) == set()


def test_the_ledger_records_the_new_key_before_the_old_one_goes(conn) -> None:  # type: ignore[no-untyped-def]
    inodes, ledger = InodeStore(conn), ExportLedger(conn)
    f = add(inodes, ROOT_INODE, "b", exported_key="a")
    ledger.mark_dirty(f, META)
    gen = inodes.find(f).data_gen  # type: ignore[union-attr]
    ledger.begin(f, "b")
    assert [key for key, _ in ledger.intents()] == ["b"]
    assert ledger.record(f, "b", gen, ("etag-b", 3), import_is_export=True)  # clean
    row = inodes.find(f)
    assert row is not None
    assert (row.exported_key, row.key, row.etag, row.src_limit, row.dirty) == ("b", "b", "etag-b", 3, 0)
    assert ledger.intents() == [] and ledger.pending_deletes() == ["a"]  # queued in the same transaction


def test_the_ledger_keeps_a_changed_entry_dirty_and_abandons_unowned_keys(conn) -> None:  # type: ignore[no-untyped-def]
    inodes, ledger = InodeStore(conn), ExportLedger(conn)
    f = add(inodes, ROOT_INODE, "f")
    ledger.mark_dirty(f, DATA)
    gen = inodes.find(f).data_gen  # type: ignore[union-attr]
    ledger.begin(f, "f")
    ledger.mark_dirty(f, DATA)  # written again during the upload
    assert not ledger.record(f, "f", gen, ("e", 1), import_is_export=False)
    assert inodes.find(f).dirty & DATA  # type: ignore[union-attr]
    ledger.begin(f, "tmp")
    ledger.abandon("tmp")  # the upload failed or crashed: its object may exist, nobody is exported there
    assert ledger.pending_deletes() == ["tmp"] and not ledger.live("tmp")
    ledger.begin(f, "tmp")  # a new export to the key voids the deletion
    assert ledger.pending_deletes() == []
    assert ledger.own_keys_under("") == {"tmp"}


def test_the_ledger_finds_the_readers_of_an_object(conn) -> None:  # type: ignore[no-untyped-def]
    inodes, ledger = InodeStore(conn), ExportLedger(conn)
    a = add(inodes, ROOT_INODE, "a", key="k", etag="e", src_limit=4)
    add(inodes, ROOT_INODE, "b", key="k", etag="e", src_limit=0)  # reads nothing from it
    c = add(inodes, ROOT_INODE, "c", key="k", etag="e", src_limit=4)
    ledger.mark_dirty(c, DATA)  # its local parts are its data
    assert [r.ino for r in ledger.readers_of("k")] == [a]


def test_cache_parts(conn) -> None:  # type: ignore[no-untyped-def]
    parts = CachePartStore(conn)
    parts.add((5, LOCAL, 0), 10, 1)
    parts.add((5, "e", 1), 20, 2)
    parts.add((6, LOCAL, 0), 30, 3)
    parts.resize((5, LOCAL, 0), 12)
    parts.retag((6, LOCAL, 0), "e6")
    parts.set_last_use([((5, LOCAL, 0), 9)])
    assert parts.all() == [((5, "e", 1), 20, 2), ((6, "e6", 0), 30, 3), ((5, LOCAL, 0), 12, 9)]
    assert parts.files_with_local_data() == 1
    parts.remove((5, LOCAL, 0))
    assert parts.files_with_local_data() == 0
    parts.clear()
    assert parts.all() == []


@pytest.mark.parametrize("version", [2, 3, 4, 5])
def test_an_older_database_is_upgraded_in_place(tmp_path: Path, version: int) -> None:
    conn = db.connect(tmp_path / "state.db")
    conn.execute("ALTER TABLE inodes DROP COLUMN holder")  # schema 6
    if version < 5:
        conn.execute("DROP INDEX inodes_links")
        conn.execute("ALTER TABLE inodes DROP COLUMN link_of")  # schema 5
    if version < 4:
        conn.execute("ALTER TABLE inodes DROP COLUMN rdev")  # schema 4
    if version == 2:
        conn.execute("DROP TABLE export_intents")  # schema 3
    db.set_setting(conn, "schema_version", str(version))
    InodeStore(conn).whiteout(ROOT_INODE, "kept")
    conn.close()
    conn = db.connect(tmp_path / "state.db")
    assert db.get_setting(conn, "schema_version") == str(db.SCHEMA_VERSION)
    assert InodeStore(conn).whiteouts(ROOT_INODE) == {"kept"} and ExportLedger(conn).intents() == []
    f = add(InodeStore(conn), ROOT_INODE, "dev", stat.S_IFCHR | 0o600, rdev=os.makedev(1, 3))
    assert InodeStore(conn).find(f).rdev == os.makedev(1, 3)  # type: ignore[union-attr]
    conn.close()


# ------------------------------------------------------------------------------------------ listing


def test_a_listing_turns_pages_into_entries_and_reports_skipped_keys() -> None:
    store = Bucket()
    for key in ["d/a", "d/b/x", "d/c/", "d/bad\x00name", "d/", *[f"d/f{i:03d}" for i in range(25)]]:
        store.put_object(key, b"x")
    repo = MemoryRepository(store)
    spec = paths.listing_for("d/", "")
    assert spec is not None
    pages: list[listing.Entries] = []
    skipped: list[str] = []

    async def main() -> int:
        return await listing.each_page(repo, spec, pages.append, lambda key, why: skipped.append(key))

    real_page = repo.list_page

    async def small_pages(prefix: str, token: str | None, max_keys: int = 1000):  # type: ignore[no-untyped-def]
        return await real_page(prefix, token, 10)

    repo.list_page = small_pages  # type: ignore[method-assign]
    requests = trio.run(main)
    assert requests == len(pages) == 3
    names = [n for p in pages for n, _ in p.files]
    dirs = [n for p in pages for n, _ in p.dirs]
    assert dirs == ["b", "c"] and "a" in names and "f024" in names and "" not in names  # the marker is no entry
    assert skipped == ["d/bad\x00name"]
    assert pages[-1].last_key is not None and all(p.last_key for p in pages)
