"""Unit tests of lustrefs.client.control against moto's in-process S3."""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import Stubber
from helpers import in_process_moto

from lustrefs import records
from lustrefs.client import control
from lustrefs.errors import FsxError
from lustrefs.s3client import make_client

BUCKET = "import-bucket"
FS_ID = re.compile(r"^fs-[0-9a-f]{17}$")


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An isolated LUSTREFS_HOME and a moto S3 holding BUCKET with two objects under ``data/``."""
    with in_process_moto(tmp_path, monkeypatch) as client:
        client.create_bucket(Bucket=BUCKET)
        client.create_bucket(Bucket="other-bucket")
        for key in ("data/a.txt", "data/sub/b.txt"):
            client.put_object(Bucket=BUCKET, Key=key, Body=b"payload")
        yield client


def request(**lustre: Any) -> dict[str, Any]:
    """A valid CreateFileSystem request with the given LustreConfiguration members."""
    return {"FileSystemType": "LUSTRE", "StorageCapacity": 1200, "LustreConfiguration": lustre}


def linked(**lustre: Any) -> dict[str, Any]:
    return request(ImportPath=f"s3://{BUCKET}/data", **lustre)


def create(s3: Any, req: dict[str, Any], region: str = "us-east-1") -> dict[str, Any]:
    return control.create_file_system(req, s3, None, region)["FileSystem"]


def assert_error(excinfo: pytest.ExceptionInfo[FsxError], code: str, fragment: str, operation: str) -> None:
    assert excinfo.value.code == code
    assert fragment in excinfo.value.message
    assert str(excinfo.value) == (
        f"An error occurred ({code}) when calling the {operation} operation: {excinfo.value.message}"
    )


def assert_nothing_created() -> None:
    home = records.home_dir()
    assert records.list_records() == []
    assert not [p for p in home.iterdir() if p.name.startswith("fs-")]


# ---------------------------------------------------------------------------------------------- create


def test_create_returns_the_fsx_description(s3: Any) -> None:
    fs = create(
        s3,
        {
            **linked(
                ExportPath=f"s3://{BUCKET}/export",
                AutoImportPolicy="NEW_CHANGED",
                ImportedFileChunkSize=2048,
                DeploymentType="PERSISTENT_1",
                WeeklyMaintenanceStartTime="3:04:30",
            ),
            "Tags": [{"Key": "Name", "Value": "x"}],
        },
        region="eu-west-1",
    )
    fs_id = fs["FileSystemId"]
    assert FS_ID.match(fs_id)
    assert fs["OwnerId"] == "123456789012"
    assert isinstance(fs["CreationTime"], float)
    assert fs["FileSystemType"] == "LUSTRE"
    assert fs["Lifecycle"] == "AVAILABLE"
    assert fs["StorageCapacity"] == 1200
    assert fs["DNSName"] == f"{fs_id}.fsx.eu-west-1.amazonaws.com"
    assert fs["ResourceARN"] == f"arn:aws:fsx:eu-west-1:123456789012:file-system/{fs_id}"
    assert fs["Tags"] == [{"Key": "Name", "Value": "x"}]
    lustre = fs["LustreConfiguration"]
    assert lustre["DeploymentType"] == "PERSISTENT_1"
    assert lustre["WeeklyMaintenanceStartTime"] == "3:04:30"
    assert re.fullmatch(r"[a-z0-9]{8}", lustre["MountName"])
    assert lustre["DataRepositoryConfiguration"] == {
        "Lifecycle": "AVAILABLE",
        "ImportPath": f"s3://{BUCKET}/data",
        "ExportPath": f"s3://{BUCKET}/export",
        "AutoImportPolicy": "NEW_CHANGED",
        "AutoExportPolicy": {"Events": ["NEW", "CHANGED", "DELETED"]},
        "ImportedFileChunkSize": 2048,
    }
    assert not [k for k in fs if k.startswith("_")]


def test_create_stores_the_record_with_private_fields(s3: Any) -> None:
    fs = control.create_file_system(
        {**linked(), "ClientRequestToken": "tok-1"}, s3, "http://127.0.0.1:4568", "us-east-1"
    )["FileSystem"]
    record = records.load_record(fs["FileSystemId"])
    assert record["_EndpointUrl"] == "http://127.0.0.1:4568"
    assert record["_Region"] == "us-east-1"
    assert record["_ClientRequestToken"] == "tok-1"
    assert re.fullmatch(r"[0-9a-f]{64}", record["_RequestFingerprint"])
    assert control.public_view(record) == fs


def test_create_defaults(s3: Any) -> None:
    fs = create(s3, linked())
    lustre = fs["LustreConfiguration"]
    assert lustre["DeploymentType"] == "SCRATCH_1"
    assert lustre["MountName"] == "fsx"
    assert control.WEEKLY_TIME.match(lustre["WeeklyMaintenanceStartTime"])
    assert len(lustre["WeeklyMaintenanceStartTime"]) == 7
    repo = lustre["DataRepositoryConfiguration"]
    assert repo["ImportedFileChunkSize"] == 1024
    assert repo["AutoImportPolicy"] == "NONE"
    m = re.fullmatch(rf"s3://{BUCKET}/FSxLustre(\d{{8}}T\d{{6}}Z)", repo["ExportPath"])
    assert m, repo["ExportPath"]
    created = datetime.fromtimestamp(fs["CreationTime"], UTC).strftime("%Y%m%dT%H%M%SZ")
    assert m.group(1) == created


def test_default_maintenance_window_is_derived_from_the_id(s3: Any) -> None:
    for _ in range(5):
        fs = create(s3, request())
        window = fs["LustreConfiguration"]["WeeklyMaintenanceStartTime"]
        assert window == control._default_weekly_time(fs["FileSystemId"])
        assert re.fullmatch(r"[1-7]:([01]\d|2[0-3]):(00|30)", window)
    for fs_id in ("fs-00000000000000000", "fs-fffffffffffffffff"):
        assert re.fullmatch(r"[1-7]:([01]\d|2[0-3]):(00|30)", control._default_weekly_time(fs_id))


def test_values_are_echoed_as_given(s3: Any) -> None:
    fs = create(s3, request(ImportPath=f"s3://{BUCKET}/", ExportPath=f"s3://{BUCKET}/export/"))
    repo = fs["LustreConfiguration"]["DataRepositoryConfiguration"]
    assert repo["ImportPath"] == f"s3://{BUCKET}/"
    assert repo["ExportPath"] == f"s3://{BUCKET}/export/"


def test_create_without_import_path_has_no_repository(s3: Any) -> None:
    fs = create(s3, request(DeploymentType="SCRATCH_2"))
    assert "DataRepositoryConfiguration" not in fs["LustreConfiguration"]
    assert records.load_record(fs["FileSystemId"])["FileSystemId"] == fs["FileSystemId"]


def test_owner_id_from_environment(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCOUNT_ID", "000011112222")
    fs = create(s3, request())
    assert fs["OwnerId"] == "000011112222"
    assert fs["ResourceARN"].startswith("arn:aws:fsx:us-east-1:000011112222:file-system/fs-")


def test_network_parameters_are_stored(s3: Any) -> None:
    req = {
        **request(),
        "SubnetIds": ["subnet-1"],
        "SecurityGroupIds": ["sg-1"],
        "StorageType": "HDD",
        "FileSystemTypeVersion": "2.12",
    }
    fs = create(s3, req)
    assert fs["SubnetIds"] == ["subnet-1"]
    assert fs["StorageType"] == "HDD"
    assert fs["FileSystemTypeVersion"] == "2.12"
    assert records.load_record(fs["FileSystemId"])["_SecurityGroupIds"] == ["sg-1"]


BAD_CHARS = ["\x00", "\r", "\n", "\u0085", "\u2028", "\u2029"]

INVALID_REQUESTS = [
    # (request, error code, message fragment)
    (request(ImportPath="http://import-bucket/data"), "InvalidImportPath", "import isn't valid"),
    (request(ImportPath="s3://"), "InvalidImportPath", "import isn't valid"),
    (request(ImportPath="s3://Bad_Bucket/x"), "InvalidImportPath", "import isn't valid"),
    (request(ImportPath="s3"), "BadRequest", "3 to 4357"),
    (request(ImportPath=f"s3://{BUCKET}/" + "a" * 4357), "BadRequest", "3 to 4357"),
    *[(request(ImportPath=f"s3://{BUCKET}/a{c}b"), "BadRequest", "ImportPath must be") for c in BAD_CHARS],
    *[(linked(ExportPath=f"s3://{BUCKET}/e{c}"), "BadRequest", "ExportPath must be") for c in BAD_CHARS],
    (request(ImportPath="s3://missing-bucket/x"), "InvalidImportPath", "bucket 'missing-bucket' does not exist"),
    (linked(ExportPath="s3://other-bucket/export"), "InvalidExportPath", "must be the same as the import"),
    (linked(ExportPath="ftp://import-bucket/e"), "InvalidExportPath", "export isn't valid"),
    (linked(ImportedFileChunkSize=0), "BadRequest", "ImportedFileChunkSize"),
    (linked(ImportedFileChunkSize=512001), "BadRequest", "ImportedFileChunkSize"),
    (linked(ImportedFileChunkSize="1024"), "BadRequest", "ImportedFileChunkSize"),
    (linked(ImportedFileChunkSize=1.5), "BadRequest", "ImportedFileChunkSize"),
    (linked(ImportedFileChunkSize=True), "BadRequest", "ImportedFileChunkSize"),
    (request(ExportPath=f"s3://{BUCKET}/e"), "BadRequest", "ExportPath can only be specified with ImportPath"),
    (request(ImportedFileChunkSize=10), "BadRequest", "ImportedFileChunkSize can only be specified with"),
    (request(AutoImportPolicy="NEW"), "BadRequest", "AutoImportPolicy can only be specified with"),
    (linked(AutoImportPolicy="SOMETIMES"), "BadRequest", "Invalid AutoImportPolicy"),
    (linked(DeploymentType="SCRATCH_3"), "BadRequest", "Invalid DeploymentType"),
    (request(DeploymentType="scratch_1"), "BadRequest", "Invalid DeploymentType"),
    (linked(DeploymentType="PERSISTENT_2"), "BadRequest", "PERSISTENT_2"),
    (request(WeeklyMaintenanceStartTime="8:01:00"), "BadRequest", "WeeklyMaintenanceStartTime"),
    (request(WeeklyMaintenanceStartTime="1:24:00"), "BadRequest", "WeeklyMaintenanceStartTime"),
    (request(WeeklyMaintenanceStartTime="1:00:60"), "BadRequest", "WeeklyMaintenanceStartTime"),
    (request(Bogus=1), "BadRequest", "Unknown parameter in LustreConfiguration: Bogus"),
    ({**request(), "FileSystemType": "WINDOWS"}, "BadRequest", "FileSystemType"),
    ({"StorageCapacity": 1200}, "BadRequest", "FileSystemType"),
    ({"FileSystemType": "LUSTRE"}, "BadRequest", "StorageCapacity"),
    *[({**request(), "StorageCapacity": v}, "BadRequest", "StorageCapacity") for v in (0, -1, "1200", 1.5)],
    ({**request(), "ClientRequestToken": "bad token!"}, "BadRequest", "ClientRequestToken"),
    ({**request(), "Tags": [{"Key": "", "Value": "x"}]}, "BadRequest", "Tag keys"),
    ({**request(), "Tags": [{"Key": "k", "Value": "v" * 257}]}, "BadRequest", "Tag values"),
    ({**request(), "Tags": []}, "BadRequest", "Tags"),
]


@pytest.mark.parametrize(("req", "code", "fragment"), INVALID_REQUESTS)
def test_create_validation_errors(s3: Any, req: dict[str, Any], code: str, fragment: str) -> None:
    with pytest.raises(FsxError) as excinfo:
        create(s3, req)
    assert_error(excinfo, code, fragment, "CreateFileSystem")
    assert_nothing_created()


@pytest.mark.parametrize(
    ("operation", "code"), [("head_bucket", "403"), ("list_objects_v2", "AccessDenied")]
)
def test_create_access_denied_is_bad_request(s3: Any, operation: str, code: str) -> None:
    stubber = Stubber(s3)
    if operation == "list_objects_v2":
        stubber.add_response("head_bucket", {}, {"Bucket": BUCKET})
    stubber.add_client_error(operation, service_error_code=code, http_status_code=403)
    with stubber, pytest.raises(FsxError) as excinfo:
        create(s3, linked())
    assert_error(excinfo, "BadRequest", control.S3_ACCESS_MESSAGE, "CreateFileSystem")
    assert excinfo.value.message == control.S3_ACCESS_MESSAGE
    assert_nothing_created()


def closed_port() -> int:
    """A localhost TCP port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_create_unreachable_endpoint_is_bad_request(s3: Any) -> None:
    unreachable = make_client(f"http://127.0.0.1:{closed_port()}", max_attempts=1, connect_timeout=1)
    with pytest.raises(FsxError) as excinfo:
        control.create_file_system(linked(), unreachable, unreachable.meta.endpoint_url, "us-east-1")
    assert_error(excinfo, "BadRequest", "unable to validate access to the S3 bucket", "CreateFileSystem")
    assert_nothing_created()


def test_create_checks_only_the_import_prefix(s3: Any) -> None:
    stubber = Stubber(s3)
    stubber.add_response("head_bucket", {}, {"Bucket": BUCKET})
    stubber.add_response("list_objects_v2", {}, {"Bucket": BUCKET, "Prefix": "data", "MaxKeys": 1})
    with stubber:
        create(s3, linked())
    stubber.assert_no_pending_responses()


def test_same_token_and_parameters_return_the_same_file_system(s3: Any) -> None:
    req = {**linked(AutoImportPolicy="NEW"), "ClientRequestToken": "CRT1234"}
    first = create(s3, req)
    second = create(s3, dict(req))
    assert second == first
    assert [r["FileSystemId"] for r in records.list_records()] == [first["FileSystemId"]]


def test_same_token_with_different_parameters_is_incompatible(s3: Any) -> None:
    first = create(s3, {**linked(), "ClientRequestToken": "CRT1234"})
    with pytest.raises(FsxError) as excinfo:
        create(s3, {**linked(AutoImportPolicy="NEW"), "ClientRequestToken": "CRT1234"})
    assert_error(excinfo, "IncompatibleParameterError", "CRT1234", "CreateFileSystem")
    assert [r["FileSystemId"] for r in records.list_records()] == [first["FileSystemId"]]


def test_different_tokens_create_different_file_systems(s3: Any) -> None:
    a = create(s3, {**linked(), "ClientRequestToken": "a"})
    b = create(s3, {**linked(), "ClientRequestToken": "b"})
    assert a["FileSystemId"] != b["FileSystemId"]
    assert len(records.list_records()) == 2


# -------------------------------------------------------------------------------------------- describe


def make_three(s3: Any) -> list[str]:
    return [create(s3, linked())["FileSystemId"] for _ in range(3)]


def test_describe_lists_all_without_private_fields(s3: Any) -> None:
    ids = make_three(s3)
    result = control.describe_file_systems()
    assert "NextToken" not in result
    assert [fs["FileSystemId"] for fs in result["FileSystems"]] == ids
    assert all(not k.startswith("_") for fs in result["FileSystems"] for k in fs)


def test_describe_selected_ids(s3: Any) -> None:
    ids = make_three(s3)
    result = control.describe_file_systems([ids[2], ids[0]])
    assert [fs["FileSystemId"] for fs in result["FileSystems"]] == [ids[2], ids[0]]


def test_describe_unknown_id(s3: Any) -> None:
    with pytest.raises(FsxError) as excinfo:
        control.describe_file_systems(["fs-00000000000000000"])
    assert_error(excinfo, "FileSystemNotFound", control.NOT_FOUND_MESSAGE, "DescribeFileSystems")


def test_describe_paginates_one_at_a_time(s3: Any) -> None:
    ids = make_three(s3)
    seen, token, pages = [], None, 0
    while True:
        page = control.describe_file_systems(None, 1, token)
        pages += 1
        assert len(page["FileSystems"]) == 1
        seen += [fs["FileSystemId"] for fs in page["FileSystems"]]
        token = page.get("NextToken")
        if token is None:
            break
        base64.b64decode(token, validate=True)
    assert pages == 3
    assert seen == ids


def test_describe_paginates_selected_ids(s3: Any) -> None:
    ids = make_three(s3)
    first = control.describe_file_systems(ids, 2)
    assert [fs["FileSystemId"] for fs in first["FileSystems"]] == ids[:2]
    last = control.describe_file_systems(ids, 2, first["NextToken"])
    assert [fs["FileSystemId"] for fs in last["FileSystems"]] == ids[2:]
    assert "NextToken" not in last


@pytest.mark.parametrize("token", ["not base64!", base64.b64encode(b"garbage").decode(), "e30="])
def test_describe_invalid_token(s3: Any, token: str) -> None:
    make_three(s3)
    with pytest.raises(FsxError) as excinfo:
        control.describe_file_systems(None, 1, token)
    assert_error(excinfo, "BadRequest", "NextToken", "DescribeFileSystems")


@pytest.mark.parametrize("max_results", [0, -1])
def test_describe_invalid_max_results(s3: Any, max_results: int) -> None:
    with pytest.raises(FsxError) as excinfo:
        control.describe_file_systems(None, max_results)
    assert_error(excinfo, "BadRequest", "MaxResults", "DescribeFileSystems")


def fake_mount(fs_id: str, pid: int, mountpoint: str = "/mnt/fsx") -> None:
    """Write the mount.json a live daemon would leave."""
    (records.fs_dir(fs_id) / "mount.json").write_text(json.dumps({"pid": pid, "mountpoint": mountpoint}))


def test_describe_a_mounted_file_system_shows_the_record(s3: Any, fake_daemon: Any) -> None:
    fs = create(s3, linked())
    fake_daemon(fs["FileSystemId"], "/mnt/fsx")
    assert records.mount_state(fs["FileSystemId"]) is not None
    assert control.describe_file_systems([fs["FileSystemId"]])["FileSystems"] == [fs]


# ---------------------------------------------------------------------------------------------- update


def test_update_policy_and_maintenance_window(s3: Any) -> None:
    fs_id = create(s3, linked())["FileSystemId"]
    fs = control.update_file_system(
        fs_id, {"AutoImportPolicy": "NEW_CHANGED_DELETED", "WeeklyMaintenanceStartTime": "7:23:59"}
    )["FileSystem"]
    assert fs["LustreConfiguration"]["DataRepositoryConfiguration"]["AutoImportPolicy"] == "NEW_CHANGED_DELETED"
    assert fs["LustreConfiguration"]["WeeklyMaintenanceStartTime"] == "7:23:59"
    assert not [k for k in fs if k.startswith("_")]
    stored = records.load_record(fs_id)
    assert stored["LustreConfiguration"]["DataRepositoryConfiguration"]["AutoImportPolicy"] == "NEW_CHANGED_DELETED"
    assert stored["LustreConfiguration"]["WeeklyMaintenanceStartTime"] == "7:23:59"
    assert stored["_RequestFingerprint"]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"ImportPath": f"s3://{BUCKET}/other"}, "ImportPath cannot be changed"),
        ({"ExportPath": f"s3://{BUCKET}/other"}, "ExportPath cannot be changed"),
        ({"ImportedFileChunkSize": 10}, "ImportedFileChunkSize cannot be changed"),
        ({"DeploymentType": "SCRATCH_2"}, "DeploymentType cannot be changed"),
        ({"AutoImportPolicy": "ALWAYS"}, "Invalid AutoImportPolicy"),
        ({"AutoImportPolicy": "NEW", "WeeklyMaintenanceStartTime": "9:00:00"}, "WeeklyMaintenanceStartTime"),
        ({"WeeklyMaintenanceStartTime": "1:00:00", "AutoImportPolicy": "ALWAYS"}, "Invalid AutoImportPolicy"),
        ({"StorageType": "HDD"}, "Unsupported parameter in LustreConfiguration: StorageType"),
        ({}, "Specify at least one of"),
    ],
)
def test_update_errors_leave_the_record_unchanged(s3: Any, change: dict[str, Any], fragment: str) -> None:
    fs_id = create(s3, linked())["FileSystemId"]
    before = records.load_record(fs_id)
    with pytest.raises(FsxError) as excinfo:
        control.update_file_system(fs_id, change)
    assert_error(excinfo, "BadRequest", fragment, "UpdateFileSystem")
    assert records.load_record(fs_id) == before


def test_update_policy_without_repository(s3: Any) -> None:
    fs_id = create(s3, request())["FileSystemId"]
    with pytest.raises(FsxError) as excinfo:
        control.update_file_system(fs_id, {"AutoImportPolicy": "NEW"})
    assert_error(excinfo, "BadRequest", "ImportPath", "UpdateFileSystem")


def test_update_unknown_file_system(s3: Any) -> None:
    with pytest.raises(FsxError) as excinfo:
        control.update_file_system("fs-00000000000000000", {"AutoImportPolicy": "NEW"})
    assert_error(excinfo, "FileSystemNotFound", "fs-00000000000000000", "UpdateFileSystem")


# ---------------------------------------------------------------------------------------------- delete


def test_delete_removes_record_and_local_dir_but_not_s3_data(s3: Any) -> None:
    fs_id = create(s3, linked(ExportPath=f"s3://{BUCKET}/data"))["FileSystemId"]
    local = records.fs_dir(fs_id)
    (local / "state.db").write_bytes(b"db")
    (local / "cache").mkdir()
    (local / "cache" / "blob").write_bytes(b"cached")
    assert control.delete_file_system(fs_id) == {"FileSystemId": fs_id, "Lifecycle": "DELETING"}
    assert not local.exists()
    assert records.list_records() == []
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert keys == ["data/a.txt", "data/sub/b.txt"]
    with pytest.raises(FsxError) as excinfo:
        control.describe_file_systems([fs_id])
    assert excinfo.value.code == "FileSystemNotFound"


def test_delete_refuses_while_mounted(s3: Any, fake_daemon: Any) -> None:
    fs_id = create(s3, linked())["FileSystemId"]
    fake_daemon(fs_id, "/mnt/x")
    with pytest.raises(FsxError) as excinfo:
        control.delete_file_system(fs_id)
    message = f"File system {fs_id} is mounted at /mnt/x; unmount it first."
    assert_error(excinfo, "BadRequest", message, "DeleteFileSystem")
    assert records.load_record(fs_id)["FileSystemId"] == fs_id
    assert (records.home_dir() / fs_id / "mount.json").exists()


def test_delete_ignores_a_stale_mount(s3: Any) -> None:
    fs_id = create(s3, linked())["FileSystemId"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fake_mount(fs_id, dead.pid)
    assert control.delete_file_system(fs_id)["Lifecycle"] == "DELETING"
    assert not (records.home_dir() / fs_id).exists()


def test_delete_unknown_file_system(s3: Any) -> None:
    with pytest.raises(FsxError) as excinfo:
        control.delete_file_system("fs-00000000000000000")
    assert_error(excinfo, "FileSystemNotFound", "fs-00000000000000000", "DeleteFileSystem")


# ---------------------------------------------------------------------------------------------- AutoExportPolicy


def test_auto_export_policy_defaults_to_every_event(s3: Any) -> None:
    repo = create(s3, linked())["LustreConfiguration"]["DataRepositoryConfiguration"]
    assert repo["AutoExportPolicy"] == {"Events": ["NEW", "CHANGED", "DELETED"]}


def test_auto_export_policy_is_set_and_updated(s3: Any) -> None:
    def policy(fs: dict[str, Any]) -> Any:
        return fs["LustreConfiguration"]["DataRepositoryConfiguration"]["AutoExportPolicy"]

    fs = create(s3, linked(AutoExportPolicy={"Events": ["NEW", "CHANGED"]}))
    assert policy(fs) == {"Events": ["NEW", "CHANGED"]}
    updated = control.update_file_system(fs["FileSystemId"], {"AutoExportPolicy": "{Events=[DELETED]}"})
    assert policy(updated["FileSystem"]) == {"Events": ["DELETED"]}
    assert policy(control.describe_file_systems([fs["FileSystemId"]])["FileSystems"][0]) == {"Events": ["DELETED"]}


@pytest.mark.parametrize("bad", [{"Events": ["MOVED"]}, {"Events": ["NEW", "NEW"]}, {"Evts": []}, "NEW"])
def test_auto_export_policy_validation(s3: Any, bad: Any) -> None:
    with pytest.raises(FsxError) as excinfo:
        create(s3, linked(AutoExportPolicy=bad))
    assert_error(excinfo, "BadRequest", "AutoExportPolicy", "CreateFileSystem")
    assert records.list_records() == []
