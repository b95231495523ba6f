"""Creation of the boto3 S3 client: the standard credential chain, ``AWS_ENDPOINT_URL`` honoured."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import boto3
import botocore.config

DEFAULT_REGION = "us-east-1"
S3_URL = re.compile(r"^s3://(?P<bucket>[^/]+)(?:/(?P<prefix>.*))?$")


@dataclass(frozen=True)
class S3Url:
    """A parsed ``s3://bucket[/prefix]``; ``prefix`` never starts with ``/``."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Url | None:
        m = S3_URL.match(url)
        if not m or not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", m["bucket"]):
            return None
        return cls(m["bucket"], (m["prefix"] or "").lstrip("/"))


def make_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    max_pool_connections: int = 10,
    connect_timeout: float = 5,
    read_timeout: float = 30,
    max_attempts: int = 3,
):
    """An S3 client. ``endpoint_url`` falls back to ``AWS_ENDPOINT_URL`` (boto3 reads it itself)."""
    session = boto3.session.Session(profile_name=profile)
    region = region or session.region_name or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    config = botocore.config.Config(
        max_pool_connections=max_pool_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": max_attempts},
        # Local endpoints (s3rver) do not understand aws-chunked CRC bodies; checksums only where required.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
    )
    return session.client("s3", region_name=region, endpoint_url=endpoint_url or None, config=config)
