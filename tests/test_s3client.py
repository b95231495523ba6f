"""The S3 client's fast timestamp parser agrees with botocore's on what S3 sends, and falls back on the rest."""

from __future__ import annotations

import boto3
import botocore.utils
import pytest
import trio
from botocore.stub import Stubber

from lustrefs.s3.repository import Repository, RepositoryError
from lustrefs.s3client import parse_timestamp


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-27T12:00:00.000Z",  # ListObjectsV2 LastModified
        "2026-11-27T12:00:00Z",
        "2026-11-27T12:00:00.123456+02:00",
        "Fri, 27 Nov 2026 12:00:00 GMT",  # Last-Modified header of HEAD and GET
        "Fri, 27 Nov 2026 12:00:00 +0000",
        "1700000000",  # epoch seconds: botocore's parser
    ],
)
def test_parse_timestamp_agrees_with_botocore(value: str) -> None:
    ours, theirs = parse_timestamp(value), botocore.utils.parse_timestamp(value)
    assert ours == theirs
    assert ours.utcoffset() == theirs.utcoffset()


def test_parse_timestamp_rejects_garbage_like_botocore() -> None:
    with pytest.raises(ValueError):
        botocore.utils.parse_timestamp("not a date")
    with pytest.raises(ValueError):
        parse_timestamp("not a date")


def test_an_endpoint_without_multipart_listing_has_no_uploads_to_abort() -> None:
    """s3rver answers ListMultipartUploads with 501 NotImplemented: the recovery of an intent left by a crash
    must not fail for ever (it did: the exporter retried every second and unmounts waited export_timeout)."""
    client = boto3.client(
        "s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:1", aws_access_key_id="x",
        aws_secret_access_key="x",
    )  # fmt: skip
    repo = Repository(client, "b", 2)
    with Stubber(client) as stub:
        stub.add_client_error("list_multipart_uploads", "NotImplemented", "A header you provided implies"
                              " functionality that is not implemented", 501)  # fmt: skip
        assert trio.run(repo.abort_uploads, "k") == 0
        stub.add_client_error("list_multipart_uploads", "InternalError", "try again", 500)
        with pytest.raises(RepositoryError):
            trio.run(repo.abort_uploads, "k")
