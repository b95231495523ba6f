"""FIFOs, sockets and device nodes, and directory link counts (in-process, on the in-memory repository)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pyfuse3
import pytest
import trio
from inproc import Ctx, Daemon, Fields, run
from memrepo import Bucket

from lustrefs.constants import ROOT_INODE

NODES = {
    "fifo": (stat.S_IFIFO | 0o640, 0),
    "sock": (stat.S_IFSOCK | 0o755, 0),
    "chr": (stat.S_IFCHR | 0o600, os.makedev(1, 3)),
    "blk": (stat.S_IFBLK | 0o660, os.makedev(7, 2)),
}


async def check_nodes(d: Daemon, devices: bool = True) -> None:
    for name, (mode, rdev) in NODES.items():
        a = await d.ops.getattr(await d.resolve(name), Ctx())
        device = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        if device and not devices:
            assert (stat.S_IFMT(a.st_mode), a.st_rdev, a.st_size) == (stat.S_IFREG, 0, 0), name
        else:
            assert (a.st_mode, a.st_rdev, a.st_size, a.st_nlink) == (mode, rdev, 0, 1), name


def test_special_files_persist_are_exported_and_imported(tmp_path: Path) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path / "a", store)
        await d.start(nursery)
        for name, (mode, rdev) in NODES.items():
            await d.ops.mknod(ROOT_INODE, name.encode(), mode, rdev, Ctx(umask=0))
        await check_nodes(d)
        await d.settled()
        for name, (mode, rdev) in NODES.items():
            obj = store.objects[name]
            assert obj.body == b"" and obj.metadata["file-permissions"] == f"0{mode:o}", name
            assert obj.metadata.get("file-rdev") == (f"{os.major(rdev)},{os.minor(rdev)}" if rdev else None), name
        await d.stop()
        again = Daemon(tmp_path / "a", store)  # a remount
        await again.start(nursery)
        await check_nodes(again)
        await again.stop()
        fresh = Daemon(tmp_path / "b", store)  # a new file system on the bucket
        await fresh.start(nursery)
        await check_nodes(fresh)
        await fresh.stop()
        nodev = Daemon(tmp_path / "c", store, devices=False)  # nodev, or not root: no device from S3
        await nodev.start(nursery)
        await check_nodes(nodev, devices=False)
        assert "S3ObjectDeviceNotCreated" in (tmp_path / "c" / "events.jsonl").read_text()
        await nodev.stop()

    run(test)


def test_mknod_of_a_regular_file_and_of_no_file_type(tmp_path: Path) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        a = await d.ops.mknod(ROOT_INODE, b"plain", 0o644, 0, Ctx())  # type 0: a regular file
        assert stat.S_ISREG(a.st_mode)
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await d.ops.mknod(ROOT_INODE, b"dir", stat.S_IFDIR | 0o755, 0, Ctx())
        assert exc.value.errno == errno.EINVAL
        await d.stop()

    run(test)


def test_directory_link_counts(tmp_path: Path) -> None:
    store = Bucket()
    store.put_object("x/y/z", b"1")

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        x = await d.resolve("x")
        assert (await d.ops.getattr(x, Ctx())).st_nlink == 1  # not listed yet: find must not rely on it
        await d.ns.entries(x, 0)  # what readdir does: the directory is listed
        assert (await d.ops.getattr(x, Ctx())).st_nlink == 3  # listed: 2 + one subdirectory
        await d.mkdir("d")
        for sub in ("a", "b"):
            await d.mkdir(f"d/{sub}")
        await d.write_file("d/f", b"")
        nlink = (await d.ops.getattr(await d.resolve("d"), Ctx())).st_nlink
        assert nlink == 4
        await d.rmdir("d/a")
        assert (await d.ops.getattr(await d.resolve("d"), Ctx())).st_nlink == 3
        assert (await d.ops.getattr(ROOT_INODE, Ctx())).st_nlink == 4  # x and d
        assert (await d.ops.getattr(await d.resolve("d/f"), Ctx())).st_nlink == 1
        await d.stop()

    run(test)


def test_open_with_o_trunc_sets_the_times_of_an_empty_file(tmp_path: Path) -> None:
    """POSIX: open(O_TRUNC) of an existing file marks its mtime and ctime for update, whatever its size."""
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        await d.write_file("e", b"")
        ino = await d.resolve("e")
        before = await d.ops.getattr(ino, Ctx())
        await trio.sleep(0.002)  # a later timestamp (clock resolution), not a synchronisation
        await d.ops.release((await d.ops.open(ino, os.O_WRONLY | os.O_TRUNC, Ctx())).fh)
        after = await d.ops.getattr(ino, Ctx())
        assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns
        await d.stop()

    run(test)


def test_chown_to_nobody_else_sets_the_ctime_and_huge_sizes_are_efbig(tmp_path: Path) -> None:
    """chown(-1, -1) reaches the file system as a setattr of nothing: Linux sets the ctime. A size beyond the largest
    file (16 TiB) is EFBIG, for truncate and write."""
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        fh = await d.write_file("f", b"x", close=False)
        ino = await d.resolve("f")
        before = await d.ops.getattr(ino, Ctx())
        await trio.sleep(0.002)  # a later timestamp (clock resolution), not a synchronisation
        after = await d.ops.setattr(ino, pyfuse3.EntryAttributes(), Fields(), None, Ctx())
        assert after.st_ctime_ns > before.st_ctime_ns and after.st_mtime_ns == before.st_mtime_ns
        attr = pyfuse3.EntryAttributes()
        attr.st_size = 10**18
        for call in (
            d.ops.setattr(ino, attr, Fields(update_size=True), None, Ctx()),
            d.ops.write(fh, 10**18, b"x"),
        ):
            with pytest.raises(pyfuse3.FUSEError) as exc:
                await call
            assert exc.value.errno == errno.EFBIG
        await d.ops.release(fh)
        assert (await d.ops.getattr(ino, Ctx())).st_size == 1
        await d.stop()

    run(test)


def test_a_readdir_entry_waits_for_its_own_head_only(tmp_path: Path) -> None:
    """A readdir page starts the HEADs of all its entries, and each entry returned waits only for its own: the
    kernel takes a few dozen entries per call, and they must not wait for a whole page's HEADs."""
    store = Bucket()
    for i in range(50):
        store.put_object(f"d/f{i:02d}", b"x", {"file-permissions": "0100600"})

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        x = await d.resolve("d")
        held = store.gate("HEAD", lambda key: key != "d/f00")
        with trio.fail_after(5):
            rows = await d.ns.entries(x, 0)
            first = await d.ns.entry(rows[0])
        assert (rows[0].name, first.mode) == ("f00", stat.S_IFREG | 0o600)
        await held.wait_arrived(49)  # every other HEAD of the page was sent at once
        held.open()
        assert [(await d.ns.entry(r)).mode for r in rows] == [stat.S_IFREG | 0o600] * 50
        await d.stop()

    run(test)
