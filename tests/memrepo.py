"""An in-memory data repository with fault injection: the test seam of the core (no FUSE, no HTTP).

``MemoryRepository`` has the interface of :class:`lustrefs.s3.repository.Repository` (``ObjectStore``) over a
``Bucket`` in memory, which can make requests fail, take time, return cut bodies, hang until their bound, or stop
at a gate until the test lets them go on. Each daemon of a test gets its own ``MemoryRepository`` on the shared
bucket; ``kill()`` makes it a crashed process's: nothing it does reaches the bucket any more (an upload in
flight is left open, as a crash leaves it).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import trio

from lustrefs.s3.repository import NotFound, ObjectInfo, Page, RepositoryError, Unavailable, VersionChanged

OPS = ("LIST", "HEAD", "GET", "PUT", "COPY", "DELETE")


@dataclass
class Obj:
    body: bytes
    etag: str
    mtime_ns: int
    metadata: dict[str, str]


@dataclass
class Gate:
    """Requests of one kind stop here until :meth:`open` (``arrived`` counts those waiting)."""

    match: Callable[[str], bool]
    after: bool = False  # stop after the request took effect (its answer is on the way), not before
    released: trio.Event = field(default_factory=trio.Event)
    arrived: int = 0
    changed: trio.Event = field(default_factory=trio.Event)

    def open(self) -> None:
        self.released.set()

    async def wait_arrived(self, n: int = 1, timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while self.arrived < n:
                await self.changed.wait()


@dataclass
class Faults:
    """What goes wrong: ``fail[op]`` requests still to fail, ``error_rate`` of every request failing (seeded),
    ``latency`` seconds per request, ``hang`` ops that block until ``hang_bound`` and fail, ``cut`` GETs
    returning half their body."""

    fail: dict[str, int] = field(default_factory=dict)
    error_rate: float = 0.0
    latency: float = 0.0
    hang: set[str] = field(default_factory=set)
    hang_bound: float = 0.5
    cut: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(0))


def _etag(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class Bucket:
    """Objects, multipart uploads in progress, and the faults and gates every request goes through."""

    def __init__(self, name: str = "mem") -> None:
        self.name = name
        self.objects: dict[str, Obj] = {}
        self.uploads: dict[str, tuple[str, dict[int, bytes], dict[str, str]]] = {}  # id -> key, parts, meta
        self.faults = Faults()
        self.gates: dict[str, list[Gate]] = {op: [] for op in OPS}
        self.requests = dict.fromkeys(OPS, 0)
        self._ids = 0

    # ------------------------------------------------------------------------------------- test controls

    def gate(self, op: str, key: str | Callable[[str], bool] = "", after: bool = False) -> Gate:
        """Stop requests of ``op`` (on keys starting with ``key``, or matching it) until the gate opens;
        ``after``: once they took effect, before their answer."""
        match = key if callable(key) else (lambda k, prefix=key: k.startswith(prefix))
        g = Gate(match, after)
        self.gates[op].append(g)
        return g

    def put_object(self, key: str, body: bytes, metadata: dict[str, str] | None = None) -> str:
        """Set an object directly (another writer of the bucket)."""
        etag = _etag(body)
        self.objects[key] = Obj(body, etag, time.time_ns(), dict(metadata or {}))
        return etag

    def new_upload(self, key: str, metadata: dict[str, str]) -> tuple[str, dict[int, bytes]]:
        self._ids += 1
        upload_id = f"upload-{self._ids}"
        parts: dict[int, bytes] = {}
        self.uploads[upload_id] = (key, parts, metadata)
        return upload_id, parts

    async def stop_at_gates(self, op: str, key: str, after: bool) -> None:
        for g in list(self.gates[op]):
            if g.after == after and g.match(key) and not g.released.is_set():
                g.arrived += 1
                g.changed.set()
                g.changed = trio.Event()
                await g.released.wait()

    async def request(self, op: str, key: str) -> None:
        """One request's way through the gates and faults, before it takes effect."""
        self.requests[op] += 1
        await self.stop_at_gates(op, key, after=False)
        f = self.faults
        if f.latency:
            await trio.sleep(f.latency)
        if op in f.hang:
            await trio.sleep(f.hang_bound)
            raise Unavailable(f"{op} {key}: no answer within {f.hang_bound}s")
        if f.fail.get(op):
            f.fail[op] -= 1
            raise RepositoryError(f"{op} {key}: injected failure")
        if f.error_rate and f.rng.random() < f.error_rate:
            raise RepositoryError(f"{op} {key}: injected 500")
        await trio.lowlevel.checkpoint()


class MemoryRepository:
    """One daemon's client of a ``Bucket``; the async methods are those lustrefs.s3.repository.Repository offers."""

    def __init__(self, store: Bucket, others: dict[str, Bucket] | None = None) -> None:
        """``others``: the buckets a copy may read from besides ``store`` (by name)."""
        self.store = store
        self.others = others or {}
        self.bucket = store.name
        self.requests = store.requests
        self.fast = None
        self.dead = False
        self.refuse: RepositoryError | None = None  # every request fails so (a bucket that does not exist)
        self.upload_slots = trio.Semaphore(4)

    def kill(self) -> None:
        """The process of this client crashed: its requests from now on never reach the bucket."""
        self.dead = True

    @property
    def objects(self) -> dict[str, Obj]:
        return self.store.objects

    async def _lost(self, op: str, key: str) -> NoReturn:
        """A request of a crashed process: no answer ever comes. Its task ends at the crash's cancellation; one in
        a shielded scope (the abort of an upload), which that cannot reach, ends with an error instead: a
        process killed with -9 runs nothing more, and a task left waiting here would hold the test's nursery (and
        trio.run) open for ever."""
        await trio.lowlevel.checkpoint()
        raise Unavailable(f"{op} {key}: the process crashed")

    async def _request(self, op: str, key: str) -> None:
        if self.dead:
            await self._lost(op, key)
        if self.refuse is not None:
            raise self.refuse
        await self.store.request(op, key)
        if self.dead:  # crashed while the request was on its way: its effect is lost with the process
            await self._lost(op, key)

    async def _answer(self, op: str, key: str) -> None:
        """The request took effect; its answer may be held at a gate (and lost to a crash)."""
        await self.store.stop_at_gates(op, key, after=True)
        if self.dead:
            await self._lost(op, key)

    # ------------------------------------------------------------------------------------- reads

    async def list_page(self, prefix: str, token: str | None, max_keys: int = 1000) -> Page:
        await self._request("LIST", prefix)
        entries: dict[str, ObjectInfo | None] = {}
        for key in sorted(k for k in self.objects if k.startswith(prefix)):
            rest = key[len(prefix) :]
            if "/" in rest:
                entries.setdefault(prefix + rest.split("/", 1)[0] + "/", None)
            else:
                o = self.objects[key]
                entries[key] = ObjectInfo(key, len(o.body), o.etag, o.mtime_ns)
        names = sorted(n for n in entries if token is None or n > token)
        page, more = names[:max_keys], len(names) > max_keys
        await self._answer("LIST", prefix)  # the listing is taken: the bucket may change before it arrives
        return Page(
            [n for n in page if entries[n] is None],
            [entries[n] for n in page if entries[n] is not None],  # type: ignore[misc]
            page[-1] if more else None,
        )

    async def any_key(self, prefix: str) -> bool:
        await self._request("LIST", prefix)
        return any(k.startswith(prefix) for k in self.objects)

    async def head(self, key: str) -> ObjectInfo:
        await self._request("HEAD", key)
        o = self._get(key)
        return ObjectInfo(key, len(o.body), o.etag, o.mtime_ns, dict(o.metadata))

    def _get(self, key: str, etag: str | None = None) -> Obj:
        o = self.objects.get(key)
        if o is None:
            raise NotFound(f"{key}: NoSuchKey")
        if etag is not None and o.etag != etag:
            raise VersionChanged(f"{key}: 412 PreconditionFailed")
        return o

    async def get_range(self, key: str, etag: str, start: int, end: int) -> bytes:
        await self._request("GET", key)
        data = self._get(key, etag).body[start:end]
        if self.store.faults.cut:
            self.store.faults.cut -= 1
            data = data[: len(data) // 2]
        if len(data) != end - start:
            raise RepositoryError(f"GET {key}: {len(data)} bytes, expected {end - start}")
        return data

    async def get_object(self, key: str, etag: str) -> bytes:
        await self._request("GET", key)
        return self._get(key, etag).body

    # ------------------------------------------------------------------------------------- writes

    async def put(self, key: str, body: bytes, metadata: dict[str, str]) -> str:
        await self._request("PUT", key)
        etag = self.store.put_object(key, bytes(body), metadata)
        await self._answer("PUT", key)
        return etag

    async def copy(
        self, src_key: str, src_etag: str, key: str, metadata: dict[str, str], src_bucket: str | None = None
    ) -> str:
        await self._request("COPY", key)
        source = self if src_bucket in (None, self.bucket) else MemoryRepository(self.others[src_bucket])
        etag = self.store.put_object(key, source._get(src_key, src_etag).body, metadata)
        await self._answer("COPY", key)
        return etag

    async def delete_many(self, keys: list[str]) -> dict[str, str]:
        """DeleteObjects: one request, each key through the gates and faults (a failed key is reported)."""
        failed: dict[str, str] = {}
        for key in keys:
            try:
                await self._request("DELETE", key)
            except RepositoryError as exc:
                failed[key] = str(exc)
                continue
            self.objects.pop(key, None)
            await self._answer("DELETE", key)
        return failed

    async def start_upload(self, key: str, metadata: dict[str, str]) -> str:
        await self._request("PUT", key)
        return self.store.new_upload(key, metadata)[0]

    async def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> str:
        await self._request("PUT", key)
        if upload_id not in self.store.uploads:
            raise NotFound(f"upload {upload_id} of {key}: NoSuchUpload")
        self.store.uploads[upload_id][1][number] = body
        return _etag(body)

    async def complete_upload(self, key: str, upload_id: str, etags: dict[int, str]) -> str:
        await self._request("PUT", key)
        if upload_id not in self.store.uploads:
            raise NotFound(f"upload {upload_id} of {key}: NoSuchUpload")
        _, parts, metadata = self.store.uploads.pop(upload_id)
        body = b"".join(parts[n] for n in sorted(etags))
        self.store.put_object(key, body, metadata)
        etag = f"{_etag(body)}-{len(etags)}"
        self.objects[key].etag = etag
        await self._answer("PUT", key)
        return etag

    async def abort_upload(self, key: str, upload_id: str) -> None:
        if self.dead:
            return  # a crashed process aborts nothing
        await self._request("DELETE", key)
        self.store.uploads.pop(upload_id, None)

    async def abort_uploads(self, key: str) -> int:
        await self._request("LIST", key)
        ids = [i for i, (k, _, _) in self.store.uploads.items() if k == key]
        for upload_id in ids:
            await self._request("DELETE", key)
            self.store.uploads.pop(upload_id, None)
        return len(ids)
