"""GET and HEAD of objects without botocore's request pipeline: the happy path of the data path, made cheap.

A ranged GET through a boto3 client costs about 1.3 ms of CPU in the daemon (event hooks, parameter handling,
response parsing) against 0.6 ms for the same request signed with botocore's SigV4 signer and sent with urllib3
(measured against s3rver on 127.0.0.1, see benchmarks/RESULTS.md). On two cores shared with the endpoint, that
CPU is what limits small-file reads and metadata walks.

Only the expected answer is handled here (206/200 with the expected length for a GET, 200 for a HEAD). Anything
else (an error status, a redirect, a connection failure, a timeout) makes these methods return None, and the
caller repeats the request through boto3, which retries, and raises the usual errors. A request here waits at most
the client's read timeout, one share of the mount's ``io_timeout``. Requests use path-style
addressing, as the boto3 client does (``lustrefs.s3client``), the same endpoint, region and credentials chain.
"""

from __future__ import annotations

import logging
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

log = logging.getLogger(__name__)

META = "x-amz-meta-"
HEAD_FIELDS = ("content-length", "etag", "last-modified")  # what lustrefs reads of a HEAD; without one: boto3


class FastPath:
    """Signed GET/HEAD of one bucket's objects over a urllib3 pool shared by the worker threads."""

    def __init__(
        self,
        endpoint_url: str,
        bucket: str,
        region: str,
        credentials: Any,
        max_connections: int,
        connect_timeout: float = 5,
        read_timeout: float = 30,
    ) -> None:
        self.base = endpoint_url.rstrip("/") + "/" + urllib.parse.quote(bucket) + "/"
        self.region = region
        self.credentials = credentials  # botocore credentials (refreshable ones refresh themselves)
        self.pool = urllib3.PoolManager(
            num_pools=2,
            maxsize=max_connections,
            block=False,
            # One attempt here, connecting included, waits at most read_timeout: its share of the mount's
            # io_timeout (lustrefs.s3client.make_client); boto3's attempts follow within the rest.
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout, total=read_timeout),
            retries=False,
        )
        self.answered = 0  # requests answered here
        self.passed = 0  # requests left to boto3

    @classmethod
    def create(cls, client: Any, bucket: str, credentials: Any, max_connections: int) -> FastPath | None:
        """A fast path for ``client``'s endpoint, or None where it would not behave like the client: no
        credentials, or a proxy configured for the endpoint (boto3 would go through it; this does not)."""
        url = client.meta.endpoint_url
        parts = urllib.parse.urlsplit(url)
        proxied = parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname or "")
        if credentials is None or proxied:
            return None
        config = client.meta.config
        return cls(url, bucket, client.meta.region_name, credentials, max_connections,
                   config.connect_timeout, config.read_timeout)  # fmt: skip

    def _request(self, method: str, key: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse | None:
        url = self.base + urllib.parse.quote(key, safe="/~")
        request = AWSRequest(method=method, url=url, headers=headers)
        S3SigV4Auth(self.credentials.get_frozen_credentials(), "s3", self.region).add_auth(request)
        try:
            return self.pool.request(
                method, url, headers=dict(request.prepare().headers), preload_content=True, redirect=False
            )
        except urllib3.exceptions.HTTPError as exc:
            log.debug("%s %s: %s; retrying through boto3", method, key, exc)
            return None

    def get(self, key: str, etag: str, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of version ``etag`` of ``key``, or None (ask boto3)."""
        resp = self._request("GET", key, {"Range": f"bytes={start}-{end - 1}", "If-Match": f'"{etag}"'})
        if resp is not None and resp.status in (200, 206) and len(resp.data) == end - start:
            self.answered += 1
            return resp.data
        self.passed += 1
        return None

    def head(self, key: str) -> Mapping[str, str] | None:
        """The response headers of ``HeadObject`` (lower-case names), or None (ask boto3)."""
        resp = self._request("HEAD", key, {})
        headers = {name.lower(): value for name, value in resp.headers.items()} if resp is not None else {}
        if resp is not None and resp.status == 200 and all(h in headers for h in HEAD_FIELDS):
            self.answered += 1
            return headers
        self.passed += 1
        return None


def user_metadata(headers: Mapping[str, str]) -> dict[str, str]:
    """The ``x-amz-meta-*`` headers as boto3's ``Metadata``: names without the prefix."""
    return {name[len(META) :]: value for name, value in headers.items() if name.startswith(META)}
