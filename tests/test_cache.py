"""Unit tests of the data cache on the in-memory repository: single-flight fetches, eviction, local data, adoption."""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from memrepo import Bucket, MemoryRepository

from lustrefs.data.cache import Cache, FileData, ObjectVersion
from lustrefs.s3.repository import VersionChanged
from lustrefs.store import db

PART = 64 * 1024


def run_with(
    tmp_path: Path, capacity: int, test: Callable[[Cache, Bucket], Awaitable[None]], part: int = PART
) -> None:
    store = Bucket()
    conn = db.connect(tmp_path / "state.db")
    (tmp_path / "cache").mkdir()
    cache = Cache(conn, MemoryRepository(store), [tmp_path / "cache"], capacity, 4 * part, part)
    cache.load()

    async def main() -> None:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(cache.run)
                await test(cache, store)
                nursery.cancel_scope.cancel()

    trio.run(main)
    conn.close()


def version(store: Bucket, ino: int, key: str, data: bytes) -> ObjectVersion:
    return ObjectVersion(ino, key, store.put_object(key, data), len(data))


def test_concurrent_reads_of_one_part_share_one_get(tmp_path: Path) -> None:
    data = os.urandom(3 * PART)

    async def test(cache: Cache, store: Bucket) -> None:
        obj = version(store, 2, "f", data)
        gate = store.gate("GET", "f")
        results: list[bytes] = []

        async def read() -> None:
            results.append(bytes(await cache.read_source(obj, PART, PART)))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(read)
            await gate.wait_arrived()
            await trio.testing.wait_all_tasks_blocked()
            gate.open()
        assert results == [data[PART : 2 * PART]] * 5
        assert store.requests["GET"] == 1
        assert bytes(await cache.read_source(obj, PART, PART)) == data[PART : 2 * PART]  # now from the cache
        assert store.requests["GET"] == 1

    run_with(tmp_path, 64 * PART, test)


def test_clean_parts_are_evicted_least_recently_used_first(tmp_path: Path) -> None:
    async def test(cache: Cache, store: Bucket) -> None:
        objs = [version(store, 10 + i, f"o{i}", os.urandom(PART)) for i in range(4)]
        for obj in objs[:3]:
            await cache.read_source(obj, 0, PART)
        await cache.read_source(objs[0], 0, PART)  # o0 is now the most recently used
        await cache.read_source(objs[3], 0, PART)  # a fourth part does not fit in three
        assert cache.cached_bytes(objs[1].ino) == 0
        assert [cache.cached_bytes(o.ino) for o in (objs[0], objs[2], objs[3])] == [PART] * 3
        assert cache.used <= 3 * PART

    run_with(tmp_path, 3 * PART, test)


def test_local_data_is_never_evicted_and_fills_up_with_enospc(tmp_path: Path) -> None:
    async def test(cache: Cache, store: Bucket) -> None:
        clean = version(store, 5, "c", os.urandom(PART))
        await cache.read_source(clean, 0, PART)
        f = FileData(6, 0, None, True)
        await cache.write(f, 0, b"a" * PART)
        await cache.write(FileData(6, PART, None, True), PART, b"b" * PART)
        assert cache.cached_bytes(clean.ino) == 0  # the clean part made room
        with pytest.raises(OSError) as exc:
            await cache.write(FileData(6, 2 * PART, None, True), 2 * PART, b"c")
        assert exc.value.errno == errno.ENOSPC
        assert bytes(await cache.read(FileData(6, 2 * PART, None, True), 0, 2 * PART)) == b"a" * PART + b"b" * PART

    run_with(tmp_path, 2 * PART, test)


def test_writes_copy_the_source_on_write_and_adopt_becomes_clean_data(tmp_path: Path) -> None:
    data = os.urandom(2 * PART + 10)

    async def test(cache: Cache, store: Bucket) -> None:
        src = version(store, 7, "f", data)
        await cache.write(FileData(7, len(data), src, True), 5, b"XYZ")
        await cache.write(FileData(7, len(data), src, True), PART, b"!")  # both parts are local now
        expected = data[:5] + b"XYZ" + data[8:PART] + b"!" + data[PART + 1 :]
        assert bytes(await cache.read(FileData(7, len(data), src, True), 0, len(data))) == expected
        cache.truncate(FileData(7, len(data), src, True), PART + 1)
        new = version(store, 7, "f", expected[: PART + 1])
        cache.adopt(7, src, new)  # the export wrote the file: its local parts are parts of the new version
        gets = store.requests["GET"]
        assert bytes(await cache.read(FileData(7, PART + 1, new, False), 0, PART + 1)) == expected[: PART + 1]
        assert store.requests["GET"] == gets
        assert cache.local_bytes() == 0

    run_with(tmp_path, 64 * PART, test)


def test_a_version_gone_from_s3_is_estale_unless_cached(tmp_path: Path) -> None:
    async def test(cache: Cache, store: Bucket) -> None:
        old = version(store, 8, "f", os.urandom(2 * PART))
        await cache.read_source(old, 0, PART)
        store.put_object("f", b"new")
        assert len(await cache.read_source(old, 0, PART)) == PART  # cached: served
        with pytest.raises(VersionChanged):
            await cache.read_source(old, PART, PART)

    run_with(tmp_path, 64 * PART, test)


def test_a_random_small_read_costs_one_small_get_and_a_second_one_caches_the_part(tmp_path: Path) -> None:
    big = 1024 * 1024  # parts larger than a small read
    data = os.urandom(4 * big)

    async def test(cache: Cache, store: Bucket) -> None:
        obj = version(store, 2, "f", data)
        assert bytes(await cache.read_source(obj, 2 * big + 10, 4096)) == data[2 * big + 10 : 2 * big + 4106]
        await trio.testing.wait_all_tasks_blocked()
        assert store.requests["GET"] == 1 and cache.cached_bytes(2) == 0  # nothing fetched behind it
        assert bytes(await cache.read_source(obj, 2 * big + 9000, 4096)) == data[2 * big + 9000 :][:4096]
        await trio.testing.wait_all_tasks_blocked()
        assert store.requests["GET"] == 3 and cache.cached_bytes(2) == big  # read twice: the part is cached
        assert bytes(await cache.read_source(obj, 2 * big + 5, 4096)) == data[2 * big + 5 : 2 * big + 4101]
        assert store.requests["GET"] == 3

    run_with(tmp_path, 64 * big, test, part=big)
