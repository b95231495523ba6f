"""The S3 client's fast timestamp parser agrees with botocore's on what S3 sends, and falls back on the rest."""

from __future__ import annotations

import botocore.utils
import pytest

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
