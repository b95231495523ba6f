"""The cluster engine's control plane: file system records shared by hosts through PostgreSQL, the control lock
across hosts, and ``configure-metadata-engine`` / ``describe-metadata-engine``.

A "host" is a ``LUSTREFS_HOME`` of its own; every host names the same database (``pg_database``). S3 is moto's
in-process mock.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import in_process_moto
from psycopg.conninfo import make_conninfo

from lustrefs import records
from lustrefs.client import cli, control
from lustrefs.errors import FsxError
from lustrefs.store import pg

BUCKET = "cluster-bucket"
ERROR_PREFIX = "\nAn error occurred ({code}) when calling the {op} operation: "


class Cluster:
    """Hosts sharing one database: ``on("a")`` makes this process act as host ``a``."""

    def __init__(self, conninfo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3: Any) -> None:
        self.conninfo, self.tmp_path, self.monkeypatch, self.s3 = conninfo, tmp_path, monkeypatch, s3

    def on(self, host: str) -> Path:
        home = self.tmp_path / f"host-{host}"
        self.monkeypatch.setenv("LUSTREFS_HOME", str(home))
        return home

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def schema_exists(self, fs_id: str) -> bool:
        return self.query("SELECT to_regnamespace(%s)", pg.schema_name(fs_id)) != [(None,)]


@pytest.fixture
def cluster(pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with in_process_moto(tmp_path, monkeypatch) as s3:
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="data/a.txt", Body=b"payload")
        monkeypatch.setenv("LUSTREFS_METADATA_ENGINE", "postgresql")
        monkeypatch.setenv("LUSTREFS_DATABASE", pg_database)
        yield Cluster(pg_database, tmp_path, monkeypatch, s3)


class Run:
    def __init__(self, rc: int, out: str, err: str) -> None:
        self.rc, self.out, self.err = rc, out, err

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.out)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Any:
    def invoke(*argv: str) -> Run:
        rc = cli.main(list(argv))
        captured = capsys.readouterr()
        return Run(rc, captured.out, captured.err)

    return invoke


def linked(**lustre: Any) -> dict[str, Any]:
    conf = {"ImportPath": f"s3://{BUCKET}/data", **lustre}
    return {"FileSystemType": "LUSTRE", "StorageCapacity": 1200, "LustreConfiguration": conf}


def create(cluster: Cluster, request: dict[str, Any]) -> dict[str, Any]:
    return control.create_file_system(request, cluster.s3, None, "us-east-1")["FileSystem"]


def assert_service_error(result: Run, code: str, op: str, fragment: str = "") -> None:
    assert result.rc == 254, result.err
    assert result.out == ""
    assert result.err.startswith(ERROR_PREFIX.format(code=code, op=op)), result.err
    assert fragment in result.err
    assert "Traceback" not in result.err


# ------------------------------------------------------------------------------------- records across hosts


def test_a_file_system_created_on_one_host_is_described_on_another(cluster: Cluster, run: Any) -> None:
    home_a = cluster.on("a")
    conf = f"ImportPath=s3://{BUCKET}/data,AutoImportPolicy=NEW"
    created = run(
        "create-file-system", "--file-system-type", "LUSTRE", "--storage-capacity", "1", "--lustre-configuration", conf
    )
    assert created.rc == 0, created.err
    fs = created.json["FileSystem"]
    described_a = run("describe-file-systems")
    cluster.on("b")
    described_b = run("describe-file-systems")
    assert described_b.rc == 0, described_b.err
    assert described_b.out == described_a.out
    assert described_b.json == {"FileSystems": [fs]}
    assert run("describe-file-systems", "--file-system-ids", fs["FileSystemId"]).json == {"FileSystems": [fs]}
    # The record is a row of the database, with its private fields, and no file of host a.
    [(text,)] = cluster.query("SELECT record FROM lustrefs.filesystems WHERE id = %s", fs["FileSystemId"])
    assert control.public_view(json.loads(text)) == fs
    assert json.loads(text)["_Region"] == "us-east-1"
    assert not list(home_a.glob("filesystems/*.json"))


def test_an_update_on_one_host_is_seen_on_the_other(cluster: Cluster) -> None:
    cluster.on("a")
    fs_id = create(cluster, linked())["FileSystemId"]
    cluster.on("b")
    updated = control.update_file_system(fs_id, {"AutoImportPolicy": "NEW_CHANGED_DELETED"})["FileSystem"]
    cluster.on("a")
    [fs] = control.describe_file_systems([fs_id])["FileSystems"]
    assert fs == updated
    assert fs["LustreConfiguration"]["DataRepositoryConfiguration"]["AutoImportPolicy"] == "NEW_CHANGED_DELETED"
    assert records.load_record(fs_id)["LustreConfiguration"] == updated["LustreConfiguration"]


def test_a_delete_on_one_host_removes_the_file_system_and_its_namespace(cluster: Cluster, run: Any) -> None:
    home_a = cluster.on("a")
    keep = create(cluster, linked())["FileSystemId"]
    fs_id = create(cluster, linked())["FileSystemId"]
    pg.connect(cluster.conninfo, fs_id).close()  # the namespace a mount creates
    records.fs_dir(fs_id)
    assert cluster.schema_exists(fs_id)
    assert run("delete-file-system", "--file-system-id", fs_id).json == {"FileSystemId": fs_id, "Lifecycle": "DELETING"}
    assert not cluster.schema_exists(fs_id)
    assert not (home_a / fs_id).exists()
    cluster.on("b")
    described = run("describe-file-systems", "--file-system-ids", fs_id)
    assert_service_error(described, "FileSystemNotFound", "DescribeFileSystems")
    with pytest.raises(FsxError) as excinfo:
        records.load_record(fs_id)
    assert excinfo.value.code == "FileSystemNotFound"
    assert [r["FileSystemId"] for r in records.list_records()] == [keep]
    assert_service_error(run("delete-file-system", "--file-system-id", fs_id), "FileSystemNotFound", "DeleteFileSystem")


def test_a_delete_is_refused_while_mounted_on_this_host(cluster: Cluster, fake_daemon: Any) -> None:
    cluster.on("a")
    fs_id = create(cluster, linked())["FileSystemId"]
    pg.connect(cluster.conninfo, fs_id).close()
    fake_daemon(fs_id, "/mnt/fsx")
    with pytest.raises(FsxError) as excinfo:
        control.delete_file_system(fs_id)
    assert excinfo.value.code == "BadRequest"
    assert "is mounted at /mnt/fsx" in excinfo.value.message
    assert cluster.schema_exists(fs_id)
    cluster.on("b")
    assert records.load_record(fs_id)["FileSystemId"] == fs_id


def test_a_client_request_token_is_found_from_another_host(cluster: Cluster) -> None:
    cluster.on("a")
    first = create(cluster, {**linked(), "ClientRequestToken": "job-42"})
    cluster.on("b")
    again = create(cluster, {**linked(), "ClientRequestToken": "job-42"})
    assert again == first
    assert [r["FileSystemId"] for r in records.list_records()] == [first["FileSystemId"]]
    with pytest.raises(FsxError) as excinfo:
        create(cluster, {**linked(AutoImportPolicy="NEW"), "ClientRequestToken": "job-42"})
    assert excinfo.value.code == "IncompatibleParameterError"
    assert first["FileSystemId"] in excinfo.value.message


def test_control_plane_changes_are_serialised_across_hosts(cluster: Cluster) -> None:
    cluster.on("a")
    request = {"FileSystemType": "LUSTRE", "StorageCapacity": 1200}
    created: list[str] = []
    with control.control_lock(control.CREATE):  # host a in the middle of a change
        cluster.on("b")
        other = threading.Thread(target=lambda: created.append(create(cluster, request)["FileSystemId"]))
        other.start()
        other.join(1.5)
        assert other.is_alive() and not created, "host b's create did not wait for host a's lock"
    other.join(30)
    assert not other.is_alive() and len(created) == 1
    assert [r["FileSystemId"] for r in records.list_records()] == created


def test_hosts_creating_the_records_table_at_once_do_not_race(cluster: Cluster) -> None:
    """Eight hosts' first use of a fresh database at once, ten times: without the DDL lock about half the rounds
    fail (CREATE SCHEMA IF NOT EXISTS is not safe against a concurrent one), so a missing lock is caught."""
    cluster.on("a")
    errors: list[FsxError] = []

    def first_use(start: threading.Barrier) -> None:
        start.wait()
        try:
            records.list_records()
        except FsxError as exc:
            errors.append(exc)

    for _ in range(10):
        with psycopg.connect(cluster.conninfo, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS lustrefs CASCADE")
        start = threading.Barrier(8)
        hosts = [threading.Thread(target=first_use, args=(start,)) for _ in range(8)]
        for host in hosts:
            host.start()
        for host in hosts:
            host.join(60)
    assert errors == []
    assert cluster.query("SELECT count(*) FROM lustrefs.filesystems") == [(0,)]


# ------------------------------------------------------------------------------------------------- errors


def test_waiting_for_another_hosts_lock_is_bounded(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg, "STATEMENT_TIMEOUT_MS", 500)
    cluster.on("a")
    with psycopg.connect(cluster.conninfo, autocommit=True) as holder:  # a host stuck in a change
        holder.execute("SELECT pg_advisory_lock(hashtext('lustrefs control'))")
        start = time.monotonic()
        with pytest.raises(FsxError) as excinfo:
            control.update_file_system("fs-0123456789abcdef0", {"AutoImportPolicy": "NEW"})
        assert time.monotonic() - start < 5
    assert excinfo.value.code == "InternalServerError"
    assert excinfo.value.operation == "UpdateFileSystem"
    assert "Another control-plane change held the cluster's lock for more than 0.5 s" in excinfo.value.message
    with pytest.raises(FsxError) as excinfo:  # released: the update runs (and finds no such file system)
        control.update_file_system("fs-0123456789abcdef0", {"AutoImportPolicy": "NEW"})
    assert excinfo.value.code == "FileSystemNotFound"


@pytest.fixture
def silent_server() -> Iterator[int]:
    """The port of a TCP server on 127.0.0.1 that accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def test_an_unanswering_database_fails_clearly_within_the_connect_bound(
    cluster: Cluster, run: Any, silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg, "CONNECT_TIMEOUT_S", 2)
    monkeypatch.setenv("LUSTREFS_DATABASE", f"host=127.0.0.1 port={silent_server} dbname=x user=x")
    cluster.on("a")
    for argv, op in (
        (["describe-file-systems"], "DescribeFileSystems"),
        (["create-file-system", "--file-system-type", "LUSTRE", "--storage-capacity", "1"], "CreateFileSystem"),
        (["delete-file-system", "--file-system-id", "fs-0123456789abcdef0"], "DeleteFileSystem"),
    ):
        start = time.monotonic()
        result = run(*argv)
        assert time.monotonic() - start < 2 + 3
        assert_service_error(result, "InternalServerError", op, "The metadata database (PostgreSQL) cannot be used: ")
        assert "timeout" in result.err


@pytest.mark.parametrize(
    ("conninfo", "fragment"),
    [
        ("host=127.0.0.1 port=1 dbname=x user=x", "Connection refused"),
        ("bogus=1", 'invalid connection option "bogus"'),
    ],
)
def test_a_bad_connection_string_fails_without_a_traceback(
    cluster: Cluster, tmp_path: Path, conninfo: str, fragment: str
) -> None:
    """In a real process: the message on stderr, exit status 254, no traceback."""
    home = cluster.on("a")
    env = {**os.environ, "LUSTREFS_DATABASE": conninfo}
    code = "import sys; from lustrefs.client.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "describe-file-systems"]
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 254
    assert res.stdout == ""
    prefix = ERROR_PREFIX.format(code="InternalServerError", op="DescribeFileSystems")
    assert res.stderr.startswith(prefix + "The metadata database (PostgreSQL) cannot be used: "), res.stderr
    assert fragment in res.stderr
    assert "Traceback" not in res.stderr
    assert not (home / "filesystems").exists()


def test_a_malformed_engine_setting_is_a_clear_error(cluster: Cluster, run: Any) -> None:
    cluster.on("a")
    cluster.monkeypatch.setenv("LUSTREFS_METADATA_ENGINE", "mysql")
    result = run("describe-file-systems")
    assert_service_error(result, "InternalServerError", "DescribeFileSystems", "metadata engine setting is invalid")
    assert "'mysql' is not one of sqlite, postgresql" in result.err


# ------------------------------------------------------------------------ configure-metadata-engine and describe


def test_configure_metadata_engine_writes_a_private_file_and_masks_the_password(cluster: Cluster, run: Any) -> None:
    home = cluster.on("a")
    conninfo = make_conninfo(cluster.conninfo, password="s3cr'et pass")  # trust authentication: not checked
    cluster.monkeypatch.delenv("LUSTREFS_METADATA_ENGINE")
    cluster.monkeypatch.delenv("LUSTREFS_DATABASE")
    masked = make_conninfo(cluster.conninfo, password="s3cr'et pass").replace(r"'s3cr\'et pass'", "***")
    assert "s3cr" not in masked

    result = run("configure-metadata-engine", "--engine", "postgresql", "--conninfo", conninfo)
    assert result.rc == 0, result.err
    assert result.json == {"MetadataEngine": {"Engine": "postgresql", "ConnectionString": masked}}
    path = home / "metadata-engine.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"engine": "postgresql", "conninfo": conninfo}
    assert [p.name for p in home.iterdir() if p.name.startswith(".metadata-engine")] == []

    described = run("describe-metadata-engine")
    assert described.rc == 0, described.err
    view = {"Engine": "postgresql", "ConnectionString": masked, "Source": "file", "ConfigFile": str(path)}
    assert described.json == {"MetadataEngine": view}
    assert "s3cr" not in described.out + described.err

    # Host a now uses the database through its file; host b, through its environment, sees its file systems.
    fs_id = create(cluster, linked())["FileSystemId"]
    cluster.on("b")
    cluster.monkeypatch.setenv("LUSTREFS_METADATA_ENGINE", "postgresql")
    cluster.monkeypatch.setenv("LUSTREFS_DATABASE", conninfo)
    assert records.load_record(fs_id)["FileSystemId"] == fs_id
    assert run("describe-metadata-engine").json == {
        "MetadataEngine": {"Engine": "postgresql", "ConnectionString": masked, "Source": "environment"}
    }


def test_configure_metadata_engine_refuses_a_database_it_cannot_reach(cluster: Cluster, run: Any) -> None:
    home = cluster.on("a")
    cluster.monkeypatch.delenv("LUSTREFS_METADATA_ENGINE")
    argv = ("configure-metadata-engine", "--engine", "postgresql", "--conninfo", "host=127.0.0.1 port=1 password=pw")
    result = run(*argv)
    assert_service_error(result, "InternalServerError", "ConfigureMetadataEngine", "Connection refused")
    assert "pw" not in result.err.replace("password", "")
    assert not (home / "metadata-engine.json").exists()
    assert run("describe-metadata-engine").json == {
        "MetadataEngine": {"Engine": "sqlite", "ConnectionString": "", "Source": "default"}
    }


def test_configure_sqlite_switches_back_to_the_files(cluster: Cluster, run: Any) -> None:
    home = cluster.on("a")
    cluster.monkeypatch.delenv("LUSTREFS_METADATA_ENGINE")
    assert run("configure-metadata-engine", "--engine", "sqlite").json == {
        "MetadataEngine": {"Engine": "sqlite", "ConnectionString": ""}
    }
    assert json.loads((home / "metadata-engine.json").read_text()) == {"engine": "sqlite", "conninfo": ""}
    fs_id = create(cluster, linked())["FileSystemId"]
    assert (home / "filesystems" / f"{fs_id}.json").exists()
    assert cluster.query("SELECT to_regclass('lustrefs.filesystems')") == [(None,)]
    bad = run("configure-metadata-engine", "--engine", "sqlite", "--conninfo", "host=x")
    assert_service_error(
        bad, "BadRequest", "ConfigureMetadataEngine", "--conninfo is only used with --engine postgresql"
    )


@pytest.mark.parametrize(
    ("conninfo", "masked"),
    [
        ("host=db user=u password=secret dbname=x", "host=db user=u password=*** dbname=x"),
        ("password = 'a b\\'c' host=db", "password = *** host=db"),
        ("password=a\\ b host=db", "password=*** host=db"),
        ("postgresql://u:secret@db:5432/x?sslmode=require", "postgresql://u:***@db:5432/x?sslmode=require"),
        ("postgres://u@db/x?password=secret&sslmode=require", "postgres://u@db/x?password=***&sslmode=require"),
        ("postgresql://db:5432,db2/x", "postgresql://db:5432,db2/x"),
        ("host=db passfile=/p", "host=db passfile=/p"),
        ("", ""),
    ],
)
def test_masked_conninfo(conninfo: str, masked: str) -> None:
    assert cli.masked_conninfo(conninfo) == masked
