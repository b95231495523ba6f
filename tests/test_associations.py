"""Data repository associations, in process: directories linked one-to-one (re-rooted) to prefixes of several
buckets, each with its own import and export events, created and deleted while mounted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio
from inproc import Daemon, Links, run
from memrepo import Bucket

from lustrefs import associations
from lustrefs.associations import Association
from lustrefs.constants import ROOT_INODE

ALL = frozenset({"NEW", "CHANGED", "DELETED"})


def two_buckets() -> Links:
    genomes, lab = Bucket("genomes"), Bucket("lab")
    genomes.put_object("ref/hg38.fa", b">chr1\nACGT\n")
    genomes.put_object("ref/idx/hg38.fai", b"chr1\t4\n")
    genomes.put_object("other/not-linked", b"x")
    lab.put_object("run42/in.txt", b"input")
    return Links(
        {"genomes": genomes, "lab": lab},
        [
            Association("dra-1", "/ref", "genomes", "ref/", import_events=frozenset({"NEW"})),
            Association("dra-2", "/scratch/run42", "lab", "run42/", import_events=ALL, export_events=ALL),
        ],
    )


async def wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


def test_each_association_maps_its_directory_to_its_prefix_both_ways(tmp_path: Path) -> None:
    links = two_buckets()
    genomes, lab = links.buckets["genomes"], links.buckets["lab"]

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, Bucket("unused"), links=links)
        await d.start(nursery)
        # Re-rooted: ref/hg38.fa of genomes is /ref/hg38.fa, run42/in.txt of lab is /scratch/run42/in.txt.
        assert await d.read_file("ref/hg38.fa") == b">chr1\nACGT\n"
        assert await d.read_file("ref/idx/hg38.fai") == b"chr1\t4\n"
        assert await d.read_file("scratch/run42/in.txt") == b"input"
        names = [r.name for r in await d.ns.entries(ROOT_INODE, 0)]
        assert sorted(names) == ["ref", "scratch"]  # nothing else of either bucket
        # Exports follow each association's own events: /scratch/run42 exports, /ref exports nothing.
        await d.mkdir("scratch/run42/out")
        await d.write_file("scratch/run42/out/result.csv", b"a,b\n")
        await d.write_file("ref/notes.txt", b"local only")
        await d.mkdir("elsewhere")
        await d.write_file("elsewhere/x", b"outside every association")
        await wait_for(lambda: "run42/out/result.csv" in lab.objects and "run42/out/" in lab.objects)
        assert lab.objects["run42/out/result.csv"].body == b"a,b\n"

        def outside() -> list[dict]:  # type: ignore[type-arg]
            lines = (tmp_path / "events.jsonl").read_text().splitlines()
            return [e for e in map(json.loads, lines) if "S3ExportLocalObjectNotMatchDra" in json.dumps(e)]

        await wait_for(lambda: len(outside()) >= 2)  # /elsewhere and /elsewhere/x, each once, as warnings
        assert all("WARN" in json.dumps(e) for e in outside())
        assert all("associationId" not in e for e in outside())  # outside every association
        d.events.emit("INFO", "Test", "an event under an association", path="/scratch/run42/out/result.csv")
        named = json.loads((tmp_path / "events.jsonl").read_text().splitlines()[-1])
        assert named["associationId"] == "dra-2"  # events name the association of their path
        assert d.ns.exports.count_dirty() == 3  # those two and /ref/notes.txt (NEW is not in /ref's events)
        assert "ref/notes.txt" not in genomes.objects and "notes.txt" not in genomes.objects
        assert not any(k.startswith("elsewhere") for b in (genomes, lab) for k in b.objects)
        # Renames and deletions inside an association move and delete its objects.
        await d.rename("scratch/run42/out/result.csv", "scratch/run42/out/final.csv")
        await d.unlink("scratch/run42/in.txt")
        await wait_for(lambda: "run42/out/result.csv" not in lab.objects and "run42/in.txt" not in lab.objects)
        assert lab.objects["run42/out/final.csv"].body == b"a,b\n"
        # Imports follow each association's events: NEW only under /ref, everything under /scratch/run42.
        genomes.put_object("ref/new.fa", b"new")
        genomes.put_object("ref/hg38.fa", b"changed")
        lab.put_object("run42/out/final.csv", b"changed in S3")
        await d.importer.poll()
        assert await d.read_file("ref/new.fa") == b"new"
        assert await d.read_file("ref/hg38.fa") == b">chr1\nACGT\n"  # CHANGED is not in /ref's events
        assert await d.read_file("scratch/run42/out/final.csv") == b"changed in S3"
        await d.stop()

    run(test)


def test_associations_are_created_and_deleted_while_mounted(tmp_path: Path) -> None:
    links = two_buckets()
    first = links.items.pop()  # /scratch/run42 comes later
    lab = links.buckets["lab"]

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, Bucket("unused"), links=links)
        await d.start(nursery)
        with pytest.raises(FileNotFoundError):
            await d.resolve("scratch")
        links.items.append(replace_lifecycle(first, "CREATING"))
        await wait_for(lambda: links.lifecycle("dra-2") == "AVAILABLE")
        assert await d.read_file("scratch/run42/in.txt") == b"input"
        # Deleted with local changes not exported yet: they are exported first, then the directory goes.
        await d.write_file("scratch/run42/late.txt", b"late")
        links.items = [
            replace_lifecycle(a, "DELETING") if a.id == "dra-2" else a for a in links.items
        ]
        await wait_for(lambda: links.lifecycle("dra-2") is None)
        assert lab.objects["run42/late.txt"].body == b"late"
        with pytest.raises(FileNotFoundError):
            await d.resolve("scratch/run42")
        assert await d.read_file("ref/hg38.fa") == b">chr1\nACGT\n"  # the other one is untouched
        await d.stop()

    run(test)


def test_a_deletion_that_deletes_the_data_in_the_file_system_exports_nothing(tmp_path: Path) -> None:
    links = two_buckets()
    lab = links.buckets["lab"]

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, Bucket("unused"), links=links, delay=3600.0)
        await d.start(nursery)
        await d.write_file("scratch/run42/discard.txt", b"discard me")
        links.items = [
            Association(a.id, a.fs_path, a.bucket, a.prefix, a.import_events, a.export_events, "DELETING", True)
            if a.id == "dra-2"
            else a
            for a in links.items
        ]
        await wait_for(lambda: links.lifecycle("dra-2") is None)
        assert "run42/discard.txt" not in lab.objects and lab.objects["run42/in.txt"].body == b"input"
        with pytest.raises(FileNotFoundError):
            await d.resolve("scratch/run42")
        await d.stop()

    run(test)


def test_an_association_whose_bucket_cannot_be_listed_is_misconfigured(tmp_path: Path) -> None:
    links = two_buckets()
    links.items.append(Association("dra-3", "/gone", "no-such-bucket", "", lifecycle="CREATING"))

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, Bucket("unused"), links=links)
        await d.start(nursery)
        await wait_for(lambda: links.lifecycle("dra-3") == "MISCONFIGURED")
        assert "NoSuchBucket" in (links.failures["dra-3"] or "")
        assert await d.read_file("ref/hg38.fa") == b">chr1\nACGT\n"  # the others work
        # The bucket is created: the association becomes available at the next look, its objects appear.
        (client,) = [r for r in d.repo.stores if r.bucket == "no-such-bucket"]  # type: ignore[union-attr]
        client.store.put_object("late.txt", b"it exists now")  # type: ignore[attr-defined]
        client.refuse = None  # type: ignore[attr-defined]
        await wait_for(lambda: links.lifecycle("dra-3") == "AVAILABLE")
        assert await d.read_file("gone/late.txt") == b"it exists now"
        await d.stop()

    run(test)


def replace_lifecycle(a: Association, lifecycle: str) -> Association:
    return Association(
        a.id, a.fs_path, a.bucket, a.prefix, a.import_events, a.export_events, lifecycle, a.delete_data, a.batch_import
    )


def test_keys_map_between_paths_and_prefixes() -> None:
    m = associations.Associations(two_buckets().items)
    assert m.find("ref/a/b") == (m.all[0], "ref/a/b")
    assert m.find("scratch/run42/x")[1] == "run42/x"  # type: ignore[index]
    assert m.find("scratch/x") is None and m.find("refx/y") is None
    assert m.virtual("lab", "run42/x") == "scratch/run42/x" and m.virtual("lab", "run43/x") is None
    assert m.virtual("genomes", ".lustrefs-staging/fs/1") is None
    assert m.dirs_above("") == ["ref/", "scratch/"] and m.dirs_above("scratch/") == ["scratch/run42/"]
    assert m.export_events("elsewhere/x") is None and m.export_events("scratch/run42/x") == ALL
    assert m.import_events(None) == ALL and m.import_events("ref/") == {"NEW"}
    assert os.sep == "/"


def test_associations_on_a_cluster(tmp_path: Path, pg_database: str) -> None:
    links = two_buckets()
    lab, genomes = links.buckets["lab"], links.buckets["genomes"]

    async def test(nursery: trio.Nursery) -> None:
        a = Daemon(tmp_path / "a", Bucket("unused"), links=links, cluster=pg_database)
        await a.start(nursery)
        await a.leading()
        b = Daemon(tmp_path / "b", Bucket("unused"), links=links, cluster=pg_database)
        await b.start(nursery)
        # B's close stages the data in the first association's bucket; A reads it; the leader exports it to
        # the second association's bucket (a copy across buckets) and deletes the staging object.
        await b.write_file("scratch/run42/from-b.txt", b"written on B")
        assert await a.read_file("scratch/run42/from-b.txt") == b"written on B"
        await wait_for(lambda: "run42/from-b.txt" in lab.objects)
        assert lab.objects["run42/from-b.txt"].body == b"written on B"
        await wait_for(lambda: not [k for k in genomes.objects if k.startswith(".lustrefs-staging/")])
        assert await b.read_file("ref/hg38.fa") == b">chr1\nACGT\n"
        for d in (b, a):
            await d.stop()

    run(test)
