"""One ``ObjectStore`` over the buckets of a file system's data repository associations.

The core sees one bucket whose keys are paths below the file system root (lustrefs.associations); each request
goes to the repository of the association that holds its key, with the real key. Directories above the
associations' roots are listed as the common prefixes that lead to them; keys outside every association are
refused (``OutsideAssociations``; the exporter does not export them). The cluster's staging area is the first
association's bucket's.  The associations can change while
mounted (``update``).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from lustrefs.associations import Associations
from lustrefs.constants import STAGING_NAME
from lustrefs.s3.repository import NotFound, ObjectInfo, ObjectStore, Page

OUTSIDE = "S3ExportLocalObjectNotMatchDra"


class OutsideAssociations(NotFound):
    """A key no data repository association holds: no object is there (a directory above the associations has
    no object, as an implied directory)."""

    code = OUTSIDE


class RoutedStore:
    """``ObjectStore`` for a file system with associations: ``store_for(bucket)`` gives each bucket's repository."""

    def __init__(self, associations: Associations, store_for: Callable[[str], ObjectStore], slots: int = 8) -> None:
        self.map = associations
        self.store_for = store_for  # cached by the caller: one repository per bucket
        self.bucket = "(associations)"
        self.fast = None
        self.upload_slots = trio.Semaphore(slots)
        self._stores: dict[str, ObjectStore] = {}

    def update(self, associations: Associations) -> None:
        self.map = associations

    def association_of(self, path: str) -> str | None:
        """The id of the association holding ``path`` now (events and reports name it)."""
        return self.map.association_of(path)

    @property
    def stop_at(self) -> float:
        return min((getattr(s, "stop_at", float("inf")) for s in self.stores), default=float("inf"))

    @stop_at.setter
    def stop_at(self, when: float) -> None:
        """Requests still running at ``when`` (trio clock) fail at once (set at unmount), in every bucket."""
        for store in self.stores:
            store.stop_at = when  # type: ignore[attr-defined]

    @property
    def stores(self) -> list[ObjectStore]:
        """The repositories of the buckets used so far."""
        return list(self._stores.values())

    @property
    def requests(self) -> dict[str, int]:
        """The requests of every bucket's repository, summed by kind."""
        total: dict[str, int] = {}
        for store in self.stores:
            for kind, n in store.requests.items():
                total[kind] = total.get(kind, 0) + n
        return total

    def _store(self, bucket: str) -> ObjectStore:
        store = self._stores.get(bucket)
        if store is None:
            store = self._stores[bucket] = self.store_for(bucket)
        return store

    def _route(self, vkey: str) -> tuple[ObjectStore, str]:
        if vkey.startswith(STAGING_NAME + "/") and self.map.all:  # the cluster's staging area: the first bucket's
            return self._store(self.map.all[0].bucket), vkey
        found = self.map.find(vkey)
        if found is None:
            raise OutsideAssociations(f"{vkey}: in no data repository association")
        association, key = found
        return self._store(association.bucket), key

    def _back(self, bucket: str, key: str) -> str | None:
        return self.map.virtual(bucket, key)

    # ----------------------------------------------------------------------------------------- listing

    async def list_page(self, prefix: str, token: str | None, max_keys: int = 1000) -> Page:
        found = self.map.find(prefix)
        if found is None:  # above the associations: the ways down to their roots
            return Page(self.map.dirs_above(prefix), [], None)
        association, real = found
        page = await self._store(association.bucket).list_page(real, token, max_keys)
        prefixes = [v for p in page.prefixes if (v := self._back(association.bucket, p)) is not None]
        objects = [
            ObjectInfo(v, o.size, o.etag, o.mtime_ns, o.metadata)
            for o in page.objects
            if (v := self._back(association.bucket, o.key)) is not None
        ]
        return Page(prefixes, objects, page.next_token)

    async def any_key(self, prefix: str) -> bool:
        if self.map.find(prefix) is None:
            return bool(self.map.dirs_above(prefix))
        store, real = self._route(prefix)
        return await store.any_key(real)

    # ----------------------------------------------------------------------------------------- objects

    async def head(self, key: str) -> ObjectInfo:
        store, real = self._route(key)
        info = await store.head(real)
        return ObjectInfo(key, info.size, info.etag, info.mtime_ns, info.metadata)

    async def get_range(self, key: str, etag: str, start: int, end: int) -> bytes:
        store, real = self._route(key)
        return await store.get_range(real, etag, start, end)

    async def get_object(self, key: str, etag: str) -> bytes:
        store, real = self._route(key)
        return await store.get_object(real, etag)

    async def put(self, key: str, body: bytes, metadata: dict[str, str]) -> str:
        store, real = self._route(key)
        return await store.put(real, body, metadata)

    async def copy(
        self, src_key: str, src_etag: str, key: str, metadata: dict[str, str], src_bucket: str | None = None
    ) -> str:
        source, src_real = self._route(src_key)
        store, real = self._route(key)
        return await store.copy(src_real, src_etag, real, metadata, src_bucket=source.bucket)

    async def delete_many(self, keys: list[str]) -> dict[str, str]:
        groups: dict[str, list[tuple[str, str]]] = {}
        failed: dict[str, str] = {}
        for vkey in keys:
            try:
                store, real = self._route(vkey)
            except OutsideAssociations:  # its association is gone: nothing there is ours to delete any more
                continue
            groups.setdefault(store.bucket, []).append((vkey, real))
        for bucket, pairs in groups.items():
            errors = await self._store(bucket).delete_many([real for _, real in pairs])
            failed.update({vkey: errors[real] for vkey, real in pairs if real in errors})
        return failed

    async def abort_uploads(self, key: str) -> int:
        store, real = self._route(key)
        return await store.abort_uploads(real)

    async def start_upload(self, key: str, metadata: dict[str, str]) -> str:
        store, real = self._route(key)
        return await store.start_upload(real, metadata)

    async def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> str:
        store, real = self._route(key)
        return await store.upload_part(real, upload_id, number, body)

    async def complete_upload(self, key: str, upload_id: str, etags: dict[int, str]) -> str:
        store, real = self._route(key)
        return await store.complete_upload(real, upload_id, etags)

    async def abort_upload(self, key: str, upload_id: str) -> None:
        store, real = self._route(key)
        await store.abort_upload(real, upload_id)
