"""The cluster engine, in process: several hosts (daemons with their own home and cache) on one PostgreSQL
database and one bucket. Namespace operations are shared at once, data is shared from the close on, one host
leads (exports, imports), and another takes over when it dies."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import psycopg
import pyfuse3
import pytest
import trio
from inproc import FS_ID, Ctx, Daemon, run
from memrepo import Bucket
from psycopg.conninfo import conninfo_to_dict

from lustrefs.constants import ROOT_INODE, STAGING_NAME
from lustrefs.store import db
from lustrefs.sync import exporter

STAGING = f"{STAGING_NAME}/{FS_ID}/"


def staged_keys(store: Bucket) -> list[str]:
    return [k for k in store.objects if k.startswith(STAGING)]


async def hosts(
    tmp_path: Path, store: Bucket, conninfo: str, nursery: trio.Nursery, n: int = 2, **kw: object
) -> list[Daemon]:
    """``n`` hosts; the first leads."""
    out = []
    for i in range(n):
        d = Daemon(tmp_path / f"host{i}", store, cluster=conninfo, **kw)  # type: ignore[arg-type]
        await d.start(nursery)
        await d.listening()
        if i == 0:
            await d.leading()
        out.append(d)
    return out


async def wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


def test_names_and_closed_data_are_shared_at_once(tmp_path: Path, pg_database: str) -> None:
    store = Bucket()
    store.put_object("in/s3.txt", b"from s3")

    async def test(nursery: trio.Nursery) -> None:
        a, b = await hosts(tmp_path, store, pg_database, nursery, delay=3600.0)
        await a.mkdir("results")
        await a.write_file("results/r1", b"one")
        # B finds the name and reads the bytes right after A's close returned: no export happened (delay 1 h).
        assert await b.read_file("results/r1") == b"one"
        assert (await b.ops.getattr(await b.resolve("results/r1"), Ctx())).st_size == 3
        assert "results/r1" not in store.objects and len(staged_keys(store)) == 1
        # ... both ways, and a rewrite replaces the staged data.
        await b.write_file("results/r1", b"two!")
        assert await a.read_file("results/r1") == b"two!"
        # The same inode numbers on every host; the S3 listing is loaded once for all.
        assert await a.resolve("in/s3.txt") == await b.resolve("in/s3.txt")
        assert await b.read_file("in/s3.txt") == b"from s3"
        # Unlink and rename on one host are seen on the other.
        await a.rename("results/r1", "results/r2")
        with pytest.raises(FileNotFoundError):
            await b.resolve("results/r1")
        assert await b.read_file("results/r2") == b"two!"
        await b.unlink("results/r2")
        with pytest.raises(FileNotFoundError):
            await a.resolve("results/r2")
        for d in (b, a):
            await d.stop()

    run(test)


def test_exclusive_create_is_atomic_across_hosts(tmp_path: Path, pg_database: str) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        a, b = await hosts(tmp_path, store, pg_database, nursery)
        await a.write_file("x", b"a")
        with pytest.raises(pyfuse3.FUSEError) as err:
            await b.ops.create(ROOT_INODE, b"x", 0o644, os.O_WRONLY | os.O_EXCL, Ctx())
        assert err.value.errno == errno.EEXIST
        # B looked before A created the name (a stale read): its insert finds the name taken, EEXIST.
        b.ns.inodes.child = lambda parent, name: None  # type: ignore[method-assign]
        await a.write_file("y", b"a")
        with pytest.raises(pyfuse3.FUSEError) as err:
            await b.ops.create(ROOT_INODE, b"y", 0o644, os.O_WRONLY | os.O_EXCL, Ctx())
        assert err.value.errno == errno.EEXIST
        with pytest.raises(pyfuse3.FUSEError) as err:
            await b.ops.mkdir(ROOT_INODE, b"y", 0o755, Ctx())
        assert err.value.errno == errno.EEXIST
        for d in (b, a):
            await d.stop()

    run(test)


def test_the_leader_exports_what_other_hosts_closed(tmp_path: Path, pg_database: str) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        a, b = await hosts(tmp_path, store, pg_database, nursery)
        assert a.core.leading and not b.core.leading
        assert a.core.control.snapshot()["cluster"] == {"host": "host0", "leading": True}  # lustrefs stats
        assert b.core.control.snapshot()["cluster"] == {"host": "host1", "leading": False}
        big = os.urandom(3 * 1024 * 1024 + 5)  # a multipart staging upload
        await b.mkdir("d")
        await b.write_file("d/small", b"small")
        await b.write_file("d/big", big)
        await b.symlink("d/link", "big")
        await a.settled()
        assert store.objects["d/small"].body == b"small" and store.objects["d/big"].body == big
        assert "file-permissions" in store.objects["d/big"].metadata
        assert store.objects["d/link"].body == b"big" and "d/" in store.objects
        assert staged_keys(store) == []  # copied to their keys, then deleted
        # A file open for writing on B is B's until it closes: the leader does not export it meanwhile.
        fh = await b.write_file("d/open", b"partial", close=False)
        await a.settled()
        assert "d/open" not in store.objects
        await b.close(fh)
        await a.settled()
        assert store.objects["d/open"].body == b"partial"
        for d in (b, a):
            await d.stop()

    run(test)


def test_a_host_killed_mid_write_loses_nothing_it_closed(tmp_path: Path, pg_database: str) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        a, b = await hosts(tmp_path, store, pg_database, nursery)
        await b.write_file("closed", b"closed data")
        fh = await b.write_file("unclosed", b"unclosed data", close=False)
        await b.crash()
        # The other host goes on: it reads what B closed, and exports it.
        assert await a.read_file("closed") == b"closed data"
        await a.write_file("after", b"A goes on")
        await a.settled()
        assert store.objects["closed"].body == b"closed data" and store.objects["after"].body == b"A goes on"
        assert "unclosed" not in store.objects  # B's, in B's cache only
        assert fh
        # B comes back: what it had written but not closed goes to shared storage, and is exported.
        b2 = Daemon(tmp_path / "host1", store, cluster=pg_database)
        await b2.start(nursery)
        await wait_for(lambda: not a.ns.inodes.held("host1"))
        assert await a.read_file("unclosed") == b"unclosed data"
        await a.settled()
        assert store.objects["unclosed"].body == b"unclosed data"
        for d in (b2, a):
            await d.stop()

    run(test)


def test_another_host_takes_over_when_the_leader_dies(tmp_path: Path, pg_database: str) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        a, b = await hosts(tmp_path, store, pg_database, nursery, delay=3600.0)
        await b.write_file("f", b"before")  # due in an hour on the leader A
        await a.crash()
        started = trio.current_time()
        await b.leading(timeout=10)
        gap = trio.current_time() - started
        assert gap < 5, gap
        b.writeback.schedule(await b.resolve("f"), 0)  # the new leader exports what is dirty
        await b.settled()
        assert store.objects["f"].body == b"before"
        await b.stop()

    run(test)


def test_other_hosts_kernels_drop_what_changed(
    tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Bucket()
    dropped: list[tuple[int, bytes | None]] = []
    monkeypatch.setattr(pyfuse3, "invalidate_entry", lambda parent, name: dropped.append((parent, name)))
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino, attr_only=False: dropped.append((ino, None)))

    async def test(nursery: trio.Nursery) -> None:
        a, b = await hosts(tmp_path, store, pg_database, nursery)
        await a.write_file("f", b"x")
        ino = await b.resolve("f")  # B's kernel knows f now
        dropped.clear()
        await a.chmod("f", 0o600)
        await wait_for(lambda: (ino, None) in dropped)
        await a.write_file("new", b"y")
        await wait_for(lambda: (ROOT_INODE, b"new") in dropped)  # a negative entry B may have cached goes
        await a.rename("f", "g")
        await wait_for(lambda: (ROOT_INODE, b"f") in dropped and (ROOT_INODE, b"g") in dropped)
        own = len(dropped)
        await b.chmod("g", 0o644)  # B's own change: B's kernel knows it already
        await a.chmod("g", 0o640)
        await wait_for(lambda: len(dropped) > own)
        for d in (b, a):
            await d.stop()

    run(test)


def test_a_database_restart_fails_calls_then_mounts_recover(
    tmp_path: Path, pg_database: str, postgres_server: object
) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        a, b = await hosts(tmp_path, store, pg_database, nursery)
        await a.write_file("before", b"1")
        await trio.to_thread.run_sync(postgres_server.restart)  # type: ignore[attr-defined]
        # A call that finds its host's connection lost fails (through FUSE: EIO); nothing is half-applied.
        for d in (a, b):
            with contextlib.suppress(pyfuse3.FUSEError):
                await d.resolve("before")
        # Then the hosts work again, without a remount.
        assert await b.read_file("before") == b"1"
        await b.write_file("after", b"2")
        assert await a.read_file("after") == b"2"
        await wait_for(lambda: a.core.leading or b.core.leading, timeout=30)  # one of them leads again
        await (a if a.core.leading else b).settled(timeout=30)
        assert store.objects["after"].body == b"2"
        for d in (b, a):
            await d.stop()

    run(test, timeout=90)


def test_an_explicit_export_on_another_host_is_done_by_the_leader(tmp_path: Path, pg_database: str) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        # No automatic export at all: only the explicit one (hsm_archive, an export task) writes the object.
        a, b = await hosts(tmp_path, store, pg_database, nursery, policy=frozenset())
        fh = await b.write_file("f", b"archive me", close=False)
        assert await b.writeback.export_now(await b.resolve("f")) is not None  # open for writing: refused
        await b.close(fh)
        assert await b.writeback.export_now(await b.resolve("f")) is None
        assert store.objects["f"].body == b"archive me"
        assert not b.ns.get(await b.resolve("f")).dirty
        for d in (b, a):
            await d.stop()

    run(test)


def test_an_empty_connection_string_uses_libpq_environment(
    tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = conninfo_to_dict(pg_database)
    for env, name in (("PGHOST", "host"), ("PGPORT", "port"), ("PGDATABASE", "dbname"), ("PGUSER", "user")):
        monkeypatch.setenv(env, str(params[name]))
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        a, b = await hosts(tmp_path, store, "", nursery)
        await a.write_file("f", b"through PGHOST")
        assert await b.read_file("f") == b"through PGHOST"
        for d in (b, a):
            await d.stop()

    run(test)
    monkeypatch.setenv("PGDATABASE", "no_such_database")
    with pytest.raises(psycopg.OperationalError, match="no_such_database"):
        Daemon(tmp_path / "other", store, cluster="")


def test_a_staging_upload_left_by_a_dead_host_is_cleaned_up_only_once_it_is_old(
    tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Bucket()
    monkeypatch.setattr(exporter, "STAGING_SCAN", 0.0)

    async def test(nursery: trio.Nursery) -> None:
        a, b = await hosts(tmp_path, store, pg_database, nursery)
        await b.write_file("f", b"x")
        # B dies while staging: its intent is recorded and its multipart upload started.
        key = STAGING + "2-9-dead"
        with db.transaction(b.ns.conn):
            b.ns.exports.begin(await b.resolve("f"), key)
        await b.repo.start_upload(key, {})
        await b.crash()
        # A young staging intent may be another host's upload in flight: a leader starting now leaves it alone.
        await a.crash()
        a = Daemon(tmp_path / "host0", store, cluster=pg_database)
        await a.start(nursery)
        await a.leading()
        await trio.sleep(0.2)  # several scans (STAGING_SCAN 0)
        assert len(store.uploads) == 1 and [k for k, _ in a.ns.exports.intents()] == [key]
        # Once it is older than STAGING_GRACE, nobody will finish it: the leader aborts it and forgets it.
        monkeypatch.setattr(exporter, "STAGING_GRACE", 0.0)
        await wait_for(lambda: not store.uploads and not a.ns.exports.intents())
        assert staged_keys(store) == []
        await a.stop()

    run(test)


def test_a_staged_file_removed_before_its_export_leaves_no_staging_object(tmp_path: Path, pg_database: str) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        a, b = await hosts(tmp_path, store, pg_database, nursery, delay=3600.0)  # nothing exported meanwhile
        await b.write_file("f", b"staged, never exported")
        assert len(staged_keys(store)) == 1
        await b.unlink("f")
        await wait_for(lambda: staged_keys(store) == [])  # the leader deleted it
        assert "f" not in store.objects and not a.ns.exports.pending_deletes()
        for d in (b, a):
            await d.stop()

    run(test)


def test_a_close_whose_staging_fails_is_eio_and_the_data_stays(tmp_path: Path, pg_database: str) -> None:
    store = Bucket()

    async def test(nursery: trio.Nursery) -> None:
        a, b = await hosts(tmp_path, store, pg_database, nursery)
        fh = await b.write_file("f", b"kept", close=False)
        store.faults.error_rate = 1.0
        with pytest.raises(pyfuse3.FUSEError) as err:
            await b.ops.flush(fh)
        assert err.value.errno == errno.EIO
        await b.ops.release(fh)
        assert b.ns.get(await b.resolve("f")).holder == "host1"  # still B's: nothing lost
        store.faults.error_rate = 0.0
        fh = (await b.ops.open(await b.resolve("f"), os.O_WRONLY, Ctx())).fh
        await b.close(fh)  # the next close stages it
        assert await a.read_file("f") == b"kept"
        for d in (b, a):
            await d.stop()

    run(test)
