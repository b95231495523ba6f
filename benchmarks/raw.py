"""The raw endpoint, measured with boto3 in the same run: the ceilings the file systems are compared with."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from botocore.exceptions import ClientError

from .cases import MB, PROBE
from .host import CaseError, PageCache

RANGE = 8 * 1024**2


def _read_body(resp: dict[str, Any]) -> int:
    n, body = 0, resp["Body"]
    try:
        for chunk in body.iter_chunks(1024**2):
            n += len(chunk)
    finally:
        body.close()
    return n


def _in_flight(fn: Callable[[Any], int], items: list[Any], inflight: int) -> tuple[float, int]:
    """Apply ``fn`` to every item with ``inflight`` threads; returns (seconds, sum of results)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(inflight) as pool:
        total = sum(pool.map(fn, items))
    return time.perf_counter() - start, total


def whole_get(client: Any, bucket: str, key: str, size: int) -> float:
    """One GET of the whole object; MB/s."""
    start = time.perf_counter()
    n = _read_body(client.get_object(Bucket=bucket, Key=key))
    elapsed = time.perf_counter() - start
    if n != size:
        raise CaseError(f"GET {key}: {n} bytes, expected {size}")
    return size / elapsed / MB


def ranged_gets(client: Any, bucket: str, key: str, size: int, inflight: int, part: int = RANGE) -> float:
    """The whole object as ``part``-sized ranged GETs, ``inflight`` at a time; MB/s."""
    ranges = [(off, min(off + part, size) - 1) for off in range(0, size, part)]

    def get(r: tuple[int, int]) -> int:
        return _read_body(client.get_object(Bucket=bucket, Key=key, Range=f"bytes={r[0]}-{r[1]}"))

    elapsed, n = _in_flight(get, ranges, inflight)
    if n != size:
        raise CaseError(f"ranged GETs of {key}: {n} bytes, expected {size}")
    return size / elapsed / MB


def ranged_latencies(client: Any, bucket: str, key: str, offsets: list[int], cache: PageCache) -> list[float]:
    """Seconds for one 4 KiB ranged GET at each offset (page cache dropped before each)."""
    samples = []
    for off in offsets:
        cache.drop()
        start = time.perf_counter()
        n = _read_body(client.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{off + PROBE - 1}"))
        samples.append(time.perf_counter() - start)
        if n != PROBE:
            raise CaseError(f"4 KiB ranged GET at {off}: {n} bytes")
    return samples


def _list(client: Any, bucket: str, prefix: str, delimiter: str | None) -> tuple[list[str], int, int]:
    """All pages of one listing; returns (common prefixes, number of objects, number of requests)."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
    prefixes: list[str] = []
    objects = requests = 0
    while True:
        resp = client.list_objects_v2(**kwargs)
        requests += 1
        prefixes += [p["Prefix"] for p in resp.get("CommonPrefixes", [])]
        objects += len(resp.get("Contents", []))
        if not resp.get("IsTruncated"):
            return prefixes, objects, requests
        kwargs["ContinuationToken"] = resp["NextContinuationToken"]


def list_lazy(client: Any, bucket: str, prefix: str) -> tuple[float, int]:
    """Delimiter listings of ``prefix`` and each sub-directory in turn (as a lazy lister does); (s, objects)."""
    start = time.perf_counter()
    todo, objects = [prefix], 0
    while todo:
        subdirs, n, _ = _list(client, bucket, todo.pop(0), "/")
        todo += subdirs
        objects += n
    return time.perf_counter() - start, objects


def list_flat(client: Any, bucket: str, prefix: str) -> tuple[float, int]:
    """One flat listing of everything under ``prefix`` (pages of 1,000); (seconds, objects)."""
    start = time.perf_counter()
    _, n, _ = _list(client, bucket, prefix, None)
    return time.perf_counter() - start, n


def heads(client: Any, bucket: str, keys: list[str], inflight: int) -> float:
    """HEAD of every key, ``inflight`` at a time; seconds."""

    def head(key: str) -> int:
        client.head_object(Bucket=bucket, Key=key)
        return 1

    return _in_flight(head, keys, inflight)[0]


def small_gets(client: Any, bucket: str, keys: list[str], size: int, inflight: int) -> float:
    """GET of every (small) object, ``inflight`` at a time; objects per second."""

    def get(key: str) -> int:
        return _read_body(client.get_object(Bucket=bucket, Key=key))

    elapsed, n = _in_flight(get, keys, inflight)
    if n != size * len(keys):
        raise CaseError(f"small GETs: {n} bytes, expected {size * len(keys)}")
    return len(keys) / elapsed


def has_object(client: Any, bucket: str, key: str, size: int) -> bool:
    """Whether a HEAD of ``key`` finds the object with ``size`` bytes (a 404 is False, not an error)."""
    try:
        return client.head_object(Bucket=bucket, Key=key)["ContentLength"] == size
    except ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        raise


def delete(client: Any, bucket: str, key: str) -> None:
    """Delete ``key`` (whether or not it exists)."""
    client.delete_object(Bucket=bucket, Key=key)
