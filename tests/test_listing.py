"""Directory listings in the namespace, against moto's server: the next page is requested while one is stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import MotoEndpoint

from lustrefs.constants import ROOT_INODE
from lustrefs.events import EventLog
from lustrefs.s3.repository import Page, Repository, RepositoryError
from lustrefs.store import db
from lustrefs.tree.loader import Defaults
from lustrefs.tree.namespace import Namespace


def _namespace(tmp_path: Path, s3: Any, bucket: str) -> Namespace:
    repo = Repository(s3, bucket, 4)
    events = EventLog(tmp_path / "events.jsonl", "fs-test")
    return Namespace(db.connect(tmp_path / "state.db"), repo, events, "", Defaults(), posix_metadata=False)


def _entries(ns: Namespace) -> list[str]:
    """The root's entries, as readdir asks for them; raises what ``entries`` raised (not a group around it)."""

    async def main() -> list[str] | Exception:
        async with trio.open_nursery() as nursery:
            await nursery.start(ns.run)
            try:
                names, after = [], 0
                while rows := await ns.entries(ROOT_INODE, after):
                    names += [r.name for r in rows]
                    after = rows[-1].ino
                return names
            except RepositoryError as exc:
                return exc
            finally:
                nursery.cancel_scope.cancel()

    result = trio.run(main)
    if isinstance(result, Exception):
        raise result
    return result


def test_a_listing_of_three_pages(moto: MotoEndpoint, s3: Any, bucket: str, tmp_path: Path) -> None:
    for i in range(2500):
        moto.backend.put_object(bucket, f"f{i:04d}", b"")
    ns = _namespace(tmp_path, s3, bucket)
    assert _entries(ns) == [f"f{i:04d}" for i in range(2500)]
    assert ns.repo.requests["LIST"] == 3


def test_a_failed_next_page_fails_the_listing_with_its_error(
    moto: MotoEndpoint, s3: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(1500):
        moto.backend.put_object(bucket, f"f{i:04d}", b"")
    ns = _namespace(tmp_path, s3, bucket)
    first_page = ns.repo.list_page

    async def failing(prefix: str, token: str | None, max_keys: int = 1000) -> Page:
        if token is not None:
            raise RepositoryError("the endpoint went away")
        return await first_page(prefix, token, max_keys)

    monkeypatch.setattr(ns.repo, "list_page", failing)
    with pytest.raises(RepositoryError, match="went away"):  # the page's error, not a group around it
        _entries(ns)
    assert ns.conn.execute("SELECT listed FROM inodes WHERE ino = ?", (ROOT_INODE,)).fetchone()[0] == 0
