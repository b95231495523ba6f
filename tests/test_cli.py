"""Unit tests of the ``lustrefs`` console script and the ``mount.lustrefs`` helper (moto in-process S3)."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from helpers import in_process_moto

from lustrefs import records
from lustrefs.client import cli, mount
from lustrefs.errors import FsxError

BUCKET = "cli-bucket"
CREATE = ["create-file-system", "--file-system-type", "LUSTRE", "--storage-capacity", "1200"]
LINKED = [*CREATE, "--lustre-configuration", f"ImportPath=s3://{BUCKET}/data"]
ERROR_PREFIX = "\nAn error occurred ({code}) when calling the {op} operation: "


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An isolated LUSTREFS_HOME and a moto S3 holding BUCKET with one object."""
    with in_process_moto(tmp_path, monkeypatch) as client:
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="data/a.txt", Body=b"payload")
        yield client


class Run:
    """The outcome of one CLI invocation."""

    def __init__(self, rc: int, out: str, err: str) -> None:
        self.rc, self.out, self.err = rc, out, err

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.out)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]):
    def invoke(*argv: str, main: Any = cli.main) -> Run:
        rc = main(list(argv))
        captured = capsys.readouterr()
        return Run(rc, captured.out, captured.err)

    return invoke


def assert_service_error(result: Run, code: str, op: str, fragment: str = "") -> None:
    assert result.rc == 254
    assert result.out == ""
    assert result.err.startswith(ERROR_PREFIX.format(code=code, op=op))
    assert fragment in result.err


def create_id(run: Any, *argv: str) -> str:
    result = run(*LINKED, *argv)
    assert result.rc == 0, result.err
    return result.json["FileSystem"]["FileSystemId"]


# ---------------------------------------------------------------------------------------------- help


def test_help_lists_every_command(run: Any) -> None:
    result = run("--help")
    assert result.rc == 0
    commands = {
        "create-file-system": "Create a file system linked to an S3 bucket.",
        "describe-file-systems": "Describe file systems.",
        "update-file-system": "Change a file system's updatable settings.",
        "delete-file-system": "Delete a file system and its local state.",
        "mount": "Mount a file system with the FUSE daemon.",
        "umount": "Unmount a lustrefs mount point.",
    }
    listed = " ".join(result.out.split())
    for name, help_text in commands.items():
        assert f" {name} {help_text}" in listed
        sub = run(name, "--help")
        assert sub.rc == 0
        assert help_text in sub.out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["no-such-command"],
        ["create-file-system", "--storage-capacity", "1200"],
        [*CREATE[:-1], "abc"],
        [*CREATE, "--lustre-configuration", "{not json"],
        [*CREATE, "--lustre-configuration", "ImportPath"],
        [*CREATE, "--lustre-configuration", 'ImportPath="s3://x'],
        [*CREATE, "--tags", "[1, 2]"],
        ["describe-file-systems", "--max-results", "x"],
        ["update-file-system", "--file-system-id", "fs-00000000000000000"],
        ["delete-file-system"],
    ],
)
def test_usage_errors_exit_252(s3: Any, run: Any, argv: list[str]) -> None:
    result = run(*argv)
    assert result.rc == 252
    assert "usage: lustrefs" in result.err
    assert records.list_records() == []


# ---------------------------------------------------------------------------------------------- create


def test_create_shorthand(s3: Any, run: Any) -> None:
    result = run(
        *CREATE,
        "--lustre-configuration",
        f"ImportPath=s3://{BUCKET}/data,ExportPath=s3://{BUCKET}/e,AutoImportPolicy=NEW_CHANGED,"
        "ImportedFileChunkSize=2048,DeploymentType=PERSISTENT_1",
        "--tags", "Key=Name,Value=x", "Key=Team,Value=storage",
        "--client-request-token", "T1",
    )
    assert result.rc == 0, result.err
    assert result.out.startswith('{\n    "FileSystem": {\n        "')
    fs = result.json["FileSystem"]
    assert re.fullmatch(r"fs-[0-9a-f]{17}", fs["FileSystemId"])
    assert fs["Lifecycle"] == "AVAILABLE"
    assert fs["StorageCapacity"] == 1200
    assert fs["Tags"] == [{"Key": "Name", "Value": "x"}, {"Key": "Team", "Value": "storage"}]
    assert fs["LustreConfiguration"]["DeploymentType"] == "PERSISTENT_1"
    assert fs["LustreConfiguration"]["DataRepositoryConfiguration"] == {
        "Lifecycle": "AVAILABLE",
        "ImportPath": f"s3://{BUCKET}/data",
        "ExportPath": f"s3://{BUCKET}/e",
        "AutoImportPolicy": "NEW_CHANGED",
        "ImportedFileChunkSize": 2048,
        "AutoExportPolicy": {"Events": ["NEW", "CHANGED", "DELETED"]},
    }
    assert not [k for k in fs if k.startswith("_")]
    assert records.load_record(fs["FileSystemId"])["_ClientRequestToken"] == "T1"


def test_create_json_form(s3: Any, run: Any) -> None:
    conf = {"ImportPath": f"s3://{BUCKET}/", "AutoImportPolicy": "NEW", "ImportedFileChunkSize": 10}
    result = run(
        *CREATE, "--lustre-configuration", json.dumps(conf), "--tags", '[{"Key": "Name", "Value": "j"}]'
    )
    assert result.rc == 0, result.err
    fs = result.json["FileSystem"]
    repo = fs["LustreConfiguration"]["DataRepositoryConfiguration"]
    assert (repo["ImportPath"], repo["AutoImportPolicy"], repo["ImportedFileChunkSize"]) == (
        f"s3://{BUCKET}/", "NEW", 10
    )
    assert re.fullmatch(rf"s3://{BUCKET}/FSxLustre\d{{8}}T\d{{6}}Z", repo["ExportPath"])
    assert fs["Tags"] == [{"Key": "Name", "Value": "j"}]


def test_create_defaults(s3: Any, run: Any) -> None:
    fs = run(*LINKED).json["FileSystem"]
    lustre = fs["LustreConfiguration"]
    assert (lustre["DeploymentType"], lustre["MountName"]) == ("SCRATCH_1", "fsx")
    repo = lustre["DataRepositoryConfiguration"]
    assert repo["ImportedFileChunkSize"] == 1024
    assert repo["AutoImportPolicy"] == "NONE"
    assert re.fullmatch(rf"s3://{BUCKET}/FSxLustre\d{{8}}T\d{{6}}Z", repo["ExportPath"])


def test_create_stores_network_options_and_region(s3: Any, run: Any) -> None:
    result = run(
        "--region", "eu-west-1", *CREATE,
        "--subnet-ids", "subnet-1", "--security-group-ids", "sg-1", "sg-2",
        "--file-system-type-version", "2.12", "--storage-type", "SSD",
    )
    assert result.rc == 0, result.err
    fs = result.json["FileSystem"]
    assert fs["DNSName"] == f"{fs['FileSystemId']}.fsx.eu-west-1.amazonaws.com"
    assert (fs["SubnetIds"], fs["FileSystemTypeVersion"], fs["StorageType"]) == (["subnet-1"], "2.12", "SSD")
    record = records.load_record(fs["FileSystemId"])
    assert record["_SecurityGroupIds"] == ["sg-1", "sg-2"]
    assert record["_Region"] == "eu-west-1"
    assert record["_EndpointUrl"] is None


def test_create_remembers_the_endpoint(s3: Any, run: Any) -> None:
    # No ImportPath, so S3 is not called and the (never contacted) endpoint is only recorded.
    result = run(*CREATE, "--endpoint-url", "http://127.0.0.1:4568")
    assert result.rc == 0, result.err
    assert records.load_record(result.json["FileSystem"]["FileSystemId"])["_EndpointUrl"] == "http://127.0.0.1:4568"


def test_create_remembers_the_endpoint_from_the_environment(
    s3: Any, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:4569")
    result = run(*CREATE)
    assert result.rc == 0, result.err
    assert records.load_record(result.json["FileSystem"]["FileSystemId"])["_EndpointUrl"] == "http://127.0.0.1:4569"


def test_unknown_profile_is_reported(s3: Any, run: Any) -> None:
    result = run("--profile", "no-such-profile", *CREATE)
    assert result.rc == 255
    assert "no-such-profile" in result.err
    assert records.list_records() == []


def test_create_string_chunk_size_is_a_service_error(s3: Any, run: Any) -> None:
    result = run(*CREATE, "--lustre-configuration", f"ImportPath=s3://{BUCKET}/d,ImportedFileChunkSize=abc")
    assert_service_error(result, "BadRequest", "CreateFileSystem", "ImportedFileChunkSize")


@pytest.mark.parametrize(
    ("conf", "code", "fragment"),
    [
        ("ImportPath=s3://missing-bucket/x", "InvalidImportPath", "bucket 'missing-bucket' does not exist."),
        ("ImportPath=http://x/y", "InvalidImportPath", "import isn't valid"),
        (f"ImportPath=s3://{BUCKET}/d,ExportPath=s3://another-bucket/e", "InvalidExportPath", "same as the import"),
        ("ExportPath=s3://b/e", "BadRequest", "ExportPath can only be specified with ImportPath"),
        (f"ImportPath=s3://{BUCKET}/d,ImportedFileChunkSize=512001", "BadRequest", "ImportedFileChunkSize"),
        (f"ImportPath=s3://{BUCKET}/d,AutoImportPolicy=ALWAYS", "BadRequest", "Invalid AutoImportPolicy"),
        ("DeploymentType=SCRATCH_9", "BadRequest", "Invalid DeploymentType"),
        (f"ImportPath=s3://{BUCKET}/d,DeploymentType=PERSISTENT_2", "BadRequest", "PERSISTENT_2"),
        ("WeeklyMaintenanceStartTime=0:00:00", "BadRequest", "WeeklyMaintenanceStartTime"),
    ],
)
def test_create_service_errors(s3: Any, run: Any, conf: str, code: str, fragment: str) -> None:
    assert_service_error(run(*CREATE, "--lustre-configuration", conf), code, "CreateFileSystem", fragment)
    assert records.list_records() == []
    assert not [p for p in records.home_dir().iterdir() if p.name.startswith("fs-")]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--file-system-type", "WINDOWS", "--storage-capacity", "1200"], "FileSystemType"),
        (["--file-system-type", "LUSTRE"], "StorageCapacity"),
        (["--file-system-type", "LUSTRE", "--storage-capacity", "0"], "StorageCapacity"),
    ],
)
def test_create_bad_type_or_capacity(s3: Any, run: Any, argv: list[str], fragment: str) -> None:
    assert_service_error(run("create-file-system", *argv), "BadRequest", "CreateFileSystem", fragment)
    assert records.list_records() == []


def test_create_unreachable_endpoint(s3: Any, run: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run("--endpoint-url", f"http://127.0.0.1:{port}", *LINKED)
    assert_service_error(result, "BadRequest", "CreateFileSystem", "unable to validate access to the S3 bucket")
    assert records.list_records() == []


def test_client_request_token_idempotency(s3: Any, run: Any) -> None:
    first = create_id(run, "--client-request-token", "CRT1234")
    assert create_id(run, "--client-request-token", "CRT1234") == first
    assert [r["FileSystemId"] for r in records.list_records()] == [first]
    result = run(*LINKED, "--client-request-token", "CRT1234", "--tags", "Key=a,Value=b")
    assert_service_error(result, "IncompatibleParameterError", "CreateFileSystem", "CRT1234")
    assert [r["FileSystemId"] for r in records.list_records()] == [first]


# -------------------------------------------------------------------------------------------- describe


def test_describe_paginates_with_max_results(s3: Any, run: Any) -> None:
    ids = [create_id(run) for _ in range(3)]
    seen: list[str] = []
    argv = ["describe-file-systems", "--max-results", "1"]
    for page_number in range(3):
        page = run(*argv).json
        assert len(page["FileSystems"]) == 1
        seen.append(page["FileSystems"][0]["FileSystemId"])
        if page_number < 2:
            argv = ["describe-file-systems", "--max-results", "1", "--next-token", page["NextToken"]]
        else:
            assert "NextToken" not in page
    assert seen == ids


def test_describe_without_paging_options_returns_everything(s3: Any, run: Any) -> None:
    ids = [create_id(run) for _ in range(3)]
    result = run("describe-file-systems")
    assert result.rc == 0
    assert result.json.keys() == {"FileSystems"}
    assert [fs["FileSystemId"] for fs in result.json["FileSystems"]] == ids
    assert all(not k.startswith("_") for fs in result.json["FileSystems"] for k in fs)
    selected = run("describe-file-systems", "--file-system-ids", ids[1], ids[0]).json["FileSystems"]
    assert [fs["FileSystemId"] for fs in selected] == [ids[1], ids[0]]


def test_describe_errors(s3: Any, run: Any) -> None:
    create_id(run)
    result = run("describe-file-systems", "--file-system-ids", "fs-00000000000000000")
    assert_service_error(result, "FileSystemNotFound", "DescribeFileSystems", "No Amazon FSx file systems were found")
    result = run("describe-file-systems", "--next-token", "!!!")
    assert_service_error(result, "BadRequest", "DescribeFileSystems", "NextToken")


# ---------------------------------------------------------------------------------------------- update


def test_update_shorthand_and_json(s3: Any, run: Any) -> None:
    fs_id = create_id(run)
    result = run(
        "update-file-system", "--file-system-id", fs_id,
        "--lustre-configuration", "AutoImportPolicy=NEW_CHANGED,WeeklyMaintenanceStartTime=2:03:04",
    )
    assert result.rc == 0, result.err
    lustre = result.json["FileSystem"]["LustreConfiguration"]
    assert lustre["DataRepositoryConfiguration"]["AutoImportPolicy"] == "NEW_CHANGED"
    assert lustre["WeeklyMaintenanceStartTime"] == "2:03:04"
    result = run("update-file-system", "--file-system-id", fs_id, "--lustre-configuration",
                 '{"AutoImportPolicy": "NONE"}')
    assert result.rc == 0, result.err
    stored = records.load_record(fs_id)["LustreConfiguration"]
    assert stored["DataRepositoryConfiguration"]["AutoImportPolicy"] == "NONE"
    assert stored["WeeklyMaintenanceStartTime"] == "2:03:04"


@pytest.mark.parametrize(
    ("conf", "fragment"),
    [
        (f"ImportPath=s3://{BUCKET}/x", "ImportPath cannot be changed"),
        (f"ExportPath=s3://{BUCKET}/x", "ExportPath cannot be changed"),
        ("ImportedFileChunkSize=5", "ImportedFileChunkSize cannot be changed"),
        ("DeploymentType=SCRATCH_2", "DeploymentType cannot be changed"),
        ("AutoImportPolicy=SOMETIMES", "Invalid AutoImportPolicy"),
    ],
)
def test_update_errors(s3: Any, run: Any, conf: str, fragment: str) -> None:
    fs_id = create_id(run)
    before = records.load_record(fs_id)
    result = run("update-file-system", "--file-system-id", fs_id, "--lustre-configuration", conf)
    assert_service_error(result, "BadRequest", "UpdateFileSystem", fragment)
    assert records.load_record(fs_id) == before


# ---------------------------------------------------------------------------------------------- delete


def test_delete(s3: Any, run: Any) -> None:
    fs_id = create_id(run)
    (records.fs_dir(fs_id) / "events.jsonl").write_text("{}\n")
    result = run("delete-file-system", "--file-system-id", fs_id)
    assert result.rc == 0
    assert result.json == {"FileSystemId": fs_id, "Lifecycle": "DELETING"}
    assert not (records.home_dir() / fs_id).exists()
    assert records.list_records() == []
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]] == ["data/a.txt"]
    assert_service_error(run("delete-file-system", "--file-system-id", fs_id), "FileSystemNotFound",
                         "DeleteFileSystem")


def test_delete_refuses_while_mounted(s3: Any, run: Any, fake_daemon: Any) -> None:
    fs_id = create_id(run)
    fake_daemon(fs_id, "/mnt/m")
    result = run("delete-file-system", "--file-system-id", fs_id)
    assert_service_error(result, "BadRequest", "DeleteFileSystem", f"{fs_id} is mounted at /mnt/m; unmount it first.")
    assert records.load_record(fs_id)["FileSystemId"] == fs_id
    assert run("describe-file-systems", "--file-system-ids", fs_id).json["FileSystems"][0]["FileSystemId"] == fs_id


# ---------------------------------------------------------------------------------------- mount/umount


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple, dict]]:
    """Fake ``mount`` and ``umount`` commands (lustrefs.client.mount) that record their calls; mount returns 7 and
    umount 3."""
    calls: list[tuple[str, tuple, dict]] = []

    def fake_mount(*args: Any, **kwargs: Any) -> int:
        calls.append(("mount", args, kwargs))
        return 7

    def fake_umount(*args: Any, **kwargs: Any) -> int:
        calls.append(("umount", args, kwargs))
        return 3

    monkeypatch.setattr(mount, "mount", fake_mount)
    monkeypatch.setattr(mount, "umount", fake_umount)
    return calls


def test_mount_passes_options_and_globals(run: Any, daemon: list) -> None:
    result = run("--endpoint-url", "http://127.0.0.1:4568", "--region", "us-west-2", "--profile", "p",
                 "mount", "fs-0123456789abcdef0", "/mnt/fsx", "-o", "ro,allow_other", "--foreground")
    assert result.rc == 7
    assert daemon == [
        (
            "mount",
            ("fs-0123456789abcdef0", "/mnt/fsx"),
            {"options": "ro,allow_other", "foreground": True, "endpoint_url": "http://127.0.0.1:4568",
             "region": "us-west-2", "profile": "p"},
        )
    ]


def test_mount_defaults_and_global_options_after_the_command(run: Any, daemon: list) -> None:
    assert run("mount", "fs-0123456789abcdef0", "/mnt/fsx", "--region", "eu-west-1").rc == 7
    assert daemon[0][2] == {"options": None, "foreground": False, "endpoint_url": None, "region": "eu-west-1",
                            "profile": None}


def test_umount(run: Any, daemon: list) -> None:
    assert run("umount", "/mnt/fsx").rc == 3
    assert daemon == [("umount", ("/mnt/fsx",), {})]


def test_mount_service_error_exits_254(run: Any, monkeypatch: pytest.MonkeyPatch, daemon: list) -> None:
    def failing_mount(*args: Any, **kwargs: Any) -> int:
        raise FsxError("FileSystemNotFound", "File system 'fs-x' does not exist.", "Mount")

    monkeypatch.setattr(mount, "mount", failing_mount)
    result = run("mount", "fs-x", "/mnt/fsx")
    assert result.rc == 254
    assert result.err == "\nAn error occurred (FileSystemNotFound) when calling the Mount operation: " \
        "File system 'fs-x' does not exist.\n"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (None, None),
        ("", None),
        ("defaults", None),
        ("defaults,_netdev,nofail", None),
        ("rw,auto,noauto,user,nouser,users,owner,group", None),
        ("ro", "ro"),
        ("defaults,ro,_netdev", "ro"),
        ("comment=systemd.automount,x-systemd.requires=network.target,_foo,allow_other", "allow_other"),
        ("ro,cache_dir=/var/cache/x,,uid=1000", "ro,cache_dir=/var/cache/x,uid=1000"),
    ],
)
def test_filter_mount_options(options: str | None, expected: str | None) -> None:
    assert cli.filter_mount_options(options) == expected


def test_mount_helper_filters_options(run: Any, daemon: list) -> None:
    result = run("fs-0123456789abcdef0", "/mnt/fsx", "-o", "defaults,_netdev,nofail,ro,allow_other",
                 "-s", "-n", "-N", "/proc/1/ns/mnt", "-t", "lustrefs", main=cli.mount_helper_main)
    assert result.rc == 7
    assert daemon == [
        (
            "mount",
            ("fs-0123456789abcdef0", "/mnt/fsx"),
            {"options": "ro,allow_other", "foreground": False, "endpoint_url": None, "region": None,
             "profile": None},
        )
    ]


def test_mount_helper_fstab_defaults(run: Any, daemon: list) -> None:
    result = run("fs-0123456789abcdef0", "/mnt/fsx", "-o", "rw,defaults,_netdev,nofail", main=cli.mount_helper_main)
    assert result.rc == 7
    assert daemon[0][2]["options"] is None


def test_mount_helper_fake_and_verbose(run: Any, daemon: list) -> None:
    result = run("fs-0123456789abcdef0", "/mnt/fsx", "-f", "-v", "-o", "ro", main=cli.mount_helper_main)
    assert result.rc == 0
    assert daemon == []
    assert "fs-0123456789abcdef0" in result.out and "ro" in result.out


def test_mount_helper_errors(run: Any, monkeypatch: pytest.MonkeyPatch, daemon: list) -> None:
    assert run("fs-0123456789abcdef0", main=cli.mount_helper_main).rc == 1

    def failing_mount(*args: Any, **kwargs: Any) -> int:
        raise FsxError("FileSystemNotFound", "File system 'fs-x' does not exist.", "Mount")

    monkeypatch.setattr(mount, "mount", failing_mount)
    result = run("fs-x", "/mnt/fsx", main=cli.mount_helper_main)
    assert result.rc == 32
    assert "(FileSystemNotFound)" in result.err


# ------------------------------------------------------------------------------------------ shorthand


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a=1,b=2", {"a": "1", "b": "2"}),
        ("ImportPath=s3://b/year=2020/x", {"ImportPath": "s3://b/year=2020/x"}),
        ("Key=Name,Value=a,b", {"Key": "Name", "Value": "a,b"}),
        ('Key=k,Value="x,y=z"', {"Key": "k", "Value": "x,y=z"}),
        ("Key=k,Value=''", {"Key": "k", "Value": ""}),
        ("Key=k,Value=", {"Key": "k", "Value": ""}),
        (" a = 1 , b=2", {"a": "1", "b": "2"}),
    ],
)
def test_parse_shorthand(text: str, expected: dict[str, str]) -> None:
    assert cli.parse_shorthand(text) == expected


@pytest.mark.parametrize("text", ["novalue", "a=1,a=2", 'a="x', 'a="x"y', "=1"])
def test_parse_shorthand_errors(text: str) -> None:
    with pytest.raises(cli.UsageError):
        cli.parse_shorthand(text)


def test_parse_structure_coerces_model_types() -> None:
    parsed = cli.parse_structure("ImportedFileChunkSize=10,CopyTagsToBackups=true,ImportPath=s3://b/10")
    assert parsed == {"ImportedFileChunkSize": 10, "CopyTagsToBackups": True, "ImportPath": "s3://b/10"}
    assert cli.parse_structure('{"ImportedFileChunkSize": "10"}') == {"ImportedFileChunkSize": "10"}
