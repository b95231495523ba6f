"""Asynchronous access to the data repository (the S3 bucket), for the trio thread.

Every boto3 call runs in a worker thread under one ``CapacityLimiter`` sized to the client's connection
pool (the mount's connection budget). Failures become ``RepositoryError`` subclasses that carry an errno.
"""

from __future__ import annotations

import datetime
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import botocore.exceptions
import trio

from lustrefs.s3.fastpath import FastPath, user_metadata
from lustrefs.s3client import parse_timestamp

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_DELETE_BATCH = 1000  # keys one DeleteObjects request may name


class RepositoryError(Exception):
    """An S3 request failed; ``errno`` is what a FUSE request seeing it should return."""

    errno = errno.EIO
    code = "S3Error"


class NotFound(RepositoryError):
    errno = errno.ENOENT
    code = "S3ObjectNotFound"


class AccessDenied(RepositoryError):
    errno = errno.EACCES
    code = "S3AccessDenied"


class VersionChanged(RepositoryError):
    """The object no longer has the ETag a read was pinned to."""

    errno = errno.ESTALE
    code = "S3ObjectChanged"


class Unsupported(RepositoryError):
    """The endpoint does not implement the request (501 NotImplemented: some S3-compatible servers)."""

    code = "S3RequestNotImplemented"


class Unavailable(RepositoryError):
    """The endpoint could not be reached (after the client's bounded retries)."""

    code = "S3EndpointUnavailable"


@dataclass(frozen=True)
class ObjectInfo:
    """One object as a listing or a HEAD reports it."""

    key: str
    size: int
    etag: str
    mtime_ns: int
    metadata: dict[str, str] | None = None  # user metadata (HEAD only)


@dataclass
class Page:
    """One page of a delimiter listing."""

    prefixes: list[str]
    objects: list[ObjectInfo]
    next_token: str | None


class ObjectStore(Protocol):
    """What the core needs of a data repository: :class:`Repository` (S3 through boto3) implements it, and the
    tests' in-memory repository (tests/memrepo.py) does too. Failures are ``RepositoryError`` subclasses."""

    bucket: str
    requests: dict[str, int]  # requests sent, by kind (the mount's stats)
    fast: FastPath | None  # the GET/HEAD fast path, if any (its counters are in the stats)
    upload_slots: trio.Semaphore  # multipart parts in flight, for the whole mount

    async def list_page(self, prefix: str, token: str | None, max_keys: int = 1000) -> Page: ...
    async def any_key(self, prefix: str) -> bool: ...
    async def head(self, key: str) -> ObjectInfo: ...
    async def get_range(self, key: str, etag: str, start: int, end: int) -> bytes: ...
    async def get_object(self, key: str, etag: str) -> bytes: ...
    async def put(self, key: str, body: bytes, metadata: dict[str, str]) -> str: ...
    async def copy(
        self, src_key: str, src_etag: str, key: str, metadata: dict[str, str], src_bucket: str | None = None
    ) -> str: ...
    async def delete_many(self, keys: list[str]) -> dict[str, str]: ...
    async def abort_uploads(self, key: str) -> int: ...
    async def start_upload(self, key: str, metadata: dict[str, str]) -> str: ...
    async def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> str: ...
    async def complete_upload(self, key: str, upload_id: str, etags: dict[int, str]) -> str: ...
    async def abort_upload(self, key: str, upload_id: str) -> None: ...


def _translate(exc: Exception, what: str) -> RepositoryError:
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        msg = f"{what}: {code or status} {err.get('Message', '')}".strip()
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket") or status == 404:
            return NotFound(msg)
        if code in ("403", "AccessDenied", "KMS.AccessDeniedException") or status == 403:
            return AccessDenied(msg)
        if code in ("412", "PreconditionFailed") or status == 412:
            return VersionChanged(msg)
        if code == "NotImplemented" or status == 501:
            return Unsupported(msg)
        return RepositoryError(msg)
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return Unavailable(f"{what}: {exc}")
    return RepositoryError(f"{what}: {exc!r}")


def _etag(raw: str) -> str:
    return raw.strip('"')


def _ns(when: datetime.datetime) -> int:
    return int(when.timestamp() * 1e9)


class Repository:
    """The bucket behind a mount; ``client`` is a boto3 S3 client (thread-safe, shared by the workers)."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        max_connections: int,
        kms_key_id: str | None = None,
        fast: FastPath | None = None,
        io_timeout: float = 30.0,
        copy_timeout: float = 300.0,
    ) -> None:
        self.client = client
        self.fast = fast  # GETs and HEADs go this way first (lustrefs.s3.fastpath)
        self.bucket = bucket
        self.kms_key_id = kms_key_id
        self.limiter = trio.CapacityLimiter(max_connections)
        self.upload_slots = trio.Semaphore(max(max_connections // 2, 1))  # multipart parts in flight
        self.requests = {"LIST": 0, "HEAD": 0, "GET": 0, "PUT": 0, "COPY": 0, "DELETE": 0}
        # Seconds one request may take, waiting for a connection and retries included; a server-side copy (up
        # to 5 GiB) gets longer. The client's socket timeouts fit its attempts in io_timeout (s3client).
        self.timeouts = dict.fromkeys(self.requests, io_timeout) | {"COPY": max(io_timeout, copy_timeout)}
        self.stop_at = float("inf")  # trio clock: requests still running then fail at once (set at unmount)

    async def _call(self, what: str, kind: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a worker thread under the limiter; Unavailable (EIO) past the request's bound.

        A thread still blocked on its socket then is abandoned: it keeps its connection (and limiter token)
        until its socket timeouts end it, while the trio thread goes on.
        """
        self.requests[kind] += 1

        def run() -> T:
            try:
                return fn()
            except Exception as exc:
                raise _translate(exc, what) from exc

        timeout = self.timeouts[kind]
        deadline = trio.current_time() + timeout
        with trio.move_on_at(min(deadline, self.stop_at)):
            return await trio.to_thread.run_sync(run, limiter=self.limiter, abandon_on_cancel=True)
        why = f"no answer within {timeout:g} s" if deadline <= self.stop_at else "given up at unmount"
        raise Unavailable(f"{what}: {why}")

    async def list_page(self, prefix: str, token: str | None, max_keys: int = 1000) -> Page:
        """One page of ``ListObjectsV2(Prefix=prefix, Delimiter='/')``."""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": prefix,
            "Delimiter": "/",
            "MaxKeys": max_keys,
        }
        if token:
            kwargs["ContinuationToken"] = token
        resp = await self._call(
            f"LIST s3://{self.bucket}/{prefix}", "LIST", lambda: self.client.list_objects_v2(**kwargs)
        )
        objects = [
            ObjectInfo(o["Key"], o["Size"], _etag(o["ETag"]), _ns(o["LastModified"])) for o in resp.get("Contents", [])
        ]
        prefixes = [p["Prefix"] for p in resp.get("CommonPrefixes", [])]
        return Page(prefixes, objects, resp.get("NextContinuationToken") if resp.get("IsTruncated") else None)

    async def any_key(self, prefix: str) -> bool:
        """Whether at least one key starts with ``prefix``."""
        resp = await self._call(
            f"LIST s3://{self.bucket}/{prefix}",
            "LIST",
            lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1),
        )
        return bool(resp.get("KeyCount") or resp.get("Contents"))

    async def head(self, key: str) -> ObjectInfo:
        """``HeadObject``: size, ETag, Last-Modified and user metadata. Raises NotFound."""

        def head() -> ObjectInfo:
            if self.fast is not None and (h := self.fast.head(key)) is not None:
                modified = parse_timestamp(h["last-modified"])
                return ObjectInfo(key, int(h["content-length"]), _etag(h["etag"]), _ns(modified), user_metadata(h))
            resp = self.client.head_object(Bucket=self.bucket, Key=key)
            return ObjectInfo(
                key, resp["ContentLength"], _etag(resp["ETag"]), _ns(resp["LastModified"]), resp.get("Metadata", {})
            )

        return await self._call(f"HEAD s3://{self.bucket}/{key}", "HEAD", head)

    async def get_range(self, key: str, etag: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object version ``etag``. Raises VersionChanged if it is gone."""

        def get() -> bytes:
            if self.fast is not None and (data := self.fast.get(key, etag, start, end)) is not None:
                return data
            resp = self.client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=f'"{etag}"'
            )
            with resp["Body"] as body:
                return body.read()

        data = await self._call(f"GET s3://{self.bucket}/{key} [{start}, {end})", "GET", get)
        if len(data) != end - start:
            raise RepositoryError(f"GET s3://{self.bucket}/{key}: {len(data)} bytes, expected {end - start}")
        return data

    async def get_object(self, key: str, etag: str) -> bytes:
        """The whole body of a small object (symlink targets)."""

        def get() -> bytes:
            resp = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=f'"{etag}"')
            with resp["Body"] as body:
                return body.read()

        return await self._call(f"GET s3://{self.bucket}/{key}", "GET", get)

    # ------------------------------------------------------------------------------------------------ writes

    def _sse(self) -> dict[str, str]:
        """Encryption headers: none (the bucket's default applies) unless a KMS key is configured."""
        if self.kms_key_id:
            return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.kms_key_id}
        return {}

    async def put(self, key: str, body: bytes, metadata: dict[str, str]) -> str:
        """``PutObject``; returns the new ETag."""
        resp = await self._call(
            f"PUT s3://{self.bucket}/{key}",
            "PUT",
            lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=body, Metadata=metadata, **self._sse()),
        )
        return _etag(resp["ETag"])

    async def copy(
        self, src_key: str, src_etag: str, key: str, metadata: dict[str, str], src_bucket: str | None = None
    ) -> str:
        """Server-side ``CopyObject`` of one version (of this bucket's, or ``src_bucket``'s) with new metadata;
        returns the new ETag."""
        source = src_bucket or self.bucket
        resp = await self._call(
            f"COPY s3://{source}/{src_key} -> s3://{self.bucket}/{key}",
            "COPY",
            lambda: self.client.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": source, "Key": src_key},
                CopySourceIfMatch=f'"{src_etag}"',
                Metadata=metadata,
                MetadataDirective="REPLACE",
                **self._sse(),
            ),
        )
        return _etag(resp["CopyObjectResult"]["ETag"])

    async def delete_many(self, keys: list[str]) -> dict[str, str]:
        """``DeleteObjects`` of up to ``MAX_DELETE_BATCH`` keys in one request; returns {key: error} of those
        S3 could not delete (a key that does not exist counts as deleted)."""
        assert len(keys) <= MAX_DELETE_BATCH
        resp = await self._call(
            f"DELETE s3://{self.bucket}/{keys[0]} (+{len(keys) - 1})",
            "DELETE",
            lambda: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
            ),
        )
        return {e["Key"]: f"{e.get('Code', '')} {e.get('Message', '')}".strip() for e in resp.get("Errors", [])}

    async def abort_uploads(self, key: str) -> int:
        """Abort every multipart upload in progress to ``key`` (left by a crash); returns how many. An endpoint
        that cannot list uploads (NotImplemented) has none to abort that lustrefs could find: 0."""
        try:
            resp = await self._call(
                f"LIST uploads s3://{self.bucket}/{key}",
                "LIST",
                lambda: self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key),
            )
        except Unsupported as exc:
            log.warning("%s: uploads left by a crash are left to the bucket's lifecycle rules", exc)
            return 0
        ids = [u["UploadId"] for u in resp.get("Uploads", []) if u["Key"] == key]
        for upload_id in ids:
            await self._call(
                f"abort upload s3://{self.bucket}/{key}",
                "DELETE",
                lambda upload_id=upload_id: self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                ),
            )
        return len(ids)

    async def start_upload(self, key: str, metadata: dict[str, str]) -> str:
        """``CreateMultipartUpload``; returns the upload id."""
        resp = await self._call(
            f"multipart upload s3://{self.bucket}/{key}",
            "PUT",
            lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata=metadata, **self._sse()),
        )
        return resp["UploadId"]

    async def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> str:
        """``UploadPart`` number ``number``; returns the part's ETag."""
        resp = await self._call(
            f"multipart upload s3://{self.bucket}/{key} part {number}",
            "PUT",
            lambda: self.client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
            ),
        )
        return resp["ETag"]

    async def complete_upload(self, key: str, upload_id: str, etags: dict[int, str]) -> str:
        """``CompleteMultipartUpload`` of the parts ``etags`` (number -> ETag); returns the object's ETag."""
        parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
        resp = await self._call(
            f"multipart upload s3://{self.bucket}/{key}",
            "PUT",
            lambda: self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            ),
        )
        return _etag(resp["ETag"])

    async def abort_upload(self, key: str, upload_id: str) -> None:
        await self._call(
            f"abort upload s3://{self.bucket}/{key}",
            "DELETE",
            lambda: self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id),
        )
