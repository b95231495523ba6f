"""The export state machine against an in-memory repository: unlink, rename and crashes at every step.

Each test runs a daemon's core in-process (tests/inproc.py) with requests held at gates, so the race it is
about happens every time, not by luck of timing.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pyfuse3
import pytest
import trio
from inproc import MIB, Ctx, Daemon, Test, run
from memrepo import Bucket

from lustrefs.constants import ROOT_INODE


def fuse_errno(exc: pytest.ExceptionInfo[pyfuse3.FUSEError]) -> int:
    return exc.value.errno


# ------------------------------------------------------------------------------------------ unlink and export


def test_unlink_while_the_first_export_is_in_flight_deletes_the_new_object(tmp_path: Path) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path / "a", store)
        await d.start(nursery)
        put = store.gate("PUT", "f")
        await d.write_file("f", os.urandom(MIB // 2))
        await put.wait_arrived()
        await d.unlink("f")
        put.open()
        await d.settled()
        assert "f" not in store.objects
        await d.stop()
        again = Daemon(tmp_path / "b", store)  # a new file system on the bucket shows nothing
        await again.start(nursery)
        with pytest.raises(FileNotFoundError):
            await again.resolve("f")
        await again.stop()

    run(test)


def test_unlink_while_a_multipart_export_is_in_flight(tmp_path: Path) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        put = store.gate("PUT", "big")
        await d.write_file("big", os.urandom(3 * MIB))
        await put.wait_arrived()
        await d.unlink("big")
        put.open()
        await d.settled()
        assert store.objects == {} and store.uploads == {}
        await d.stop()

    run(test)


@pytest.mark.parametrize("kind", ["dir", "symlink"])
def test_create_change_remove_cycles_leave_no_object(tmp_path: Path, kind: str) -> None:
    store = Bucket()
    store.faults.latency = 0.002  # requests take a while: removals overtake exports

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        for _ in range(30):
            if kind == "dir":
                await d.mkdir("x")
                await d.chmod("x", 0o700)
                await trio.sleep(0.003)
                await d.rmdir("x")
            else:
                await d.symlink("l", "target")
                await trio.sleep(0.003)
                await d.unlink("l")
        await d.settled()
        assert store.objects == {}
        await d.stop()

    run(test)


def test_rename_back_during_export_keeps_the_object(tmp_path: Path) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        put = store.gate("PUT", "a")
        await d.write_file("a", b"one")
        await put.wait_arrived()
        await d.rename("a", "b")
        put.open()
        await d.settled()
        assert set(store.objects) == {"b"} and store.objects["b"].body == b"one"
        await d.rename("b", "a")
        await d.settled()
        assert set(store.objects) == {"a"} and store.objects["a"].body == b"one"
        await d.stop()

    run(test)


def test_a_new_file_at_a_renamed_files_old_key_keeps_both(tmp_path: Path) -> None:
    """``mv a b; echo new > a``: the export of the new ``a`` must not destroy the data ``b`` still reads."""
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        await d.write_file("a", b"old data")
        await d.settled()
        d.cache.release(await d.resolve("a"))  # only S3 holds the data of a
        copy = store.gate("COPY", "b")
        await d.rename("a", "b")
        await d.write_file("a", b"new")
        copy.open()
        await d.settled()
        assert store.objects["a"].body == b"new" and store.objects["b"].body == b"old data"
        assert await d.read_file("b") == b"old data"
        await d.stop()

    run(test)


# ------------------------------------------------------------------------------------------ crashes


def test_crash_while_the_old_key_of_a_rename_is_deleted(tmp_path: Path) -> None:
    store = Bucket()
    data = os.urandom(200_000)

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        await d.mkdir("d")
        await d.write_file("d/f", data)
        await d.settled()
        delete = store.gate("DELETE", "d/f", after=True)  # the DELETE happens, its answer never comes
        await d.rename("d/f", "d/g")
        await delete.wait_arrived()
        await d.crash()
        delete.open()
        for part in (tmp_path / "cache").rglob("*"):  # the cached parts are gone too
            if part.is_file():
                part.unlink()
        again = Daemon(tmp_path, store)
        await again.start(nursery)
        await again.settled()
        assert set(store.objects) == {"d/", "d/g"}
        assert await again.read_file("d/g") == data
        assert await again.stop() == []

    run(test)


def test_a_rename_stranded_by_an_earlier_release_finds_its_data_at_the_new_key(tmp_path: Path) -> None:
    """State left by releases that deleted the old key before recording the copy: the copy source is gone, the
    object is at the new key. The export takes it (an event) instead of retrying a COPY forever."""
    store = Bucket()
    data = os.urandom(100_000)

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        await d.write_file("f", data)
        await d.settled()
        d.cache.release(await d.resolve("f"))
        store.objects["g"] = store.objects.pop("f")  # COPY f -> g and DELETE f happened, unrecorded
        await d.rename("f", "g")
        await d.settled()
        assert set(store.objects) == {"g"} and store.objects["g"].body == data
        assert await d.read_file("g") == data
        assert "S3ExportSourceRelocated" in (tmp_path / "events.jsonl").read_text()
        await d.stop()

    run(test)


def test_crash_during_a_multipart_export_aborts_the_upload_at_the_next_start(tmp_path: Path) -> None:
    store = Bucket()
    data = os.urandom(3 * MIB + 5)
    puts = [0]

    def third_put(key: str) -> bool:
        puts[0] += 1
        return key == "big" and puts[0] >= 3

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        gate = store.gate("PUT", third_put)
        await d.write_file("big", data)
        await gate.wait_arrived()
        assert len(store.uploads) == 1
        await d.crash()
        gate.open()
        again = Daemon(tmp_path, store)
        await again.start(nursery)
        await again.settled()
        assert store.uploads == {}
        assert store.objects["big"].body == data
        assert await again.stop() == []

    run(test)


def test_crash_after_an_unlinked_files_export_wrote_its_object(tmp_path: Path) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        put = store.gate("PUT", "f", after=True)
        await d.write_file("f", b"x" * 1000)
        await put.wait_arrived()
        await d.unlink("f")
        await d.crash()
        put.open()
        assert "f" in store.objects
        again = Daemon(tmp_path, store)
        await again.start(nursery)
        await again.settled()
        assert store.objects == {}
        await again.stop()

    run(test)


# ------------------------------------------------------------------------------------------ open, unlinked


def test_an_unlinked_file_still_open_reads_its_data(tmp_path: Path) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store, delay=3600)
        await d.start(nursery)
        info, _ = await d.ops.create(ROOT_INODE, b"tmp", 0o600, os.O_RDWR, Ctx())
        await d.ops.write(info.fh, 0, b"Hello")
        await d.unlink("tmp")
        assert bytes(await d.ops.read(info.fh, 0, 5)) == b"Hello"
        big = os.urandom(9 * MIB)
        await d.ops.write(info.fh, 0, big)
        assert bytes(await d.ops.read(info.fh, 0, len(big))) == big
        await d.ops.release(info.fh)
        await d.stop()

    run(test)


def test_an_exported_file_unlinked_while_open_reads_after_its_object_is_deleted(tmp_path: Path) -> None:
    store = Bucket()
    data = os.urandom(3 * MIB)

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        await d.write_file("f", data)
        await d.settled()
        ino = await d.resolve("f")
        d.cache.release(ino)
        fh = (await d.ops.open(ino, os.O_RDONLY, Ctx())).fh
        await d.unlink("f")
        await d.settled()
        assert store.objects == {}
        assert bytes(await d.ops.read(fh, 0, len(data))) == data
        await d.ops.release(fh)
        await d.stop()

    run(test)


# ------------------------------------------------------------------------------------------ failures


def test_export_retries_back_off_and_unmount_reports_what_is_left(tmp_path: Path) -> None:
    store = Bucket()
    store.faults.fail["PUT"] = 10**9  # the endpoint refuses every upload

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        await d.write_file("f", b"data")
        with trio.fail_after(20):
            left = await d.stop(export_timeout=3.0)
        assert [path for path, _ in left] == ["/f"]
        assert "S3ExportFailed" in left[0][1]
        assert store.requests["PUT"] <= 10  # about one per FLUSH_RETRY, not one every 50 ms

    run(test)


def test_backoff_is_bounded_for_any_number_of_failures() -> None:
    from lustrefs.sync.exporter import MAX_BACKOFF, backoff

    assert backoff(1) == 2.0
    assert backoff(1024) == backoff(10**6) == MAX_BACKOFF


def test_entries_refused_by_the_policy_are_not_reported_at_unmount(tmp_path: Path) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store, policy=frozenset({"CHANGED", "DELETED"}))
        await d.start(nursery)
        await d.write_file("f", b"data")
        assert await d.stop(export_timeout=2.0) == []
        assert store.objects == {}

    run(test)


# ------------------------------------------------------------------------------------------ names


def test_names_longer_than_255_bytes_are_enametoolong(tmp_path: Path) -> None:
    store = Bucket()
    long = b"n" * 256

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        await d.write_file("f", b"x")
        ino = await d.resolve("f")
        calls = [
            d.ops.lookup(ROOT_INODE, long, Ctx()),
            d.ops.unlink(ROOT_INODE, long, Ctx()),
            d.ops.rmdir(ROOT_INODE, long, Ctx()),
            d.ops.rename(ROOT_INODE, long, ROOT_INODE, b"g", 0, Ctx()),
            d.ops.rename(ROOT_INODE, b"f", ROOT_INODE, long, 0, Ctx()),
            d.ops.mknod(ROOT_INODE, long, 0o10644, 0, Ctx()),
            d.ops.link(ino, ROOT_INODE, long, Ctx()),
            d.ops.mkdir(ROOT_INODE, long, 0o755, Ctx()),
        ]
        for call in calls:
            with pytest.raises(pyfuse3.FUSEError) as exc:
                await call
            assert fuse_errno(exc) == errno.ENAMETOOLONG
        await d.ops.symlink(ROOT_INODE, b"l", b"t" * 1000, Ctx())  # a target is no name: up to PATH_MAX
        await d.stop()

    run(test)


# ------------------------------------------------------------------------------------------ lazy load


def test_an_object_replaced_before_its_first_read_is_loaded_anew(tmp_path: Path) -> None:
    store = Bucket()
    store.put_object("data/a", b"first version")

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store, import_prefix="data/", export_prefix="out/")
        await d.start(nursery)
        ino = await d.resolve("data/a")  # ImportPath filters: the tree shows the keys' whole paths
        store.put_object("data/a", b"the second, longer version")
        fh = (await d.ops.open(ino, os.O_RDONLY, Ctx())).fh
        assert bytes(await d.ops.read(fh, 0, 4096)) == b"the second, longer version"  # the kernel reads pages
        await d.ops.release(fh)
        assert (await d.ops.getattr(ino, Ctx())).st_size == len(b"the second, longer version")
        codes = [line for line in (tmp_path / "events.jsonl").read_text().splitlines() if "ChangedBeforeRead" in line]
        assert codes
        # A handle that read a version keeps ESTALE when it goes away under it.
        fh = (await d.ops.open(ino, os.O_RDONLY, Ctx())).fh
        assert bytes(await d.ops.read(fh, 0, 3)) == b"the"
        d.cache.release(ino)
        store.put_object("data/a", b"third")
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await d.ops.read(fh, 0, 100)
        assert fuse_errno(exc) == errno.ESTALE
        await d.ops.release(fh)
        await d.stop()

    run(test)


# ------------------------------------------------------------------------------------------ import


def test_an_import_does_not_bring_back_an_object_the_export_is_deleting(tmp_path: Path) -> None:
    """NEW_CHANGED_DELETED with export prefix = import prefix: a poll while an unlinked file's upload is still
    answering must not take that object for another writer's, or it would stay in S3 for good."""
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store, import_policy="NEW_CHANGED_DELETED")
        await d.start(nursery)
        importer = d.importer
        put = store.gate("PUT", "f", after=True)  # the object is in the bucket, its answer is on its way
        await d.write_file("f", b"gone soon")
        await put.wait_arrived()
        await d.unlink("f")
        await importer.poll()
        with pytest.raises(FileNotFoundError):
            await d.resolve("f")
        put.open()
        await d.settled()
        await importer.poll()
        assert store.objects == {}
        with pytest.raises(FileNotFoundError):
            await d.resolve("f")
        await d.stop()

    run(test)


def test_a_listing_older_than_an_export_does_not_undo_it(tmp_path: Path) -> None:
    """A poll's listing taken before this mount exported (or deleted) a key must not decide about that key: it
    would delete the file just exported (NEW_CHANGED_DELETED) or bring back an object just deleted."""
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store, import_policy="NEW_CHANGED_DELETED")
        await d.start(nursery)
        await d.write_file("gone", b"x")
        await d.settled()
        put = store.gate("PUT", "f")
        await d.write_file("f", b"exported while the listing is on its way")
        await put.wait_arrived()
        listed = store.gate("LIST", "", after=True)
        polled = trio.Event()

        async def poll() -> None:
            await d.importer.poll()
            polled.set()

        nursery.start_soon(poll)
        await listed.wait_arrived()  # the listing shows "gone" and no "f"
        put.open()
        await d.unlink("gone")
        await d.settled()
        listed.open()
        with trio.fail_after(10):
            await polled.wait()
        assert await d.read_file("f") == b"exported while the listing is on its way"
        with pytest.raises(FileNotFoundError):
            await d.resolve("gone")
        assert set(store.objects) == {"f"}
        await d.stop()

    run(test)


def parts_uploaded(store: Bucket) -> int:
    return sum(len(parts) for _, parts, _ in store.uploads.values())


def test_a_large_file_is_uploaded_from_its_close_and_appears_after_the_delay(tmp_path: Path) -> None:
    """Write -> visible: the parts go out as soon as the file is closed, the object appears (the upload completes)
    only once the export delay has passed, as FSx's rule says; a change within the delay aborts that upload."""
    store = Bucket()
    data = os.urandom(5 * MIB + 7)
    delay = 1.0
    written: list[tuple[str, bytes, str]] = []  # every object that appeared: key, body, permissions
    put_object = store.put_object

    def recorded(key: str, body: bytes, metadata: dict[str, str] | None = None) -> str:
        written.append((key, body, (metadata or {}).get("file-permissions", "")))
        return put_object(key, body, metadata)

    store.put_object = recorded  # type: ignore[method-assign]

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store, delay=delay)
        await d.start(nursery)
        await d.write_file("big", data)
        closed = trio.current_time()
        with trio.fail_after(10):
            while parts_uploaded(store) < 6:  # every part, before the delay is over
                await trio.sleep(0.01)
        assert trio.current_time() < closed + delay and "big" not in store.objects
        with trio.fail_after(10):
            while "big" not in store.objects:
                await trio.sleep(0.01)
        assert trio.current_time() >= closed + delay and store.objects["big"].body == data
        assert store.uploads == {}

        await d.write_file("big", data[::-1])  # rewritten, then changed again within the delay
        with trio.fail_after(10):
            while parts_uploaded(store) < 6:
                await trio.sleep(0.01)
        await d.chmod("big", 0o600)
        await d.settled()
        assert store.objects["big"].body == data[::-1] and store.uploads == {}
        assert store.objects["big"].metadata["file-permissions"] == "0100600"
        assert ("big", data[::-1], "0100644") not in written  # the upload started before the chmod never completed

        await d.write_file("gone", data)  # removed within the delay: its upload never completes
        with trio.fail_after(10):
            while parts_uploaded(store) < 6:
                await trio.sleep(0.01)
        await d.unlink("gone")
        await d.settled()
        assert "gone" not in store.objects and store.uploads == {}
        assert "gone" not in [key for key, _, _ in written]  # never appeared, not even for a moment
        assert await d.stop() == []

    run(test)


# ------------------------------------------------------------------------------------------ aborts of uploads


def run_in_thread(test: Test, timeout: float = 20.0) -> None:
    """``run`` in a thread: a trio run that can never end (a task that cannot be cancelled) fails the test
    instead of hanging it (the thread is left behind)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            run(test, timeout)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout + 5)
    assert outcome, "the trio run never ended: a task of the crashed daemon could not be cancelled"
    if outcome[0] is not None:
        raise outcome[0]


def test_a_crash_while_a_superseded_upload_is_aborted_ends_the_crashed_daemon(tmp_path: Path) -> None:
    """The abort of an upload runs shielded from cancellation: a crash meanwhile must still end it (the model
    test's one CI timeout: the crashed daemon's abort waited for ever, so the trio run could not end)."""
    store = Bucket()
    data = os.urandom(3 * MIB + 5)

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store, delay=0.2)
        await d.start(nursery)
        abort = store.gate("DELETE", "big")  # the abort of the upload stops here, on its way to the bucket
        await d.write_file("big", data)  # closed: its parts go out, the completion waits for the delay
        with trio.fail_after(10):
            while parts_uploaded(store) < 4:
                await trio.sleep(0.01)
        await d.write_file("big", data[::-1], close=False)  # reopened for writing: that upload is superseded
        await abort.wait_arrived()
        await d.crash()
        abort.open()  # the request arrives; its answer goes to a dead process
        with trio.move_on_after(5):
            await d._ended.wait()
        assert d._ended.is_set(), "the crashed daemon's tasks did not end"
        again = Daemon(tmp_path, store, delay=0.2)
        await again.start(nursery)
        await again.settled()
        assert store.objects["big"].body == data[::-1] and store.uploads == {}
        assert await again.stop() == []

    run_in_thread(test)


def test_a_crash_while_a_failed_upload_is_aborted_ends_the_crashed_daemon(tmp_path: Path) -> None:
    store = Bucket()
    data = os.urandom(3 * MIB + 5)
    puts = [0]

    def second_put(key: str) -> bool:  # the first part of the upload (the first PUT starts it)
        puts[0] += 1
        return key == "big" and puts[0] == 2

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        part = store.gate("PUT", second_put)
        abort = store.gate("DELETE", "big")
        await d.write_file("big", data)
        await part.wait_arrived()
        store.faults.fail["PUT"] = 1  # a part fails: the upload is aborted
        part.open()
        await abort.wait_arrived()
        await d.crash()
        abort.open()
        with trio.move_on_after(5):
            await d._ended.wait()
        assert d._ended.is_set(), "the crashed daemon's tasks did not end"
        again = Daemon(tmp_path, store)
        await again.start(nursery)
        await again.settled()
        assert store.objects["big"].body == data and store.uploads == {}
        assert await again.stop() == []

    run_in_thread(test)


def test_a_failed_abort_of_a_failed_upload_is_tried_again(tmp_path: Path) -> None:
    store = Bucket()
    data = os.urandom(3 * MIB + 5)
    puts = [0]

    def second_put(key: str) -> bool:
        puts[0] += 1
        return key == "big" and puts[0] == 2

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store)
        await d.start(nursery)
        part = store.gate("PUT", second_put)
        await d.write_file("big", data)
        await part.wait_arrived()
        store.faults.fail.update(PUT=1, DELETE=1)  # a part fails, then the abort of the upload fails
        part.open()
        await d.settled()
        assert store.uploads == {}  # was left open in the bucket
        assert store.objects["big"].body == data
        assert await d.stop() == []

    run(test)


def test_a_failed_abort_of_a_superseded_upload_is_tried_again(tmp_path: Path) -> None:
    """The model test's minimal case (a file of two parts, then faults within the export delay)."""
    store = Bucket()
    data = os.urandom(3 * MIB + 5)

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store, delay=0.2)
        await d.start(nursery)
        await d.write_file("big", data)
        with trio.fail_after(10):
            while parts_uploaded(store) < 4:
                await trio.sleep(0.01)
        store.faults.fail["DELETE"] = 1  # the abort of the superseded upload fails
        await d.write_file("big", data[::-1])  # rewritten within the delay: that upload is superseded
        await d.settled()
        assert store.uploads == {}
        assert store.objects["big"].body == data[::-1]
        assert await d.stop() == []

    run(test)


def test_an_upload_whose_abort_failed_is_aborted_after_a_crash(tmp_path: Path) -> None:
    """The key stays an intent until its upload is aborted: a crash meanwhile leaves it to the next start."""
    store = Bucket()
    data = os.urandom(3 * MIB + 5)

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store, delay=0.2)
        await d.start(nursery)
        await d.write_file("big", data)
        with trio.fail_after(10):
            while parts_uploaded(store) < 4:
                await trio.sleep(0.01)
        store.faults.hang = {"DELETE"}  # every abort fails (after hang_bound)
        await d.write_file("big", data[::-1])
        with trio.fail_after(10):
            while store.requests["DELETE"] < 2:  # the abort failed, and its retry is under way
                await trio.sleep(0.01)
        await d.crash()
        store.faults.hang = set()
        again = Daemon(tmp_path, store, delay=0.2)
        await again.start(nursery)
        await again.settled()
        assert store.uploads == {}
        assert store.objects["big"].body == data[::-1]
        assert await again.stop() == []

    run(test)


def test_a_file_is_not_exported_before_the_delay_after_its_close(tmp_path: Path) -> None:
    """A create makes the entry due at once (it waits for its writers); an export task started for that while
    the file was being written must not upload it once it is closed: the delay counts from the close."""
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store, delay=3600.0)
        await d.start(nursery)
        for i in range(30):
            parent, name = await d.parent_of(f"f{i}")
            info, _ = await d.ops.create(parent, name, 0o644, os.O_WRONLY, Ctx())
            await d.ops.write(info.fh, 0, b"x")  # the exporter runs meanwhile: its task for f{i} starts later
            await d.close(info.fh)
            await trio.sleep(0.001)
        await trio.sleep(0.1)
        assert store.objects == {}
        await d.stop(export_timeout=0)

    run(test)
