"""Event-driven import: S3 event notifications applied as the import policy allows, in process (the importer's
side) and through a real mount on moto's server with an SQS queue (the whole path)."""

from __future__ import annotations

import datetime
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import MotoEndpoint, create_fs, mount_fs, wait_for
from inproc import Daemon, run
from memrepo import Bucket

from lustrefs.sync import s3events
from lustrefs.sync.s3events import S3Event

NOW = datetime.datetime.now(datetime.UTC)


def created(bucket: Bucket, key: str, body: bytes) -> S3Event:
    etag = bucket.put_object(key, body)
    return S3Event(bucket.name, key, "created", etag, len(body), None, NOW)


def removed(bucket: Bucket, key: str) -> S3Event:
    bucket.objects.pop(key, None)
    return S3Event(bucket.name, key, "removed", None, None, None, NOW)


@pytest.mark.parametrize("policy", ["NEW", "NEW_CHANGED", "NEW_CHANGED_DELETED"])
def test_events_are_applied_as_the_policy_allows(tmp_path: Path, policy: str) -> None:
    store = Bucket()
    store.put_object("d/old.txt", b"old")

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, store, import_policy=policy)
        await d.start(nursery)
        assert await d.read_file("d/old.txt") == b"old"  # d is loaded
        await d.importer.apply_events(
            [
                created(store, "d/new.txt", b"new"),
                created(store, "d/sub/deep.txt", b"deep"),  # a new directory on the way
                created(store, "d/old.txt", b"changed"),
                created(store, "elsewhere/x", b"x"),  # a directory nobody loaded: listed when visited
                S3Event("another-bucket", "d/foreign", "created", "e", 1, None, NOW),  # not this file system's
            ]
        )
        assert await d.read_file("d/new.txt") == b"new"
        assert await d.read_file("d/sub/deep.txt") == b"deep"
        assert await d.read_file("d/old.txt") == (b"old" if policy == "NEW" else b"changed")
        with pytest.raises(FileNotFoundError):
            await d.resolve("d/foreign")
        await d.importer.apply_events([removed(store, "d/new.txt")])
        if "DELETED" in policy:
            with pytest.raises(FileNotFoundError):
                await d.resolve("d/new.txt")
        else:
            await d.resolve("d/new.txt")
        # A local change wins, and a name removed locally is not brought back by an event.
        await d.write_file("d/sub/deep.txt", b"local")
        await d.unlink("d/old.txt")
        await d.importer.apply_events([created(store, "d/sub/deep.txt", b"s3"), created(store, "d/old.txt", b"s3")])
        assert await d.read_file("d/sub/deep.txt") == b"local"
        with pytest.raises(FileNotFoundError):
            await d.resolve("d/old.txt")
        await d.stop(export_timeout=0)

    run(test)


def test_events_follow_associations(tmp_path: Path) -> None:
    from inproc import Links

    from lustrefs.associations import Association

    lab = Bucket("lab")
    lab.put_object("run42/in.txt", b"input")
    every = frozenset({"NEW", "CHANGED", "DELETED"})
    links = Links({"lab": lab}, [Association("dra-1", "/scratch", "lab", "run42/", import_events=every)])

    async def test(nursery: trio.Nursery) -> None:
        d = Daemon(tmp_path, Bucket("unused"), links=links)
        await d.start(nursery)
        assert await d.read_file("scratch/in.txt") == b"input"
        d.importer.locate = d.repo.map.virtual  # type: ignore[union-attr]  (what process.event_source does)
        await d.importer.apply_events([created(lab, "run42/new.txt", b"new"), created(lab, "run43/no", b"no")])
        assert await d.read_file("scratch/new.txt") == b"new"
        await d.stop(export_timeout=0)

    run(test)


@pytest.mark.fuse
def test_an_object_put_is_visible_within_seconds_through_a_mount(
    moto: MotoEndpoint, s3: Any, bucket: str, home: Path, tmp_path: Path
) -> None:
    sqs = s3events.make_client(moto.url, "us-east-1", wait_seconds=1)
    url = sqs.create_queue(QueueName=f"q-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=s3events.notification_config(arn))
    fs_id = create_fs(moto, f"s3://{bucket}", AutoImportPolicy="NEW_CHANGED_DELETED")
    res, m = mount_fs(fs_id, tmp_path / "mnt", f"event_queue={url},poll_interval=3600")
    assert m is not None, res.stderr
    try:
        assert (m.path / "d").exists() is False
        sqs.send_message(QueueUrl=url, MessageBody="not an S3 event")  # dropped, logged; the others go on
        latencies = []
        for i in range(10):
            started = time.monotonic()
            s3.put_object(Bucket=bucket, Key=f"d/f{i}", Body=f"v{i}".encode())
            wait_for(lambda i=i: (m.path / f"d/f{i}").exists(), 30, "the new object in the mount")
            latencies.append(time.monotonic() - started)
        assert (m.path / "d/f3").read_bytes() == b"v3"
        s3.put_object(Bucket=bucket, Key="d/f3", Body=b"changed in S3")
        wait_for(lambda: (m.path / "d/f3").read_bytes() == b"changed in S3", 30, "the change")
        s3.delete_object(Bucket=bucket, Key="d/f4")
        wait_for(lambda: not (m.path / "d/f4").exists(), 30, "the deletion")
        print(json.dumps({"p50_s": statistics.median(latencies), "all": [round(x, 3) for x in latencies]}))
        queue = m.stats()["event_queue"]  # lustrefs stats shows the queue's counters
        assert queue["events_applied"] >= 12 and queue["foreign_dropped"] == 1 and queue["last_error"] is None
        m.unmount()
    finally:
        m.cleanup()


@pytest.mark.fuse
def test_a_misconfigured_notification_costs_one_poll_interval(
    moto: MotoEndpoint, s3: Any, bucket: str, home: Path, tmp_path: Path
) -> None:
    """The queue exists but the bucket sends it nothing (its notification is missing, or names another queue):
    changes still arrive, by the next poll."""
    sqs = s3events.make_client(moto.url, "us-east-1", wait_seconds=1)
    url = sqs.create_queue(QueueName=f"q-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    other = sqs.create_queue(QueueName=f"other-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    other_arn = sqs.get_queue_attributes(QueueUrl=other, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=bucket, NotificationConfiguration=s3events.notification_config(other_arn)
    )
    fs_id = create_fs(moto, f"s3://{bucket}", AutoImportPolicy="NEW_CHANGED_DELETED")
    res, m = mount_fs(fs_id, tmp_path / "mnt", f"event_queue={url},poll_interval=1")
    assert m is not None, res.stderr
    try:
        s3.put_object(Bucket=bucket, Key="d/first", Body=b"1")
        assert (m.path / "d/first").read_bytes() == b"1"  # d listed
        s3.put_object(Bucket=bucket, Key="d/second", Body=b"2")
        wait_for(lambda: (m.path / "d/second").exists(), 15, "the object, by a poll")
        m.unmount()
    finally:
        m.cleanup()
