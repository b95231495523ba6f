"""The fast GET/HEAD path against moto's server on 127.0.0.1: same answers as boto3, errors left to boto3."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
import trio

from lustrefs.s3.fastpath import FastPath
from lustrefs.s3.repository import NotFound, Repository, VersionChanged

KEYS = ["plain.bin", "a b/c d.txt", "ünï/cödé", "x+y=z&w", "p%25q", "tilde~/semi;colon", "dir/'quote'(paren)*"]


def _fast(s3: Any, bucket: str) -> FastPath:
    fast = FastPath.create(s3, bucket, boto3.session.Session().get_credentials(), max_connections=4)
    assert fast is not None
    return fast


def test_get_and_head_of_awkward_keys(s3: Any, bucket: str) -> None:
    fast = _fast(s3, bucket)
    for i, key in enumerate(KEYS):
        body = bytes(range(256)) * (i + 1)
        etag = s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata={"file-permissions": "0100644"})["ETag"]
        assert fast.get(key, etag.strip('"'), 3, 200) == body[3:200], key
        headers = fast.head(key)
        assert headers is not None, key
        assert int(headers["content-length"]) == len(body)
        assert headers["etag"] == etag
        assert headers["x-amz-meta-file-permissions"] == "0100644"
    assert (fast.answered, fast.passed) == (2 * len(KEYS), 0)  # all signed right: none fell back to boto3


def test_repository_answers_the_same_with_and_without_the_fast_path(s3: Any, bucket: str) -> None:
    key = "d/f.bin"
    s3.put_object(Bucket=bucket, Key=key, Body=b"0123456789", Metadata={"file-owner": "1000", "file-mtime": "5ns"})
    fast = _fast(s3, bucket)
    with_fast, without = Repository(s3, bucket, 4, fast=fast), Repository(s3, bucket, 4)

    async def both() -> None:
        info, reference = await with_fast.head(key), await without.head(key)
        assert info == reference
        assert await with_fast.get_range(key, info.etag, 2, 7) == b"23456"
        assert fast.answered == 2
        # Errors take boto3's path and raise its usual exceptions.
        with pytest.raises(VersionChanged):
            await with_fast.get_range(key, "0" * 32, 0, 4)
        with pytest.raises(NotFound):
            await with_fast.head("d/missing")
        assert fast.passed == 2

    trio.run(both)


def test_no_fast_path_through_a_proxy(s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = boto3.session.Session().get_credentials()
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # boto3 would send requests there: so must we
    assert FastPath.create(s3, bucket, credentials, 4) is None
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert FastPath.create(s3, bucket, credentials, 4) is not None
    assert FastPath.create(s3, bucket, None, 4) is None  # no credentials: boto3 reports it
