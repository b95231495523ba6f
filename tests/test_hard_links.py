"""Hard links (in-process, on the in-memory repository): one inode, several names, each name exported as an object
of its own; link counts, unlink of any name, rename onto another link, remount, import, ctime."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pyfuse3
import pytest
import trio
from inproc import Ctx, Daemon, run
from memrepo import Bucket

from lustrefs.constants import ROOT_INODE
from lustrefs.tree import namespace


async def link(d: Daemon, existing: str, new: str) -> pyfuse3.EntryAttributes:
    parent, name = await d.parent_of(new)
    return await d.ops.link(await d.resolve(existing), parent, name, Ctx())


async def nlink(d: Daemon, path: str) -> int:
    return (await d.ops.getattr(await d.resolve(path), Ctx())).st_nlink


async def ctime(d: Daemon, path: str) -> int:
    return (await d.ops.getattr(await d.resolve(path), Ctx())).st_ctime_ns


def bodies(store: Bucket) -> dict[str, bytes]:
    return {k: o.body for k, o in store.objects.items()}


def test_names_share_one_inode_and_each_is_exported(tmp_path: Path) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        await d.mkdir("d")
        await d.write_file("a", b"first")
        before = await ctime(d, "a")
        attrs = await link(d, "a", "d/b")
        assert attrs.st_ino == await d.resolve("a") == await d.resolve("d/b")
        assert attrs.st_nlink == 2 and await nlink(d, "d/b") == 2
        assert await ctime(d, "a") > before  # link(2) changes the inode's ctime
        await d.write_file("d/b", b"second")  # through the other name
        assert await d.read_file("a") == b"second"
        await d.settled()
        assert bodies(store) == {"a": b"second", "d/": b"", "d/b": b"second"}
        assert store.objects["a"].metadata == store.objects["d/b"].metadata  # same attributes
        await d.chmod("a", 0o600)  # an attribute of the inode: every name is exported again
        await d.settled()
        assert store.objects["d/b"].metadata["file-permissions"] == "0100600"
        assert store.objects["a"].metadata["file-permissions"] == "0100600"
        await d.stop()

    run(test)


def test_unlink_of_either_name_keeps_the_data_for_the_other(tmp_path: Path) -> None:
    store = Bucket()
    data = os.urandom(3 * 1024 * 1024)

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        await d.write_file("a", data)
        await link(d, "a", "b")
        await link(d, "a", "c")
        await d.settled()
        ino = await d.resolve("a")
        await d.unlink("b")  # a link's name
        assert await nlink(d, "a") == 2
        await d.settled()
        assert sorted(store.objects) == ["a", "c"]
        requests = dict(store.requests)
        before = await ctime(d, "c")
        await d.unlink("a")  # the inode's first name: "c" keeps the inode, its object becomes the clean data
        assert await d.resolve("c") == ino and await nlink(d, "c") == 1
        assert await ctime(d, "c") > before
        await d.settled()
        assert sorted(store.objects) == ["c"] and store.objects["c"].body == data
        assert await d.read_file("c") == data
        # "c" was clean: its object is the inode's data now, nothing was read back, re-uploaded or copied
        assert [store.requests[op] - requests[op] for op in ("GET", "PUT", "COPY")] == [0, 0, 0]
        await d.stop()
        again = Daemon(tmp_path, store)
        await again.start(nursery)
        assert await again.read_file("c") == data and await nlink(again, "c") == 1
        await again.stop()

    run(test)


def test_an_open_file_keeps_its_data_when_every_name_goes(tmp_path: Path) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        await d.write_file("a", b"kept")
        await link(d, "a", "b")
        await d.settled()
        ino = await d.resolve("a")
        fh = (await d.ops.open(ino, os.O_RDONLY, Ctx())).fh
        await d.unlink("a")
        await d.unlink("b")
        assert (await d.ops.getattr(ino, Ctx())).st_nlink == 0  # fstat of an unlinked open file
        with pytest.raises(pyfuse3.FUSEError) as exc:  # link(2) of a file with no name left
            await d.ops.link(ino, ROOT_INODE, b"back", Ctx())
        assert exc.value.errno == errno.ENOENT
        await d.settled()
        assert store.objects == {}
        assert await d.read_handle(fh, ino) == b"kept"
        await d.ops.release(fh)
        await d.stop()

    run(test)


def test_rename_of_and_onto_links(tmp_path: Path) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        await d.write_file("a", b"one")
        await link(d, "a", "b")
        await d.rename("a", "b")  # onto another link of the same inode: POSIX says nothing happens
        assert await d.resolve("a") == await d.resolve("b") and await nlink(d, "a") == 2
        await d.rename("b", "c")  # a link's name moves: its old object goes, the new one comes
        await d.write_file("other", b"two")
        await d.rename("other", "a")  # replaces the inode's first name: "c" keeps the data
        assert await d.read_file("c") == b"one" and await nlink(d, "c") == 1 and await nlink(d, "a") == 1
        await d.settled()
        assert bodies(store) == {"a": b"two", "c": b"one"}
        await d.stop()

    run(test)


def test_links_persist_and_a_fresh_import_gives_separate_files(tmp_path: Path) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path / "a", store)
        await d.start(nursery)
        await d.write_file("f", b"data")
        await link(d, "f", "g")
        await d.ops.mknod(ROOT_INODE, b"p", 0o10640, 0, Ctx(umask=0))
        await link(d, "p", "q")
        await d.stop()
        again = Daemon(tmp_path / "a", store)
        await again.start(nursery)
        assert await again.resolve("f") == await again.resolve("g") and await nlink(again, "g") == 2
        assert await again.resolve("p") == await again.resolve("q")
        await again.stop()
        fresh = Daemon(tmp_path / "b", store)  # an import: each name is an object, hence a file of its own
        await fresh.start(nursery)
        assert await fresh.resolve("f") != await fresh.resolve("g") and await nlink(fresh, "g") == 1
        assert await fresh.read_file("g") == b"data"
        assert (await fresh.ops.getattr(await fresh.resolve("q"), Ctx())).st_mode == 0o10640
        await fresh.stop()

    run(test)


def test_link_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Bucket()
    monkeypatch.setattr(namespace, "LINK_MAX", 3)

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        await d.mkdir("dir")
        await d.write_file("f", b"")
        await d.write_file("g", b"")
        for existing, new, code in (("dir", "x", errno.EPERM), ("f", "g", errno.EEXIST), ("f", "dir/" + "n" * 256,
                                    errno.ENAMETOOLONG), ("f", "g/x", errno.ENOTDIR)):  # fmt: skip
            with pytest.raises(pyfuse3.FUSEError) as exc:
                await link(d, existing, new)
            assert exc.value.errno == code, (existing, new)
        await link(d, "f", "f2")
        await link(d, "f", "f3")
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await link(d, "f", "f4")
        assert exc.value.errno == errno.EMLINK
        await d.stop()

    run(test)


def test_imports_of_a_links_name(tmp_path: Path) -> None:
    """Another writer replaces the object of one name: that name becomes a file of its own; deletes one: that name
    goes, the other stays."""
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store, import_policy="NEW_CHANGED_DELETED")
        await d.start(nursery)
        await d.write_file("a", b"shared")
        await link(d, "a", "b")
        await link(d, "a", "c")
        await d.settled()
        await d.importer.poll()
        store.put_object("b", b"replaced")
        del store.objects["a"]
        await d.importer.poll()
        assert await d.read_file("b") == b"replaced" and await nlink(d, "b") == 1
        assert await d.read_file("c") == b"shared" and await nlink(d, "c") == 1
        with pytest.raises(FileNotFoundError):
            await d.resolve("a")
        await d.write_file("c", b"changed")
        await d.settled()
        assert bodies(store) == {"b": b"replaced", "c": b"changed"}
        await d.stop()

    run(test)


def test_an_explicit_export_writes_every_name(tmp_path: Path) -> None:
    """hsm_archive and export tasks export a file under each of its names, whatever the AutoExportPolicy."""
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store, policy=frozenset())  # nothing is exported by itself
        await d.start(nursery)
        await d.write_file("a", b"archived")
        await link(d, "a", "b")
        fh = await d.write_file("c", b"open", close=False)
        await link(d, "c", "e")
        assert store.objects == {}
        assert await d.writeback.export_now(await d.resolve("a")) is None
        assert bodies(store) == {"a": b"archived", "b": b"archived"}
        for row in (d.ns.inodes.child(ROOT_INODE, "c"), d.ns.inodes.child(ROOT_INODE, "e")):  # an export task's
            assert row is not None  # units are names: the inode's own and the link's
            failure = await d.writeback.export_now(row.ino)
            assert failure is not None and failure.code == "ResourceBusy"  # open for writing, under either name
        await d.ops.release(fh)
        await d.stop()

    run(test)
