"""S3 event notifications read from an SQS queue: the event source of event-driven import.

S3 sends a message per change to a queue, directly or through an SNS topic (as FSx does). ``EventQueue``
long-polls the queue, turns each message into ``S3Event`` values (``parse``), drops those not newer than what was
applied for their key (``Sequencer``), hands the rest to a callback, and deletes the messages it handled. A message
whose handling failed stays in the queue and comes back after its visibility timeout; malformed or foreign
messages are logged and deleted. The importer's poll stays the safety net: a lost message costs one poll interval.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote_plus

import boto3
import botocore.config
import cachetools
import trio
from botocore.exceptions import BotoCoreError, ClientError

from lustrefs.s3client import DEFAULT_REGION

log = logging.getLogger(__name__)

# What a queue fed by notification_config receives. Lifecycle expirations are no ObjectRemoved events in S3.
EVENTS = ("s3:ObjectCreated:*", "s3:ObjectRemoved:*", "s3:LifecycleExpiration:*")
KINDS: dict[str, Literal["created", "removed"]] = {
    "ObjectCreated": "created",
    "ObjectRemoved": "removed",
    "LifecycleExpiration": "removed",
}
HEX = re.compile(r"[0-9A-Fa-f]+")
LOG_EVERY = 60.0  # seconds between two warnings about the same receive error


class ForeignMessage(ValueError):
    """A message that is no S3 event notification, or a malformed one; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class S3Event:
    """One change of one object. ``etag`` and ``size`` are None when S3 gives none (removals)."""

    bucket: str
    key: str
    kind: Literal["created", "removed"]
    etag: str | None
    size: int | None
    sequencer: str | None
    time: datetime.datetime


def parse(body: str) -> list[S3Event]:
    """The events of one SQS message body: an S3 notification, raw or in an SNS envelope.

    S3's test event gives none, and so do records of S3 events that change no object's content (restore,
    tagging, ACL, replication, transitions). Raises ``ForeignMessage`` for anything else.
    """
    doc = _json(body, "the message")
    if doc.get("Type") == "Notification" and isinstance(doc.get("Message"), str):
        doc = _json(doc["Message"], "the SNS notification's Message")
    if doc.get("Event") == "s3:TestEvent":
        return []
    records = doc.get("Records")
    if not isinstance(records, list) or not records:
        raise ForeignMessage("no Records")
    return [event for record in records if (event := _record(record)) is not None]


def _json(text: Any, what: str) -> dict[str, Any]:
    if not isinstance(text, str):
        raise ForeignMessage(f"{what} is no text")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ForeignMessage(f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ForeignMessage(f"{what} is no JSON object")
    return doc


def _field(doc: Any, path: str, kind: type, required: bool = True) -> Any:
    """The value at dotted ``path`` in ``doc``, of type ``kind``; None if absent and not ``required``."""
    value = doc
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) or value == "":
        raise ForeignMessage(f"a record without a valid {path}")
    return value


def _record(record: Any) -> S3Event | None:
    source = record.get("eventSource") if isinstance(record, dict) else None
    if source != "aws:s3":
        raise ForeignMessage(f"a record from {source!r}, not from aws:s3")
    name = _field(record, "eventName", str)
    kind = KINDS.get(name.split(":", 1)[0])
    if kind is None:
        return None
    bucket = _field(record, "s3.bucket.name", str)
    try:
        key = unquote_plus(_field(record, "s3.object.key", str), errors="strict")
    except UnicodeDecodeError:
        raise ForeignMessage("s3.object.key is not URL-encoded UTF-8") from None
    etag = _field(record, "s3.object.eTag", str, required=False)
    size = _field(record, "s3.object.size", int, required=False)
    if size is not None and size < 0:
        raise ForeignMessage("a record with a negative s3.object.size")
    sequencer = _field(record, "s3.object.sequencer", str, required=False)
    if sequencer is not None and not HEX.fullmatch(sequencer):
        raise ForeignMessage("s3.object.sequencer is not hexadecimal")
    try:
        when = datetime.datetime.fromisoformat(_field(record, "eventTime", str))
    except ValueError:
        raise ForeignMessage("eventTime is no ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return S3Event(bucket, key, kind, etag.strip('"') if etag else None, size, sequencer, when)


class Sequencer:
    """The newest sequencer applied per (bucket, key), remembered for the ``max_keys`` most recent keys.

    S3 orders the events of one key by their sequencer: hex strings compared after left-padding the shorter with
    zeros, i.e. compared as numbers. Those of different keys are not comparable. A key evicted from the LRU
    forgets its sequencer, so a late duplicate of it is fresh again (the importer's ETag comparison absorbs it).
    """

    def __init__(self, max_keys: int = 50_000) -> None:
        self._last: cachetools.LRUCache[tuple[str, str], int] = cachetools.LRUCache(maxsize=max_keys)

    def __len__(self) -> int:
        return len(self._last)

    def fresh(self, event: S3Event) -> bool:
        """Whether ``event`` is newer than the last one applied for its key; records it if so."""
        if not self.select([event]):
            return False
        self.record([event])
        return True

    def select(self, events: Iterable[S3Event]) -> list[S3Event]:
        """The events newer than those recorded and than the earlier ones of their key in ``events``.

        Records nothing: ``record`` them once they are applied.
        """
        seen: dict[tuple[str, str], int] = {}
        out = []
        for event in events:
            if event.sequencer is not None:
                key, order = (event.bucket, event.key), int(event.sequencer, 16)
                last = seen.get(key, self._last.get(key))
                if last is not None and order <= last:
                    continue
                seen[key] = order
            out.append(event)
        return out

    def record(self, events: Iterable[S3Event]) -> None:
        """Remember the sequencers of applied events (a newer one already recorded stays)."""
        for event in events:
            if event.sequencer is not None:
                key, order = (event.bucket, event.key), int(event.sequencer, 16)
                last = self._last.get(key)
                self._last[key] = order if last is None else max(last, order)


def notification_config(queue_arn: str) -> dict[str, Any]:
    """The S3 NotificationConfiguration sending a bucket's object changes (``EVENTS``) to the queue ``queue_arn``.

    On AWS, the queue's access policy must also let ``s3.amazonaws.com`` send messages to it.
    """
    return {"QueueConfigurations": [{"Id": "lustrefs-import", "QueueArn": queue_arn, "Events": list(EVENTS)}]}


def make_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    wait_seconds: int = 20,
    connect_timeout: float = 5,
    max_attempts: int = 3,
) -> Any:
    """An SQS client for ``EventQueue``: the standard credential chain, a read timeout above the long poll."""
    session = boto3.session.Session()
    config = botocore.config.Config(
        connect_timeout=connect_timeout,
        read_timeout=wait_seconds + 10,
        retries={"mode": "standard", "max_attempts": max_attempts},
    )
    region = region or session.region_name or DEFAULT_REGION
    return session.client("sqs", region_name=region, endpoint_url=endpoint_url or None, config=config)


class EventQueue:
    """Receives S3 event notifications from one SQS queue and applies them through ``on_events``.

    ``on_events`` gets the fresh events of one message, in order; when it raises, the message stays in the queue.
    ``limiter`` bounds the worker threads of the SQS calls; a long poll holds its token for up to
    ``wait_seconds``, so give the queue a limiter of its own rather than the repository's.
    """

    def __init__(
        self,
        client: Any,
        queue_url: str,
        on_events: Callable[[list[S3Event]], Awaitable[None]],
        limiter: trio.CapacityLimiter,
        wait_seconds: int = 20,
        max_messages: int = 10,
        sequencer: Sequencer | None = None,
        backoff: tuple[float, float] = (1.0, 30.0),
    ) -> None:
        if not 1 <= wait_seconds <= 20:
            raise ValueError("wait_seconds must be within 1..20")
        if not 1 <= max_messages <= 10:
            raise ValueError("max_messages must be within 1..10")
        if client.meta.config.read_timeout <= wait_seconds:
            raise ValueError("the client's read timeout must exceed wait_seconds (see make_client)")
        self.client = client
        self.queue_url = queue_url
        self.on_events = on_events
        self.limiter = limiter
        self.wait_seconds = wait_seconds
        self.max_messages = max_messages
        self.sequencer = sequencer or Sequencer()
        self.backoff = backoff
        self.messages_received = 0
        self.events_applied = 0
        self.duplicates_dropped = 0  # events not newer than their key's last one
        self.foreign_dropped = 0  # messages
        self.handler_errors = 0  # messages left in the queue because on_events raised
        self.errors = 0  # failed SQS calls
        self.last_receive: float | None = None  # time.time() of the last successful receive
        self.last_error: str | None = None  # None once a receive succeeds again
        self.last_error_time: float | None = None
        self._logged: tuple[str | None, float] = (None, -LOG_EVERY)

    def status(self) -> dict[str, Any]:
        """Counters and health, for ``lustrefs stats``."""
        return {
            "queue_url": self.queue_url,
            "last_receive": self.last_receive,
            "messages_received": self.messages_received,
            "events_applied": self.events_applied,
            "duplicates_dropped": self.duplicates_dropped,
            "foreign_dropped": self.foreign_dropped,
            "handler_errors": self.handler_errors,
            "errors": self.errors,
            "last_error": self.last_error,
            "last_error_time": self.last_error_time,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive and apply messages until cancelled; failures are logged and retried with a growing delay."""
        task_status.started()
        delay = self.backoff[0]
        while True:
            try:
                resp = await self._call(
                    self.client.receive_message,
                    QueueUrl=self.queue_url,
                    MaxNumberOfMessages=self.max_messages,
                    WaitTimeSeconds=self.wait_seconds,
                )
                messages = resp.get("Messages", [])
                self.last_receive = time.time()
                self.messages_received += len(messages)
                if self.last_error is not None:
                    log.info("event queue %s answers again", self.queue_url)
                    self.last_error = None
                delay = self.backoff[0]
                await self._handle(messages)
            except Exception as exc:
                self._failed(exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, self.backoff[1])

    async def _call(self, method: Callable[..., Any], **kwargs: Any) -> Any:
        # Abandoned on cancellation: a receive's messages reappear after their visibility timeout, and a delete
        # cut short leaves messages that are applied again idempotently.
        return await trio.to_thread.run_sync(
            functools.partial(method, **kwargs), limiter=self.limiter, abandon_on_cancel=True
        )

    async def _handle(self, messages: list[dict[str, Any]]) -> None:
        done = []
        for message in messages:
            try:
                events = parse(message.get("Body"))
            except ForeignMessage as exc:
                self.foreign_dropped += 1
                log.warning("dropping message %s of %s: %s", message.get("MessageId"), self.queue_url, exc.reason)
                done.append(message)
                continue
            fresh = self.sequencer.select(events)
            self.duplicates_dropped += len(events) - len(fresh)
            if fresh:
                try:
                    await self.on_events(fresh)
                except Exception:
                    self.handler_errors += 1
                    log.warning("applying message %s failed; it stays queued", message.get("MessageId"), exc_info=True)
                    continue
                self.sequencer.record(fresh)
                self.events_applied += len(fresh)
            done.append(message)
        if done:
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)]
            resp = await self._call(self.client.delete_message_batch, QueueUrl=self.queue_url, Entries=entries)
            for failed in resp.get("Failed", []):
                log.warning("event queue %s: a message was not deleted: %s", self.queue_url, failed.get("Message"))

    def _failed(self, exc: Exception, delay: float) -> None:
        text = f"{type(exc).__name__}: {exc}"
        self.errors += 1
        self.last_error, self.last_error_time = text, time.time()
        now = time.monotonic()
        if text != self._logged[0] or now - self._logged[1] >= LOG_EVERY:
            unexpected = not isinstance(exc, BotoCoreError | ClientError)
            log.warning("event queue %s: %s; retrying in %g s", self.queue_url, text, delay, exc_info=unexpected)
            self._logged = (text, now)
