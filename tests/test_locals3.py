"""Tests of the embedded local S3 endpoint (lustrefs.demo.locals3) and of the demo's sample data set."""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lustrefs import records
from lustrefs.demo.locals3 import (
    SAMPLE_BAD_KEY,
    SAMPLE_BIG_FILES,
    SAMPLE_DIR_MARKER,
    SAMPLE_POSIX_KEY,
    SAMPLE_POSIX_METADATA,
    LocalS3,
    LocalS3Error,
    ensure_local_only,
    ensure_test_credentials,
    populate_sample,
)


def port_refuses(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


def keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="module")
def server() -> Iterator[LocalS3]:
    with LocalS3() as srv:
        yield srv


@pytest.fixture
def s3(server: LocalS3) -> Any:
    return server.client()


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def test_start_answers_on_localhost(server: LocalS3) -> None:
    assert server.endpoint_url == f"http://127.0.0.1:{server.port}"
    assert server.running and server.pid is not None and records.process_alive(server.pid)
    cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
    assert b"moto.server" in cmdline and b"127.0.0.1" in cmdline and str(server.port).encode() in cmdline
    assert "Buckets" in server.client().list_buckets()


def test_put_get_round_trip(s3: Any, bucket: str) -> None:
    body = os.urandom(100_000)
    s3.put_object(Bucket=bucket, Key="dir/object.bin", Body=body, Metadata={"k": "v"})
    got = s3.get_object(Bucket=bucket, Key="dir/object.bin")
    assert got["Body"].read() == body
    assert got["Metadata"] == {"k": "v"}
    assert keys(s3, bucket) == ["dir/object.bin"]


def test_populate_sample_hashes_match_the_bucket(s3: Any, bucket: str) -> None:
    hashes = populate_sample(s3, bucket)
    assert set(SAMPLE_BIG_FILES) <= set(hashes)
    assert {"data/genomes/chr1.fa", "data/genomes/chr2.fa", SAMPLE_POSIX_KEY} <= set(hashes)
    for key, digest in hashes.items():
        assert hashlib.sha256(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest() == digest, key
    for key, size in SAMPLE_BIG_FILES.items():
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert len(body) == size
        assert body.startswith(b">") and set(body.splitlines()[1]) <= set(b"ACGT")
        assert body.count(0) == 0 and len(set(body[:4096])) > 4  # not zeros, not one repeated byte
    assert hashes["data/genomes/chr1.fa"] != hashes["data/genomes/chr2.fa"]

    listed = keys(s3, bucket)
    assert SAMPLE_DIR_MARKER in listed and SAMPLE_BAD_KEY in listed  # stored verbatim, not normalised
    assert SAMPLE_DIR_MARKER not in hashes and SAMPLE_BAD_KEY not in hashes
    assert set(hashes) == set(listed) - {SAMPLE_DIR_MARKER, SAMPLE_BAD_KEY}
    # data/results/ is an implied directory: objects below it, no marker objects for it.
    assert any(k.startswith("data/results/run1/") for k in listed)
    assert not [k for k in listed if k.startswith("data/results") and k.endswith("/")]
    # data/genomes/ is nested: two levels, files at the second.
    assert s3.list_objects_v2(Bucket=bucket, Delimiter="/")["CommonPrefixes"] == [{"Prefix": "data/"}]


def test_populate_sample_is_deterministic_and_honours_prefix(s3: Any, bucket: str) -> None:
    first = populate_sample(s3, bucket, "one")
    second = populate_sample(s3, bucket, "two/")
    assert all(k.startswith("one/data/") for k in first)
    assert {k.removeprefix("one/"): v for k, v in first.items()} == {
        k.removeprefix("two/"): v for k, v in second.items()
    }
    assert f"one/{SAMPLE_BAD_KEY}" in keys(s3, bucket, "one/")


def test_posix_metadata_present(s3: Any, bucket: str) -> None:
    populate_sample(s3, bucket)
    head = s3.head_object(Bucket=bucket, Key=SAMPLE_POSIX_KEY)
    assert head["Metadata"] == SAMPLE_POSIX_METADATA
    assert head["ResponseMetadata"]["HTTPHeaders"]["x-amz-meta-file-permissions"] == "0100640"
    assert head["ResponseMetadata"]["HTTPHeaders"]["x-amz-meta-file-mtime"] == "1600000000000000000ns"
    script = s3.head_object(Bucket=bucket, Key="data/posix/script.sh")
    assert script["Metadata"]["file-permissions"] == "0100755"
    assert s3.head_object(Bucket=bucket, Key="data/README.txt")["Metadata"] == {}


def test_stop_leaves_no_process() -> None:
    srv = LocalS3().start()
    pid, port, log = srv.pid, srv.port, srv.log_path
    assert pid is not None and records.process_alive(pid) and log is not None and log.exists()
    srv.stop()
    assert not records.process_alive(pid)
    assert srv.pid is None and not srv.running
    assert port_refuses(port)
    assert not log.exists()  # the default temporary log is removed
    srv.stop()  # idempotent


def test_context_manager_stops_on_exit(tmp_path: Path) -> None:
    log = tmp_path / "moto.log"
    with LocalS3(log_path=log) as srv:
        pid = srv.pid
        assert pid is not None
        srv.client().create_bucket(Bucket="ctx-bucket")
    assert not records.process_alive(pid) and port_refuses(srv.port)
    assert "PUT /ctx-bucket" in log.read_text()  # a caller's log file is kept


def test_restart_keeps_endpoint_and_answers_again() -> None:
    with LocalS3() as srv:
        url, old_pid = srv.endpoint_url, srv.pid
        s3 = srv.client()
        s3.create_bucket(Bucket="before-restart")
        srv.restart()
        assert srv.endpoint_url == url
        assert srv.pid is not None and srv.pid != old_pid
        assert old_pid is not None and not records.process_alive(old_pid)
        # The same client object reaches the new server; moto's data did not survive the restart.
        assert s3.list_buckets()["Buckets"] == []
        s3.create_bucket(Bucket="after-restart")
        s3.put_object(Bucket="after-restart", Key="k", Body=b"v")
        assert s3.get_object(Bucket="after-restart", Key="k")["Body"].read() == b"v"


def test_reset_empties_the_server() -> None:
    with LocalS3() as srv:
        s3 = srv.client()
        s3.create_bucket(Bucket="to-be-reset")
        pid = srv.pid
        srv.reset()
        assert s3.list_buckets()["Buckets"] == [] and srv.pid == pid


def test_start_on_a_taken_port_fails_clearly() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        srv = LocalS3(port=blocker.getsockname()[1], startup_timeout=20)
        with pytest.raises(LocalS3Error, match="exited"):
            srv.start()
        assert srv.pid is None
    srv.stop()


def test_ensure_test_credentials(tmp_path: Path) -> None:
    home = {"HOME": str(tmp_path)}
    env = dict(home)
    assert ensure_test_credentials(env) is True
    assert env == {
        **home,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    env = {**home, "AWS_REGION": "eu-west-1"}
    ensure_test_credentials(env)
    assert "AWS_DEFAULT_REGION" not in env and env["AWS_ACCESS_KEY_ID"] == "testing"

    for configured in (
        {"AWS_ACCESS_KEY_ID": "AKIAREAL", "AWS_SECRET_ACCESS_KEY": "secret"},
        {"AWS_PROFILE": "work"},
    ):
        env = {**home, **configured}
        assert ensure_test_credentials(env) is False
        assert env == {**home, **configured}

    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "config").write_text("[default]\nregion = eu-west-1\n")
    assert ensure_test_credentials(dict(home)) is True  # a region alone is not credentials
    (tmp_path / ".aws" / "credentials").write_text("[default]\naws_access_key_id = AKIAREAL\n")
    env = dict(home)
    assert ensure_test_credentials(env) is False and env == home


def test_ensure_local_only() -> None:
    env = {"NO_PROXY": "example.internal", "HTTP_PROXY": "http://proxy.invalid:3128"}
    ensure_local_only(env)
    assert env["NO_PROXY"].split(",") == ["example.internal", "127.0.0.1", "localhost"]
    assert env["no_proxy"] == "127.0.0.1,localhost"
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    ensure_local_only(env)
    assert env["NO_PROXY"].split(",") == ["example.internal", "127.0.0.1", "localhost"]


def test_client_without_configured_credentials_leaves_environ_alone(
    server: LocalS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    before = dict(os.environ)
    s3 = server.client()
    assert dict(os.environ) == before
    assert s3.list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200  # signed: else NoCredentialsError
