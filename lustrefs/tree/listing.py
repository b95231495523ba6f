"""Listing one directory from S3: the one implementation behind lookups, readdir and the importer's polls.

A directory's listing is a series of ``ListObjectsV2(Prefix, Delimiter='/')`` pages. Each page is turned into
child entries by the key-to-path rules (lustrefs.paths): common prefixes are subdirectories, objects are files,
a directory's own marker object is no entry, and a key that cannot be a POSIX name is skipped (reported through
``on_skip``). The next page is requested while the current one is handed to the caller, so the endpoint works
while the trio thread stores. "A directory wins over a file of the same name" is the caller's rule: the two can
arrive in different pages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from lustrefs import paths
from lustrefs.data.cache import first_error
from lustrefs.s3.repository import ObjectInfo, ObjectStore, Page


@dataclass
class Entries:
    """The child entries of one listing page (or of a targeted lookup)."""

    dirs: list[tuple[str, str]] = field(default_factory=list)  # (name, common prefix)
    files: list[tuple[str, ObjectInfo]] = field(default_factory=list)  # (name, object)
    last_key: str | None = None  # the largest key or prefix of the page: how far the listing got


Skip = Callable[[str, str], None]  # (key, why it is not an entry)


def entries(spec: paths.Listing, prefixes: list[str], objects: list[ObjectInfo], on_skip: Skip) -> Entries:
    """The children that ``prefixes`` and ``objects`` of a listing of ``spec`` stand for."""
    out = Entries(last_key=max(prefixes + [o.key for o in objects], default=None))
    for prefix in prefixes:
        name = spec.child_name(prefix)
        if problem := paths.entry_problem(spec.dir_prefix, name):
            on_skip(prefix, problem)
        else:
            out.dirs.append((name, prefix))
    for obj in objects:
        if obj.key.endswith("/"):
            continue  # the directory's own marker object: its metadata is read by the parent's HEAD
        name = spec.child_name(obj.key)
        if problem := paths.entry_problem(spec.dir_prefix, name):
            on_skip(obj.key, problem)
        else:
            out.files.append((name, obj))
    return out


async def each_page(
    repo: ObjectStore, spec: paths.Listing, apply: Callable[[Entries], None], on_skip: Skip
) -> int:
    """List the directory ``spec`` completely, calling ``apply`` with each page's entries in order while the
    next page is requested. Returns the number of LIST requests."""
    page: Page | None = await repo.list_page(spec.prefix, None)
    requests = 1
    while page is not None:
        following: list[Page] = []
        try:
            async with trio.open_nursery() as nursery:
                if page.next_token is not None:
                    nursery.start_soon(_fetch, repo, spec.prefix, page.next_token, following)
                    requests += 1
                    await trio.sleep(0)  # let the request reach its worker thread before the page is stored
                apply(entries(spec, page.prefixes, page.objects, on_skip))
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        page = following[0] if following else None
    return requests


async def _fetch(repo: ObjectStore, prefix: str, token: str, into: list[Page]) -> None:
    into.append(await repo.list_page(prefix, token))
