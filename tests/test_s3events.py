"""The event source of event-driven import: parsing S3 notifications, ordering per key, and the SQS queue
against moto's server on 127.0.0.1 (moto sends S3 notifications to SQS itself)."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote_plus

import pytest
import trio
from botocore.exceptions import ClientError
from helpers import MotoEndpoint, free_port

from lustrefs.sync import s3events
from lustrefs.sync.s3events import EventQueue, ForeignMessage, S3Event, Sequencer, notification_config, parse

# ------------------------------------------------------------------------------------------------- helpers


def record(
    key: str,
    name: str = "ObjectCreated:Put",
    sequencer: str | None = None,
    bucket: str = "bkt",
    etag: str | None = "0cc175b9c0f1b6a831c399e269772661",
    size: int | None = 1,
    encoded: str | None = None,
) -> dict[str, Any]:
    """One record as S3 writes it (the key URL-encoded with + for spaces, unless ``encoded`` is given)."""
    obj: dict[str, Any] = {"key": quote_plus(key) if encoded is None else encoded}
    if etag is not None:
        obj["eTag"] = etag
    if size is not None:
        obj["size"] = size
    if sequencer is not None:
        obj["sequencer"] = sequencer
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2025-03-04T05:06:07.089Z",
        "eventName": name,
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"}, "object": obj},
    }


def body(*records: dict[str, Any]) -> str:
    return json.dumps({"Records": list(records)})


def sns(message: str) -> str:
    return json.dumps(
        {"Type": "Notification", "MessageId": "m-1", "TopicArn": "arn:aws:sns:us-east-1:1:t", "Message": message}
    )


def event(key: str, sequencer: str | None, kind: str = "created", bucket: str = "bkt") -> S3Event:
    when = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    return S3Event(bucket, key, kind, None, None, sequencer, when)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------- parse


def test_parse_created_and_removed() -> None:
    created, removed = parse(
        body(record("d/f.txt", sequencer="0062E99A88DC407460"), record("d/f.txt", "ObjectRemoved:Delete", etag=None))
    )
    assert created == S3Event(
        bucket="bkt",
        key="d/f.txt",
        kind="created",
        etag="0cc175b9c0f1b6a831c399e269772661",
        size=1,
        sequencer="0062E99A88DC407460",
        time=datetime.datetime(2025, 3, 4, 5, 6, 7, 89000, tzinfo=datetime.UTC),
    )
    assert (removed.kind, removed.etag, removed.sequencer) == ("removed", None, None)
    assert parse(body(record("k", "ObjectRemoved:DeleteMarkerCreated", etag=None, size=None)))[0].kind == "removed"
    assert parse(body(record("k", "LifecycleExpiration:Delete")))[0].kind == "removed"
    assert [e.kind for e in parse(body(record("k", "ObjectCreated:CompleteMultipartUpload")))] == ["created"]


@pytest.mark.parametrize(
    ("encoded", "key"),
    [
        ("a+b/c+d.txt", "a b/c d.txt"),
        ("x%2By%3Dz%26w", "x+y=z&w"),
        ("p%2525q", "p%25q"),
        ("%C3%BCn%C3%AF/c%C3%B6d%C3%A9+%E2%9C%93", "ünï/cödé ✓"),
        (quote_plus("tilde~/semi;colon 'q'(p)*"), "tilde~/semi;colon 'q'(p)*"),
    ],
)
def test_parse_decodes_keys(encoded: str, key: str) -> None:
    assert parse(body(record("", encoded=encoded)))[0].key == key


def test_parse_sns_envelope_and_test_events() -> None:
    inner = body(record("a b"))
    assert parse(sns(inner)) == parse(inner)
    test_event = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "x", "Bucket": "bkt"})
    assert parse(test_event) == []
    assert parse(sns(test_event)) == []


def test_parse_skips_s3_events_that_change_no_content() -> None:
    restored = record("k", "ObjectRestore:Completed")
    assert parse(body(restored, record("k", "ObjectTagging:Put"))) == []
    assert [e.key for e in parse(body(restored, record("n")))] == ["n"]


def _without(path: str) -> dict[str, Any]:
    rec = record("k")
    *parents, last = path.split(".")
    node = rec
    for part in parents:
        node = node[part]
    del node[last]
    return rec


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("{not json", "not JSON"),
        ("", "not JSON"),
        ("[1, 2]", "no JSON object"),
        ('{"hello": "world"}', "no Records"),
        ('{"Records": []}', "no Records"),
        ('{"Records": "x"}', "no Records"),
        (body(_without("s3.object.key")), "s3.object.key"),
        (body(_without("s3.bucket.name")), "s3.bucket.name"),
        (body(_without("eventName")), "eventName"),
        (body(_without("eventTime")), "eventTime"),
        (body(_without("s3")), "s3.bucket.name"),
        (body(record("k", sequencer="12xz")), "sequencer"),
        (body(record("k", size=-1)), "size"),
        (body({**record("k"), "eventTime": "yesterday"}), "eventTime"),
        (body(record("", encoded="%FF%FE")), "UTF-8"),
        (body(record("k"), "not a record"), "not from aws:s3"),
        # Another service's events on the same queue.
        (body({"eventSource": "aws:dynamodb", "eventName": "INSERT", "dynamodb": {}}), "aws:dynamodb"),
        (json.dumps({"notificationType": "Bounce", "mail": {}}), "no Records"),
        (json.dumps({"source": "aws.s3", "detail-type": "Object Created", "detail": {}}), "no Records"),
        (sns("not json"), "SNS notification"),
        (json.dumps({"Type": "SubscriptionConfirmation", "Message": "confirm"}), "no Records"),
    ],
)
def test_parse_rejects_foreign_and_malformed_messages(message: str, reason: str) -> None:
    with pytest.raises(ForeignMessage) as info:
        parse(message)
    assert reason in info.value.reason


# ----------------------------------------------------------------------------------------------- Sequencer


def test_sequencer_drops_duplicates_and_out_of_order_events() -> None:
    seq = Sequencer()
    assert seq.fresh(event("k", "0A"))
    assert not seq.fresh(event("k", "0A"))  # duplicate delivery
    assert not seq.fresh(event("k", "0a"))  # hex digits in either case
    assert not seq.fresh(event("k", "09"))  # older, delivered late
    assert seq.fresh(event("k", "0B", "removed"))
    assert not seq.fresh(event("k", "00000000000B"))  # the same sequencer, padded
    assert seq.fresh(event("k", "1000"))
    assert not seq.fresh(event("k", "9"))  # older once padded, though "9" > "1000" as plain strings
    assert seq.fresh(event("k", None)) and seq.fresh(event("k", None))  # no sequencer: always fresh


def test_sequencer_keys_are_independent() -> None:
    seq = Sequencer()
    assert seq.fresh(event("a", "0F"))
    assert seq.fresh(event("b", "01"))
    assert seq.fresh(event("a", "0F", bucket="other"))
    assert not seq.fresh(event("b", "01"))


def test_sequencer_select_records_nothing_until_told() -> None:
    seq = Sequencer()
    batch = [event("k", "05"), event("k", "03"), event("k", "05"), event("j", "01"), event("k", "06")]
    assert [e.sequencer for e in seq.select(batch)] == ["05", "01", "06"]
    assert len(seq) == 0  # a batch that failed to apply comes back and is fresh again
    seq.record(seq.select(batch))
    assert seq.select(batch) == []
    seq.record([event("k", "02")])  # an older one recorded late keeps the newer
    assert not seq.fresh(event("k", "06"))


def test_sequencer_memory_is_bounded() -> None:
    seq = Sequencer(max_keys=2)
    for key in ("a", "b", "c"):
        assert seq.fresh(event(key, "05"))
    assert len(seq) == 2
    assert not seq.fresh(event("c", "05")) and not seq.fresh(event("b", "05"))
    assert seq.fresh(event("a", "05"))  # evicted: forgotten
    assert len(seq) == 2


def test_notification_config_shape() -> None:
    arn = "arn:aws:sqs:us-east-1:123456789012:q"
    (conf,) = notification_config(arn)["QueueConfigurations"]
    assert conf["QueueArn"] == arn
    assert {"s3:ObjectCreated:*", "s3:ObjectRemoved:*"} <= set(conf["Events"])


def test_event_queue_needs_a_read_timeout_above_the_long_poll() -> None:
    client = s3events.make_client("http://127.0.0.1:9", wait_seconds=1)
    with pytest.raises(ValueError, match="read timeout"):
        EventQueue(client, "http://127.0.0.1:9/1/q", _ignore, trio.CapacityLimiter(1), wait_seconds=20)


async def _ignore(events: list[S3Event]) -> None:
    pass


# --------------------------------------------------------------------------------------- against moto's SQS


@pytest.fixture
def sqs(moto: MotoEndpoint) -> Any:
    return s3events.make_client(moto.url, wait_seconds=1, max_attempts=1)


@pytest.fixture
def queue(sqs: Any) -> Iterator[tuple[str, str]]:
    """A fresh queue (visibility timeout 1 s): its URL and ARN."""
    url = sqs.create_queue(QueueName=f"q-{uuid.uuid4().hex[:12]}", Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    yield url, arn
    sqs.delete_queue(QueueUrl=url)


@pytest.fixture
def notified(s3: Any, bucket: str, queue: tuple[str, str]) -> str:
    """``bucket``, with its notifications sent to ``queue``."""
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=notification_config(queue[1]))
    return bucket


class Collector:
    """``on_events`` for the tests: keeps what it is given; ``fail`` picks events to raise on once."""

    def __init__(self, fail: Callable[[S3Event], bool] = lambda e: False) -> None:
        self.events: list[S3Event] = []
        self.calls = 0
        self.fail = fail
        self.failed: set[S3Event] = set()
        self._changed = trio.Event()

    async def __call__(self, events: list[S3Event]) -> None:
        self.calls += 1
        for e in events:
            if self.fail(e) and e not in self.failed:
                self.failed.add(e)
                raise RuntimeError(f"cannot apply {e.key}")
        self.events += events
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, count: int) -> None:
        while len(self.events) < count:
            await self._changed.wait()

    def by_key(self) -> dict[str, list[tuple[str, str | None]]]:
        out: dict[str, list[tuple[str, str | None]]] = {}
        for e in self.events:
            out.setdefault(e.key, []).append((e.kind, e.etag))
        return out


async def eventually(condition: Callable[[], Any]) -> None:
    """Wait until ``condition()`` (a blocking call: run in a thread) is true; the caller bounds the wait."""
    while not await trio.to_thread.run_sync(condition):
        await trio.sleep(0.02)


def queue_empty(sqs: Any, url: str) -> Callable[[], bool]:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]

    def check() -> bool:
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
        return all(attrs[n] == "0" for n in names)

    return check


def run_queue(eq: EventQueue, body_fn: Callable[[], Any], timeout: float = 20) -> None:
    """Run ``eq`` while ``body_fn()`` (a coroutine function) runs, then cancel it; all within ``timeout``."""

    async def main() -> None:
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                await nursery.start(eq.run)
                await body_fn()
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_moto_delivers_put_overwrite_delete_in_order(s3: Any, sqs: Any, queue: tuple[str, str], notified: str) -> None:
    e1 = s3.put_object(Bucket=notified, Key="d/f.txt", Body=b"one")["ETag"].strip('"')
    e2 = s3.put_object(Bucket=notified, Key="d/f.txt", Body=b"second")["ETag"].strip('"')
    s3.delete_object(Bucket=notified, Key="d/f.txt")
    got = Collector()
    eq = EventQueue(sqs, queue[0], got, trio.CapacityLimiter(1), wait_seconds=1)

    async def check() -> None:
        await got.wait(3)
        await eventually(queue_empty(sqs, queue[0]))

    run_queue(eq, check)
    assert [(e.bucket, e.key) for e in got.events] == [(notified, "d/f.txt")] * 3
    assert [e.kind for e in got.events] == ["created", "created", "removed"]
    assert [e.etag for e in got.events[:2]] == [e1, e2]
    assert got.events[0].size == 3 and got.events[1].size == 6
    status = eq.status()
    # The test event S3 sent when the configuration was set is received, and applies nothing.
    assert status["messages_received"] == 4 and status["events_applied"] == 3
    assert (status["foreign_dropped"], status["errors"], status["last_error"]) == (0, 0, None)
    assert status["queue_url"] == queue[0] and status["last_receive"] is not None


def test_moto_delivers_several_keys(s3: Any, sqs: Any, queue: tuple[str, str], notified: str) -> None:
    keys = ["a b/c+d.txt", "ünï/cödé", "p%25q", "x"]
    etags = {k: s3.put_object(Bucket=notified, Key=k, Body=k.encode())["ETag"].strip('"') for k in keys}
    copied = s3.copy_object(Bucket=notified, Key="copy", CopySource={"Bucket": notified, "Key": "x"})
    s3.delete_objects(Bucket=notified, Delete={"Objects": [{"Key": "x"}, {"Key": "p%25q"}]})
    s3.put_object(Bucket=notified, Key="x", Body=b"again")
    got = Collector()
    eq = EventQueue(sqs, queue[0], got, trio.CapacityLimiter(1), wait_seconds=1)

    async def check() -> None:
        await got.wait(len(keys) + 4)
        await eventually(queue_empty(sqs, queue[0]))

    run_queue(eq, check)
    seen = got.by_key()
    assert seen["a b/c+d.txt"] == [("created", etags["a b/c+d.txt"])]
    assert seen["ünï/cödé"] == [("created", etags["ünï/cödé"])]
    assert [k for k, _ in seen["p%25q"]] == ["created", "removed"]
    assert [k for k, _ in seen["x"]] == ["created", "removed", "created"]
    assert seen["copy"] == [("created", copied["CopyObjectResult"]["ETag"].strip('"'))]


def test_duplicates_and_late_events_are_applied_once(sqs: Any, queue: tuple[str, str]) -> None:
    url = queue[0]
    put = body(record("k", sequencer="00A0"))
    for message in (put, put, body(record("k", "ObjectRemoved:Delete", "00B0")), body(record("k", sequencer="009F"))):
        sqs.send_message(QueueUrl=url, MessageBody=message)
    sqs.send_message(QueueUrl=url, MessageBody=sns(body(record("other", sequencer="0001"))))
    got = Collector()
    eq = EventQueue(sqs, url, got, trio.CapacityLimiter(1), wait_seconds=1)
    run_queue(eq, lambda: eventually(queue_empty(sqs, url)))
    assert [(e.key, e.kind, e.sequencer) for e in got.events] == [
        ("k", "created", "00A0"),
        ("k", "removed", "00B0"),
        ("other", "created", "0001"),
    ]
    assert eq.status()["duplicates_dropped"] == 2


def test_malformed_messages_are_dropped_and_deleted(
    s3: Any, sqs: Any, queue: tuple[str, str], notified: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = queue[0]
    sqs.send_message(QueueUrl=url, MessageBody="{this is not JSON")
    sqs.send_message(QueueUrl=url, MessageBody=body({"eventSource": "aws:dynamodb", "eventName": "INSERT"}))
    s3.put_object(Bucket=notified, Key="after", Body=b"1")
    got = Collector()
    eq = EventQueue(sqs, url, got, trio.CapacityLimiter(1), wait_seconds=1)

    async def check() -> None:
        await got.wait(1)
        await eventually(queue_empty(sqs, url))

    with caplog.at_level(logging.WARNING, logger=s3events.__name__):
        run_queue(eq, check)
    assert [e.key for e in got.events] == ["after"]
    assert eq.status()["foreign_dropped"] == 2
    reasons = [r.getMessage() for r in caplog.records if "dropping message" in r.getMessage()]
    assert len(reasons) == 2 and "not JSON" in reasons[0] and "aws:dynamodb" in reasons[1]


def test_a_message_whose_handling_fails_comes_back(s3: Any, sqs: Any, queue: tuple[str, str], notified: str) -> None:
    for key in ("ok-1", "boom", "ok-2"):
        s3.put_object(Bucket=notified, Key=key, Body=b"1")
    got = Collector(fail=lambda e: e.key == "boom")
    eq = EventQueue(sqs, queue[0], got, trio.CapacityLimiter(1), wait_seconds=1)

    async def check() -> None:
        await got.wait(3)  # "boom" only after its visibility timeout (1 s)
        await eventually(queue_empty(sqs, queue[0]))

    run_queue(eq, check)
    assert [e.key for e in got.events] == ["ok-1", "ok-2", "boom"]
    assert eq.status()["handler_errors"] == 1 and eq.status()["events_applied"] == 3


def test_a_missing_queue_is_reported_and_retried_until_it_exists(moto: MotoEndpoint, sqs: Any) -> None:
    name = f"q-{uuid.uuid4().hex[:12]}"
    url = f"{moto.url}/123456789012/{name}"
    got = Collector()
    eq = EventQueue(sqs, url, got, trio.CapacityLimiter(1), wait_seconds=1, backoff=(0.01, 0.05))

    async def check() -> None:
        while eq.errors < 3:
            await trio.sleep(0.01)
        assert "NonExistentQueue" in (eq.status()["last_error"] or "")
        made = await trio.to_thread.run_sync(lambda: sqs.create_queue(QueueName=name)["QueueUrl"])
        assert made == url
        await trio.to_thread.run_sync(lambda: sqs.send_message(QueueUrl=url, MessageBody=body(record("k"))))
        await got.wait(1)

    try:
        run_queue(eq, check)
    finally:
        with contextlib.suppress(ClientError):
            sqs.delete_queue(QueueUrl=url)
    assert eq.status()["last_error"] is None and eq.status()["last_error_time"] is not None
    assert [e.key for e in got.events] == ["k"]


def test_an_unreachable_endpoint_is_retried_and_run_stays_cancellable(caplog: pytest.LogCaptureFixture) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    client = s3events.make_client(closed, wait_seconds=1, connect_timeout=1, max_attempts=1)
    url = f"{closed}/123456789012/q"
    eq = EventQueue(client, url, _ignore, trio.CapacityLimiter(1), wait_seconds=1, backoff=(0.01, 0.02))

    async def check() -> None:
        while eq.errors < 5:
            await trio.sleep(0.01)

    with caplog.at_level(logging.WARNING, logger=s3events.__name__):
        run_queue(eq, check, timeout=10)
    assert "EndpointConnectionError" in (eq.status()["last_error"] or "")
    assert eq.status()["last_receive"] is None
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 1  # the same error, logged once


class SpyClient:
    """A client whose ``receive_message`` announces that it has started."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.receiving = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def receive_message(self, **kwargs: Any) -> Any:
        self.receiving.set()
        return self._client.receive_message(**kwargs)


def test_cancellation_does_not_wait_for_a_long_poll(moto: MotoEndpoint, queue: tuple[str, str]) -> None:
    spy = SpyClient(s3events.make_client(moto.url, wait_seconds=5, max_attempts=1))
    eq = EventQueue(spy, queue[0], _ignore, trio.CapacityLimiter(1), wait_seconds=5)

    async def main() -> float:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(eq.run)
                assert await trio.to_thread.run_sync(spy.receiving.wait, 5)
                cancelled = trio.current_time()
                nursery.cancel_scope.cancel()
            return trio.current_time() - cancelled

    # The receive, still waiting in moto for up to 5 s, is abandoned: run() ends at once.
    assert trio.run(main) < 1
