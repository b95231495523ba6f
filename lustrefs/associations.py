"""Data repository associations: file system directories linked one-to-one to S3 prefixes (standard library only).

FSx's second design (``CreateDataRepositoryAssociation``): each association maps the directory ``FileSystemPath``
to ``s3://bucket/prefix/``, re-rooted: ``FileSystemPath/x`` is ``prefix/x`` both ways, with its own import and
export event lists. A file system has either the legacy link or associations. The daemon sees the associations
through one *virtual* key space in which a key is the path below the file system root (``ns1/x`` for
``/ns1/x``), as the legacy link's keys are: ``Associations`` translates virtual keys to (association, real key)
and back; lustrefs.s3.routing sends the requests to each association's bucket.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lustrefs.constants import STAGING_NAME

EVENTS = frozenset({"NEW", "CHANGED", "DELETED"})
LIVE = ("CREATING", "AVAILABLE", "UPDATING", "MISCONFIGURED")  # lifecycles whose association imports
ROUTED = (*LIVE, "DELETING")  # lifecycles whose keys are routed to its bucket (a deletion exports first)


@dataclass(frozen=True)
class Association:
    """One association as the daemon uses it (the record's ``_Associations`` entry, lustrefs.client.associations)."""

    id: str
    fs_path: str  # "/ns1" (no trailing "/"), or "/"
    bucket: str
    prefix: str  # "" (the whole bucket) or "p/q/" (ends with "/")
    import_events: frozenset[str] = frozenset()
    export_events: frozenset[str] = frozenset()
    lifecycle: str = "AVAILABLE"
    delete_data: bool = False  # DELETING: the data in the file system goes without being exported
    batch_import: bool = False  # CREATING: the metadata of the whole prefix is imported before AVAILABLE

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def root(self) -> str:
        """The virtual key prefix of its directory: '' for '/', 'ns1/' for '/ns1'."""
        return "" if self.fs_path == "/" else self.fs_path.strip("/") + "/"

    @classmethod
    def from_record(cls, entry: dict[str, Any]) -> Association:
        url = entry["DataRepositoryPath"]
        bucket, _, prefix = url[len("s3://") :].partition("/")
        s3 = entry.get("S3") or {}
        return cls(
            id=entry["AssociationId"],
            fs_path=entry["FileSystemPath"],
            bucket=bucket,
            prefix=prefix,
            import_events=frozenset((s3.get("AutoImportPolicy") or {}).get("Events", ())),
            export_events=frozenset((s3.get("AutoExportPolicy") or {}).get("Events", ())),
            lifecycle=entry.get("Lifecycle", "AVAILABLE"),
            delete_data=bool(entry.get("_DeleteDataInFileSystem")),
            batch_import=bool(entry.get("BatchImportMetaDataOnCreate")),
        )


def from_record(record: dict[str, Any]) -> list[Association]:
    """The associations of a file system record (none for a legacy or unlinked file system)."""
    return [Association.from_record(e) for e in record.get("_Associations") or []]


class Associations:
    """Virtual keys (paths below the root) to (association, real key) and back."""

    def __init__(self, associations: Iterable[Association]) -> None:
        self.all = sorted(associations, key=lambda a: a.root)

    @classmethod
    def live(cls, associations: Iterable[Association]) -> Associations:
        """Those that import (not being deleted)."""
        return cls(a for a in associations if a.lifecycle in LIVE)

    @classmethod
    def routed(cls, associations: Iterable[Association]) -> Associations:
        """Those whose keys go to their buckets (being deleted too: their data is exported first)."""
        return cls(a for a in associations if a.lifecycle in ROUTED)

    def find(self, vkey: str) -> tuple[Association, str] | None:
        """The association whose directory holds ``vkey`` (its root directory included) and the real key."""
        for a in self.all:
            if vkey.startswith(a.root):
                return a, a.prefix + vkey[len(a.root) :]
        return None

    def virtual(self, bucket: str, key: str) -> str | None:
        """The virtual key of object ``key`` of ``bucket``, None if no association shows it."""
        if key.startswith(STAGING_NAME + "/"):
            return None
        for a in self.all:
            if a.bucket == bucket and key.startswith(a.prefix):
                return a.root + key[len(a.prefix) :]
        return None

    def dirs_above(self, vprefix: str) -> list[str]:
        """The directories (virtual prefixes ending in '/') directly below the virtual directory ``vprefix`` that
        lead to association roots, when ``vprefix`` is above them (not inside one)."""
        out = []
        for a in self.all:
            if a.root.startswith(vprefix) and a.root != vprefix:
                head = a.root[len(vprefix) :].partition("/")[0]
                out.append(vprefix + head + "/")
        return sorted(set(out))

    def association_of(self, path: str) -> str | None:
        """The id of the association holding ``path`` ('/a/b' or the key 'a/b'), for events and reports."""
        found = self.find(path.lstrip("/"))
        return found[0].id if found else None

    def import_events(self, vkey: str | None) -> frozenset[str]:
        """The import events of the association holding ``vkey`` (None: of any association)."""
        if vkey is None:
            return frozenset().union(*(a.import_events for a in self.all))
        found = self.find(vkey)
        return found[0].import_events if found else frozenset()

    def export_events(self, vkey: str) -> frozenset[str] | None:
        """The export events of the association holding ``vkey``; None if none does (not exported)."""
        found = self.find(vkey)
        return found[0].export_events if found else None
