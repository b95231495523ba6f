"""The control plane of data repository associations (lustrefs.client.associations and its CLI commands) against
moto's in-process S3: FSx's shapes (checked against botocore's model), validation and error names, idempotency,
paging and filters, and the lifecycle a command leaves (a daemon is posed by the fake_daemon fixture)."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import botocore.session
import botocore.validate
import pytest
from botocore.stub import Stubber
from helpers import in_process_moto

from lustrefs import records
from lustrefs.client import associations, cli, control
from lustrefs.errors import FsxError

BUCKET = "dra-bucket"
OTHER = "other-bucket"
MODEL = botocore.session.get_session().get_service_model("fsx")
ERROR_PREFIX = "\nAn error occurred ({code}) when calling the {op} operation: "


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An isolated LUSTREFS_HOME and a moto S3 holding BUCKET (with objects under ``data/``) and OTHER."""
    with in_process_moto(tmp_path, monkeypatch) as client:
        client.create_bucket(Bucket=BUCKET)
        client.create_bucket(Bucket=OTHER)
        for key in ("data/a.txt", "ref/b.txt"):
            client.put_object(Bucket=BUCKET, Key=key, Body=b"payload")
        yield client


def new_fs(s3: Any, **lustre: Any) -> str:
    """A file system made for associations: created without ImportPath."""
    request = {"FileSystemType": "LUSTRE", "StorageCapacity": 1200, "LustreConfiguration": lustre}
    return control.create_file_system(request, s3, None, "eu-west-1")["FileSystem"]["FileSystemId"]


def create(s3: Any, fs_id: str, path: str = "/ns1", repository: str = f"s3://{BUCKET}/data", **more: Any) -> dict:
    request = {"FileSystemId": fs_id, "FileSystemPath": path, "DataRepositoryPath": repository, **more}
    return associations.create_data_repository_association(request, lambda record: s3)["Association"]


def describe(*ids: str, **kwargs: Any) -> dict[str, Any]:
    return associations.describe_data_repository_associations(list(ids) or None, **kwargs)


def stored(fs_id: str) -> list[dict[str, Any]]:
    return records.load_record(fs_id)["_Associations"]


def fsx_error(code: str, fragment: str, operation: str) -> Any:
    """A context manager expecting FsxError ``code`` for ``operation`` whose message holds ``fragment``."""
    return pytest.raises(
        FsxError, match=re.escape(f"({code}) when calling the {operation} operation: ") + ".*" + re.escape(fragment)
    )


def assert_valid(value: dict[str, Any], shape_name: str) -> None:
    """``value`` has the botocore shape ``shape_name``: member names, types, lengths; enums checked too."""
    shape = MODEL.shape_for(shape_name)
    report = botocore.validate.ParamValidator().validate(value, shape)
    assert not report.has_errors(), report.generate_report()
    for association in value.get("Associations") or [value.get("Association") or {}]:
        for policy in association.get("S3", {}).values():
            assert set(policy["Events"]) <= set(MODEL.shape_for("EventType").enum)
        if "Lifecycle" in association:
            assert association["Lifecycle"] in MODEL.shape_for("DataRepositoryLifecycle").enum
        if "AssociationId" in association:
            assert re.fullmatch(
                MODEL.shape_for("DataRepositoryAssociationId").metadata["pattern"], association["AssociationId"]
            )


def output_members(operation: str) -> set[str]:
    return set(MODEL.operation_model(operation).output_shape.members)


# ---------------------------------------------------------------------------------------------- create


def test_create_returns_fsx_shape_and_stores_the_record(s3: Any) -> None:
    fs_id = new_fs(s3)
    request = {
        "FileSystemId": fs_id,
        "FileSystemPath": "/ns1/",
        "DataRepositoryPath": f"s3://{BUCKET}/data",
        "ClientRequestToken": "tok-1",
        "Tags": [{"Key": "Name", "Value": "ref"}],
    }
    response = associations.create_data_repository_association(request, lambda record: s3)
    assert set(response) == output_members("CreateDataRepositoryAssociation") == {"Association"}
    assert_valid(response, "CreateDataRepositoryAssociationResponse")
    association = response["Association"]
    dra_id = association["AssociationId"]
    assert re.fullmatch(r"dra-[0-9a-f]{17}", dra_id)
    assert association == {
        "AssociationId": dra_id,
        "ResourceARN": f"arn:aws:fsx:eu-west-1:123456789012:association/{fs_id}/{dra_id}",
        "FileSystemId": fs_id,
        "Lifecycle": "AVAILABLE",
        "FileSystemPath": "/ns1",
        "DataRepositoryPath": f"s3://{BUCKET}/data/",
        "BatchImportMetaDataOnCreate": False,
        "ImportedFileChunkSize": 1024,
        "S3": {"AutoImportPolicy": {"Events": []}, "AutoExportPolicy": {"Events": []}},
        "Tags": [{"Key": "Name", "Value": "ref"}],
        "CreationTime": association["CreationTime"],
    }
    assert isinstance(association["CreationTime"], float)
    assert set(association) <= set(MODEL.shape_for("DataRepositoryAssociation").members)
    [record] = stored(fs_id)
    assert record["_ClientRequestToken"] == "tok-1"
    assert re.fullmatch(r"[0-9a-f]{64}", record["_RequestFingerprint"])
    assert associations.public_view(record) == association
    assert json.dumps(describe(dra_id)["Associations"]) == json.dumps([association])  # the same order of members
    assert {k for k in record if k.startswith("_")} == {"_ClientRequestToken", "_RequestFingerprint"}


def test_create_with_every_option(s3: Any) -> None:
    fs_id = new_fs(s3)
    association = create(
        s3,
        fs_id,
        BatchImportMetaDataOnCreate=True,
        ImportedFileChunkSize=2048,
        S3={"AutoImportPolicy": {"Events": ["NEW", "CHANGED", "DELETED"]}, "AutoExportPolicy": "{Events=[NEW]}"},
    )
    assert association["BatchImportMetaDataOnCreate"] is True
    assert association["ImportedFileChunkSize"] == 2048
    assert association["S3"] == {
        "AutoImportPolicy": {"Events": ["NEW", "CHANGED", "DELETED"]},
        "AutoExportPolicy": {"Events": ["NEW"]},
    }
    assert "Tags" not in association  # the shape Tags has 1 to 50
    assert_valid({"Association": association}, "CreateDataRepositoryAssociationResponse")


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/ns1", "/ns1"), ("/ns1/", "/ns1"), ("//ns1//sub/", "/ns1/sub"), ("/", "/"), ("//", "/"), ("/a b/ü", "/a b/ü")],
)
def test_file_system_path_is_normalised(s3: Any, path: str, expected: str) -> None:
    assert create(s3, new_fs(s3), path)["FileSystemPath"] == expected


@pytest.mark.parametrize(
    ("repository", "expected"),
    [
        (f"s3://{BUCKET}", f"s3://{BUCKET}/"),
        (f"s3://{BUCKET}/", f"s3://{BUCKET}/"),
        (f"s3://{BUCKET}/data", f"s3://{BUCKET}/data/"),
        (f"s3://{BUCKET}/data/", f"s3://{BUCKET}/data/"),
        (f"s3://{BUCKET}/data/year=2020", f"s3://{BUCKET}/data/year=2020/"),
    ],
)
def test_data_repository_path_gets_its_trailing_slash(s3: Any, repository: str, expected: str) -> None:
    assert create(s3, new_fs(s3), "/ns1", repository)["DataRepositoryPath"] == expected


def test_create_file_system_without_import_path_is_ready_for_associations(s3: Any) -> None:
    fs_id = new_fs(s3, DeploymentType="PERSISTENT_2")
    create(s3, fs_id)
    [fs] = control.describe_file_systems([fs_id])["FileSystems"]
    assert "DataRepositoryConfiguration" not in fs["LustreConfiguration"]  # as FSx shows a DRA file system
    assert not [k for k in fs if k.startswith("_")]


BAD_CHARS = ["\x00", "\r", "\n", "\u0085", "\u2028", "\u2029"]

INVALID_CREATES = [
    # (request members replacing the valid ones, code, message fragment)
    ({"FileSystemPath": None}, "BadRequest", "FileSystemPath is required"),
    ({"FileSystemPath": "ns1"}, "BadRequest", "must start with '/'"),
    ({"FileSystemPath": ""}, "BadRequest", "1 to 4096 characters"),
    ({"FileSystemPath": "/" + "a/" * 2049}, "BadRequest", "1 to 4096 characters"),
    ({"FileSystemPath": 7}, "BadRequest", "1 to 4096 characters"),
    ({"FileSystemPath": "/a/../b"}, "BadRequest", "'.' or '..'"),
    ({"FileSystemPath": "/a/./b"}, "BadRequest", "'.' or '..'"),
    ({"FileSystemPath": "/.."}, "BadRequest", "'.' or '..'"),
    ({"FileSystemPath": "/" + "x" * 256}, "BadRequest", "at most 255 bytes"),
    *[({"FileSystemPath": f"/a{c}b"}, "BadRequest", "contain no NUL") for c in BAD_CHARS],
    ({"DataRepositoryPath": None}, "BadRequest", "DataRepositoryPath is required"),
    ({"DataRepositoryPath": "s3"}, "BadRequest", "3 to 4357"),
    ({"DataRepositoryPath": f"s3://{BUCKET}/" + "a" * 4357}, "BadRequest", "3 to 4357"),
    *[({"DataRepositoryPath": f"s3://{BUCKET}/a{c}b"}, "BadRequest", "contain no NUL") for c in BAD_CHARS],
    ({"DataRepositoryPath": f"http://{BUCKET}/data"}, "BadRequest", "is not s3://bucket[/prefix]"),
    ({"DataRepositoryPath": "s3://Bad_Bucket/data"}, "BadRequest", "valid bucket name"),
    ({"DataRepositoryPath": "s3:///data"}, "BadRequest", "valid bucket name"),
    ({"DataRepositoryPath": f"s3://{BUCKET}//data"}, "BadRequest", "empty, '.' or '..'"),
    ({"DataRepositoryPath": f"s3://{BUCKET}/a//b"}, "BadRequest", "empty, '.' or '..'"),
    ({"DataRepositoryPath": f"s3://{BUCKET}/a/../b"}, "BadRequest", "empty, '.' or '..'"),
    ({"DataRepositoryPath": f"s3://{BUCKET}/./b"}, "BadRequest", "empty, '.' or '..'"),
    ({"BatchImportMetaDataOnCreate": "true"}, "BadRequest", "BatchImportMetaDataOnCreate must be true or false"),
    *[({"ImportedFileChunkSize": v}, "BadRequest", "ImportedFileChunkSize") for v in (0, 512001, "1024", True, 1.5)],
    ({"S3": {"AutoImportPolicy": {"Events": ["MOVED"]}}}, "BadRequest", "Invalid AutoImportPolicy"),
    ({"S3": {"AutoExportPolicy": {"Events": ["NEW", "NEW"]}}}, "BadRequest", "Invalid AutoExportPolicy"),
    ({"S3": {"AutoImportPolicy": "NEW_CHANGED"}}, "BadRequest", "Invalid AutoImportPolicy"),
    ({"S3": {"Bogus": {"Events": []}}}, "BadRequest", "S3 must be a structure"),
    ({"S3": "AutoImportPolicy"}, "BadRequest", "S3 must be a structure"),
    ({"Tags": []}, "BadRequest", "Tags"),
    ({"Tags": [{"Key": "", "Value": "x"}]}, "BadRequest", "Tag keys"),
    ({"ClientRequestToken": "bad token!"}, "BadRequest", "ClientRequestToken"),
    ({"Bogus": 1}, "BadRequest", "Unknown parameter: Bogus"),
    ({"FileSystemId": "fs-1"}, "BadRequest", "Invalid FileSystemId"),
    ({"FileSystemId": "fs-00000000000000000"}, "FileSystemNotFound", "fs-00000000000000000"),
    ({"DataRepositoryPath": "s3://missing-bucket/data"}, "BadRequest", "bucket 'missing-bucket' does not exist"),
]


@pytest.mark.parametrize(("change", "code", "fragment"), INVALID_CREATES)
def test_create_validation_errors(s3: Any, change: dict[str, Any], code: str, fragment: str) -> None:
    fs_id = new_fs(s3)
    request = {"FileSystemId": fs_id, "FileSystemPath": "/ns1", "DataRepositoryPath": f"s3://{BUCKET}/data"}
    request = {k: v for k, v in {**request, **change}.items() if v is not None}
    with fsx_error(code, fragment, "CreateDataRepositoryAssociation"):
        associations.create_data_repository_association(request, lambda record: s3)
    assert "_Associations" not in records.load_record(fs_id)


@pytest.mark.parametrize(("operation", "code"), [("head_bucket", "403"), ("list_objects_v2", "AccessDenied")])
def test_create_unreadable_bucket_is_bad_request(s3: Any, operation: str, code: str) -> None:
    fs_id = new_fs(s3)
    stubber = Stubber(s3)
    if operation == "list_objects_v2":
        stubber.add_response("head_bucket", {}, {"Bucket": BUCKET})
    stubber.add_client_error(operation, service_error_code=code, http_status_code=403)
    with stubber, fsx_error("BadRequest", control.S3_ACCESS_MESSAGE, "CreateDataRepositoryAssociation"):
        create(s3, fs_id)
    assert "_Associations" not in records.load_record(fs_id)


def test_create_checks_the_association_prefix(s3: Any) -> None:
    fs_id = new_fs(s3)
    stubber = Stubber(s3)
    stubber.add_response("head_bucket", {}, {"Bucket": BUCKET})
    stubber.add_response("list_objects_v2", {}, {"Bucket": BUCKET, "Prefix": "ref/", "MaxKeys": 1})
    with stubber:
        create(s3, fs_id, "/ref", f"s3://{BUCKET}/ref")
    stubber.assert_no_pending_responses()


def test_create_on_a_legacy_linked_file_system(s3: Any) -> None:
    request = {
        "FileSystemType": "LUSTRE",
        "StorageCapacity": 1200,
        "LustreConfiguration": {"ImportPath": f"s3://{BUCKET}/data"},
    }
    fs_id = control.create_file_system(request, s3, None, "us-east-1")["FileSystem"]["FileSystemId"]
    with fsx_error(
        "BadRequest", "not supported on a file system with an ImportPath", "CreateDataRepositoryAssociation"
    ):
        create(s3, fs_id, "/ref", f"s3://{BUCKET}/ref")
    assert "_Associations" not in records.load_record(fs_id)


def test_at_most_eight_associations_deleting_ones_included(s3: Any) -> None:
    fs_id = new_fs(s3)
    made = [create(s3, fs_id, f"/ns{i}", f"s3://{BUCKET}/p{i}") for i in range(8)]
    associations.delete_data_repository_association({"AssociationId": made[0]["AssociationId"]})
    with fsx_error("ServiceLimitExceeded", "8 data repository associations", "CreateDataRepositoryAssociation"):
        create(s3, fs_id, "/ns8", f"s3://{BUCKET}/p8")
    assert len(stored(fs_id)) == 8
    create(s3, new_fs(s3), "/ns8", f"s3://{BUCKET}/p8")  # the limit is per file system


@pytest.mark.parametrize(
    ("first", "second"),
    [("/ns1", "/ns1"), ("/ns1", "/ns1/ns2"), ("/ns1/ns2", "/ns1"), ("/a/b/c", "/a/b/c/d/e"), ("/ns1/", "//ns1")],
)
def test_overlapping_file_system_paths(s3: Any, first: str, second: str) -> None:
    fs_id = new_fs(s3)
    dra_id = create(s3, fs_id, first, f"s3://{BUCKET}/one")["AssociationId"]
    with fsx_error(
        "BadRequest",
        f"overlaps the file system path {first.rstrip('/')} of data repository association {dra_id} (AVAILABLE)",
        "CreateDataRepositoryAssociation",
    ):
        create(s3, fs_id, second, f"s3://{BUCKET}/two")
    assert len(stored(fs_id)) == 1


def test_paths_overlap_only_at_component_boundaries(s3: Any) -> None:
    fs_id = new_fs(s3)
    create(s3, fs_id, "/ns1", f"s3://{BUCKET}/p")
    create(s3, fs_id, "/ns10", f"s3://{BUCKET}/p0")
    create(s3, fs_id, "/ns", f"s3://{BUCKET}/p1/x")
    assert [a["FileSystemPath"] for a in stored(fs_id)] == ["/ns1", "/ns10", "/ns"]


def test_a_deleting_association_still_holds_its_paths(s3: Any) -> None:
    fs_id = new_fs(s3)
    dra_id = create(s3, fs_id)["AssociationId"]
    associations.delete_data_repository_association({"AssociationId": dra_id})
    with fsx_error("BadRequest", f"{dra_id} (DELETING)", "CreateDataRepositoryAssociation"):
        create(s3, fs_id, "/ns1", f"s3://{BUCKET}/other")
    with fsx_error("BadRequest", f"{dra_id} (DELETING)", "CreateDataRepositoryAssociation"):
        create(s3, fs_id, "/other", f"s3://{BUCKET}/data/")


@pytest.mark.parametrize(("first", "second"), [("/", "/ns1"), ("/ns1", "/"), ("/", "/")])
def test_root_only_as_the_sole_association(s3: Any, first: str, second: str) -> None:
    fs_id = new_fs(s3)
    create(s3, fs_id, first, f"s3://{BUCKET}/one")
    with fsx_error(
        "BadRequest", 'The file system path "/" can only be used by the first', "CreateDataRepositoryAssociation"
    ):
        create(s3, fs_id, second, f"s3://{BUCKET}/two")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (f"s3://{BUCKET}/data", f"s3://{BUCKET}/data/"),
        (f"s3://{BUCKET}/data", f"s3://{BUCKET}/data/sub"),
        (f"s3://{BUCKET}/data/sub", f"s3://{BUCKET}/data"),
        (f"s3://{BUCKET}", f"s3://{BUCKET}/anything"),
        (f"s3://{BUCKET}/anything", f"s3://{BUCKET}/"),
    ],
)
def test_overlapping_data_repository_paths(s3: Any, first: str, second: str) -> None:
    fs_id = new_fs(s3)
    create(s3, fs_id, "/one", first)
    with fsx_error("BadRequest", "overlaps the data repository path", "CreateDataRepositoryAssociation"):
        create(s3, fs_id, "/two", second)


def test_data_repository_paths_that_do_not_overlap(s3: Any) -> None:
    fs_id = new_fs(s3)
    create(s3, fs_id, "/a", f"s3://{BUCKET}/data")
    create(s3, fs_id, "/b", f"s3://{BUCKET}/data2")  # not below data/
    create(s3, fs_id, "/c", f"s3://{OTHER}/data")  # another bucket
    create(s3, new_fs(s3), "/a", f"s3://{BUCKET}/data")  # another file system
    assert len(stored(fs_id)) == 3


# ----------------------------------------------------------------------------------------- idempotency


def test_same_token_and_parameters_return_the_same_association(s3: Any) -> None:
    fs_id = new_fs(s3)
    first = create(s3, fs_id, "/ns1", f"s3://{BUCKET}/data", ClientRequestToken="CRT1")
    again = create(s3, fs_id, "/ns1/", f"s3://{BUCKET}/data/", ClientRequestToken="CRT1")  # the same, normalised
    assert again == first
    assert len(stored(fs_id)) == 1


def test_same_token_returns_the_association_as_it_is_now(s3: Any) -> None:
    fs_id = new_fs(s3)
    first = create(s3, fs_id, ClientRequestToken="CRT1")
    associations.update_data_repository_association(
        {"AssociationId": first["AssociationId"], "ImportedFileChunkSize": 8}
    )
    assert create(s3, fs_id, ClientRequestToken="CRT1")["ImportedFileChunkSize"] == 8


@pytest.mark.parametrize(
    "change",
    [{"FileSystemPath": "/ns2"}, {"ImportedFileChunkSize": 10}, {"S3": {"AutoImportPolicy": {"Events": ["NEW"]}}}],
)
def test_same_token_with_different_parameters_is_incompatible(s3: Any, change: dict[str, Any]) -> None:
    fs_id = new_fs(s3)
    dra_id = create(s3, fs_id, ClientRequestToken="CRT1")["AssociationId"]
    request = {
        "FileSystemId": fs_id,
        "FileSystemPath": "/ns1",
        "DataRepositoryPath": f"s3://{BUCKET}/data",
        "ClientRequestToken": "CRT1",
        **change,
    }
    with fsx_error(
        "IncompatibleParameterError",
        f"'CRT1' was already used with different parameters (data repository association {dra_id})",
        "CreateDataRepositoryAssociation",
    ):
        associations.create_data_repository_association(request, lambda record: s3)
    assert len(stored(fs_id)) == 1


def test_token_reused_on_another_file_system_is_incompatible(s3: Any) -> None:
    create(s3, new_fs(s3), ClientRequestToken="CRT1")
    other = new_fs(s3)
    with fsx_error("IncompatibleParameterError", "CRT1", "CreateDataRepositoryAssociation"):
        create(s3, other, ClientRequestToken="CRT1")
    assert "_Associations" not in records.load_record(other)


# ---------------------------------------------------------------------------------------------- lifecycle


def test_create_while_mounted_is_creating_and_leaves_the_bucket_to_the_daemon(s3: Any, fake_daemon: Any) -> None:
    fs_id = new_fs(s3)
    fake_daemon(fs_id, "/mnt/fsx")

    def no_client(record: dict[str, Any]) -> Any:
        raise AssertionError("the CLI checked the bucket of a mounted file system")

    request = {"FileSystemId": fs_id, "FileSystemPath": "/ns1", "DataRepositoryPath": "s3://not-checked/x"}
    association = associations.create_data_repository_association(request, no_client)["Association"]
    assert association["Lifecycle"] == "CREATING"
    assert stored(fs_id)[0]["Lifecycle"] == "CREATING"


def test_update_while_mounted_is_updating(s3: Any, fake_daemon: Any) -> None:
    fs_id = new_fs(s3)
    dra_id = create(s3, fs_id)["AssociationId"]
    fake_daemon(fs_id, "/mnt/fsx")
    updated = associations.update_data_repository_association({"AssociationId": dra_id, "ImportedFileChunkSize": 4})
    assert updated["Association"]["Lifecycle"] == "UPDATING"
    assert stored(fs_id)[0]["Lifecycle"] == "UPDATING"


def set_lifecycle(fs_id: str, lifecycle: str, message: str | None = None) -> None:
    """Change the stored lifecycle as the daemon would."""
    record = records.load_record(fs_id)
    record["_Associations"][0]["Lifecycle"] = lifecycle
    if message is not None:
        record["_Associations"][0]["FailureDetails"] = {"Message": message}
    records.save_record(record)


def test_update_of_a_misconfigured_association(s3: Any, fake_daemon: Any) -> None:
    fs_id = new_fs(s3)
    dra_id = create(s3, fs_id)["AssociationId"]
    set_lifecycle(fs_id, "MISCONFIGURED", "S3 bucket cannot be read")
    [described] = describe(dra_id)["Associations"]
    assert described["FailureDetails"] == {"Message": "S3 bucket cannot be read"}
    assert_valid({"Associations": [described]}, "DescribeDataRepositoryAssociationsResponse")
    request = {"AssociationId": dra_id, "S3": {"AutoImportPolicy": {"Events": ["NEW"]}}}
    unmounted = associations.update_data_repository_association(request)["Association"]
    assert unmounted["Lifecycle"] == "MISCONFIGURED"  # no daemon to check it again: as it was
    assert unmounted["FailureDetails"] == {"Message": "S3 bucket cannot be read"}
    fake_daemon(fs_id, "/mnt/fsx")
    mounted = associations.update_data_repository_association(request)["Association"]
    assert mounted["Lifecycle"] == "UPDATING"
    assert "FailureDetails" not in mounted
    assert "FailureDetails" not in stored(fs_id)[0]


# ---------------------------------------------------------------------------------------------- describe


def test_describe_lists_every_file_systems_associations_oldest_first(s3: Any) -> None:
    fs_a, fs_b = new_fs(s3), new_fs(s3)
    ids = [
        create(s3, fs_a, "/a1", f"s3://{BUCKET}/a1")["AssociationId"],
        create(s3, fs_b, "/b1", f"s3://{BUCKET}/b1")["AssociationId"],
        create(s3, fs_a, "/a2", f"s3://{BUCKET}/a2")["AssociationId"],
    ]
    result = describe()
    assert set(result) == {"Associations"} and set(result) <= output_members("DescribeDataRepositoryAssociations")
    assert_valid(result, "DescribeDataRepositoryAssociationsResponse")
    assert [a["AssociationId"] for a in result["Associations"]] == ids
    assert not [k for a in result["Associations"] for k in a if k.startswith("_")]
    assert [a["AssociationId"] for a in describe(ids[2], ids[0])["Associations"]] == [ids[2], ids[0]]
    by_fs = describe(filters=[{"Name": "file-system-id", "Values": [fs_a]}])
    assert [a["AssociationId"] for a in by_fs["Associations"]] == [ids[0], ids[2]]
    shorthand = describe(filters=[{"Name": "file-system-id", "Values": f"{fs_b},{fs_a}"}])
    assert len(shorthand["Associations"]) == 3
    narrowed = describe(
        filters=[{"Name": "file-system-id", "Values": [fs_a, fs_b]}, {"Name": "file-system-id", "Values": [fs_b]}]
    )
    assert [a["AssociationId"] for a in narrowed["Associations"]] == [ids[1]]
    both = describe(ids[0], ids[1], filters=[{"Name": "file-system-id", "Values": [fs_b]}])
    assert [a["AssociationId"] for a in both["Associations"]] == [ids[1]]


def test_describe_repository_type_and_cache_filters(s3: Any) -> None:
    fs_id = new_fs(s3)
    create(s3, fs_id)
    assert len(describe(filters=[{"Name": "data-repository-type", "Values": ["S3"]}])["Associations"]) == 1
    assert describe(filters=[{"Name": "data-repository-type", "Values": ["NFS"]}]) == {"Associations": []}
    assert describe(filters=[{"Name": "file-cache-id", "Values": ["fc-0123456789abcdef0"]}]) == {"Associations": []}


def test_describe_without_associations(s3: Any) -> None:
    assert describe() == {"Associations": []}
    new_fs(s3)
    assert describe() == {"Associations": []}


def test_describe_pages(s3: Any) -> None:
    fs_id = new_fs(s3)
    ids = [create(s3, fs_id, f"/ns{i}", f"s3://{BUCKET}/p{i}")["AssociationId"] for i in range(5)]
    seen, token, pages = [], None, 0
    while True:
        page = describe(max_results=2, next_token=token)
        assert_valid(page, "DescribeDataRepositoryAssociationsResponse")
        pages += 1
        seen += [a["AssociationId"] for a in page["Associations"]]
        token = page.get("NextToken")
        if token is None:
            break
    assert (pages, seen) == (3, ids)
    assert describe(max_results=25) == {"Associations": describe()["Associations"]}


def test_describe_page_size_without_max_results(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fs_id = new_fs(s3)
    for i in range(3):
        create(s3, fs_id, f"/ns{i}", f"s3://{BUCKET}/p{i}")
    monkeypatch.setattr(associations, "MAX_PAGE", 2)
    first = describe()
    assert len(first["Associations"]) == 2
    assert len(describe(next_token=first["NextToken"])["Associations"]) == 1


DESCRIBE_ERRORS = [
    # (kwargs, code, fragment)
    ({"association_ids": ["dra-0123456789abcdef0"]}, "DataRepositoryAssociationNotFound", "dra-0123456789abcdef0"),
    ({"association_ids": ["dra-1"]}, "BadRequest", "Invalid AssociationId"),
    ({"association_ids": ["fs-0123456789abcdef0"]}, "BadRequest", "Invalid AssociationId"),
    ({"association_ids": [f"dra-{i:017x}" for i in range(51)]}, "BadRequest", "At most 50 AssociationIds"),
    (
        {"filters": [{"Name": "backup-type", "Values": ["AUTOMATIC"]}]},
        "BadRequest",
        "Invalid filter name 'backup-type'",
    ),
    ({"filters": [{"Name": "task-lifecycle", "Values": ["PENDING"]}]}, "BadRequest", "Invalid filter name"),
    ({"filters": [{"Values": ["x"]}]}, "BadRequest", "Invalid filter name None"),
    ({"filters": [{"Name": "file-system-id", "Values": []}]}, "BadRequest", "needs 1 to 20 Values"),
    ({"filters": [{"Name": "file-system-id", "Values": ["fs-1"] * 21}]}, "BadRequest", "needs 1 to 20 Values"),
    ({"filters": [{"Name": "file-system-id", "Values": ["fs 1"]}]}, "BadRequest", "each value is 1 to 128"),
    ({"filters": [{"Name": "file-system-id", "Values": ["fs-1"]}]}, "BadRequest", "Invalid FileSystemId"),
    (
        {"filters": [{"Name": "file-system-id", "Values": ["fs-00000000000000000"]}]},
        "FileSystemNotFound",
        "fs-00000000000000000",
    ),
    ({"filters": [{"Name": "data-repository-type", "Values": ["FTP"]}]}, "InvalidDataRepositoryType", "FTP"),
    ({"filters": [{"Name": "file-cache-id", "Values": ["x"]}] * 11}, "BadRequest", "at most 10 filters"),
    ({"max_results": 0}, "BadRequest", "MaxResults must be an integer from 1 to 25"),
    ({"max_results": 26}, "BadRequest", "MaxResults must be an integer from 1 to 25"),
    ({"next_token": "not base64!"}, "BadRequest", "NextToken"),
    ({"next_token": "e30="}, "BadRequest", "NextToken"),
]


@pytest.mark.parametrize(("kwargs", "code", "fragment"), DESCRIBE_ERRORS)
def test_describe_errors(s3: Any, kwargs: dict[str, Any], code: str, fragment: str) -> None:
    create(s3, new_fs(s3))
    with fsx_error(code, fragment, "DescribeDataRepositoryAssociations"):
        associations.describe_data_repository_associations(**kwargs)


# ---------------------------------------------------------------------------------------------- update


def test_update_chunk_size_and_policies(s3: Any) -> None:
    fs_id = new_fs(s3)
    dra_id = create(s3, fs_id, S3={"AutoImportPolicy": {"Events": ["NEW"]}, "AutoExportPolicy": {"Events": ["NEW"]}})[
        "AssociationId"
    ]
    response = associations.update_data_repository_association(
        {"AssociationId": dra_id, "ImportedFileChunkSize": 512, "S3": {"AutoExportPolicy": "{Events=[NEW,CHANGED]}"}}
    )
    assert set(response) == output_members("UpdateDataRepositoryAssociation")
    assert_valid(response, "UpdateDataRepositoryAssociationResponse")
    association = response["Association"]
    assert association["Lifecycle"] == "AVAILABLE"
    assert association["ImportedFileChunkSize"] == 512
    assert association["S3"] == {  # a policy not given is kept
        "AutoImportPolicy": {"Events": ["NEW"]},
        "AutoExportPolicy": {"Events": ["NEW", "CHANGED"]},
    }
    assert describe(dra_id)["Associations"] == [association]
    cleared = associations.update_data_repository_association(
        {"AssociationId": dra_id, "S3": {"AutoImportPolicy": {"Events": []}}, "ClientRequestToken": "u1"}
    )
    assert cleared["Association"]["S3"]["AutoImportPolicy"] == {"Events": []}
    assert cleared["Association"]["ImportedFileChunkSize"] == 512


UPDATE_ERRORS = [
    # (request members besides AssociationId, code, fragment)
    ({}, "BadRequest", "Specify at least one of ImportedFileChunkSize, S3"),
    ({"ImportedFileChunkSize": 0}, "BadRequest", "ImportedFileChunkSize"),
    ({"ImportedFileChunkSize": "8"}, "BadRequest", "ImportedFileChunkSize"),
    ({"S3": {"AutoImportPolicy": {"Events": ["ALL"]}}}, "BadRequest", "Invalid AutoImportPolicy"),
    ({"S3": {"AutoImportPolicy": {"Events": ["NEW"]}, "Other": {}}}, "BadRequest", "S3 must be a structure"),
    ({"FileSystemPath": "/ns2"}, "BadRequest", "Unknown parameter: FileSystemPath"),
    ({"DataRepositoryPath": f"s3://{BUCKET}/x"}, "BadRequest", "Unknown parameter: DataRepositoryPath"),
    ({"ImportedFileChunkSize": 8, "ClientRequestToken": "bad token!"}, "BadRequest", "ClientRequestToken"),
]


@pytest.mark.parametrize(("change", "code", "fragment"), UPDATE_ERRORS)
def test_update_errors_leave_the_record_unchanged(s3: Any, change: dict[str, Any], code: str, fragment: str) -> None:
    fs_id = new_fs(s3)
    dra_id = create(s3, fs_id)["AssociationId"]
    before = records.load_record(fs_id)
    with fsx_error(code, fragment, "UpdateDataRepositoryAssociation"):
        associations.update_data_repository_association({"AssociationId": dra_id, **change})
    assert records.load_record(fs_id) == before


@pytest.mark.parametrize("lifecycle", ["CREATING", "UPDATING", "DELETING", "FAILED"])
def test_update_refused_unless_available_or_misconfigured(s3: Any, lifecycle: str) -> None:
    fs_id = new_fs(s3)
    dra_id = create(s3, fs_id)["AssociationId"]
    set_lifecycle(fs_id, lifecycle)
    with fsx_error(
        "BadRequest", f"is {lifecycle}; only an AVAILABLE or MISCONFIGURED", "UpdateDataRepositoryAssociation"
    ):
        associations.update_data_repository_association({"AssociationId": dra_id, "ImportedFileChunkSize": 8})


@pytest.mark.parametrize(
    ("dra_id", "code"), [("dra-0123456789abcdef0", "DataRepositoryAssociationNotFound"), ("dra-x", "BadRequest")]
)
def test_update_and_delete_unknown_or_malformed_ids(s3: Any, dra_id: str, code: str) -> None:
    create(s3, new_fs(s3))
    with fsx_error(code, dra_id, "UpdateDataRepositoryAssociation"):
        associations.update_data_repository_association({"AssociationId": dra_id, "ImportedFileChunkSize": 8})
    with fsx_error(code, dra_id, "DeleteDataRepositoryAssociation"):
        associations.delete_data_repository_association({"AssociationId": dra_id})


# ---------------------------------------------------------------------------------------------- delete


@pytest.mark.parametrize("delete_data", [None, False, True])
def test_delete_marks_deleting_for_the_daemon(s3: Any, delete_data: bool | None) -> None:
    fs_id = new_fs(s3)
    dra_id = create(s3, fs_id)["AssociationId"]
    request: dict[str, Any] = {"AssociationId": dra_id}
    if delete_data is not None:
        request["DeleteDataInFileSystem"] = delete_data
    response = associations.delete_data_repository_association(request)
    assert set(response) == output_members("DeleteDataRepositoryAssociation")
    assert_valid(response, "DeleteDataRepositoryAssociationResponse")
    assert response == {"AssociationId": dra_id, "Lifecycle": "DELETING", "DeleteDataInFileSystem": bool(delete_data)}
    [association] = stored(fs_id)
    assert association["Lifecycle"] == "DELETING"
    assert association["_DeleteDataInFileSystem"] is bool(delete_data)
    assert describe(dra_id)["Associations"][0]["Lifecycle"] == "DELETING"
    assert "_DeleteDataInFileSystem" not in describe(dra_id)["Associations"][0]


def test_delete_of_a_misconfigured_association_drops_its_failure(s3: Any) -> None:
    fs_id = new_fs(s3)
    dra_id = create(s3, fs_id)["AssociationId"]
    set_lifecycle(fs_id, "MISCONFIGURED", "no access")
    associations.delete_data_repository_association({"AssociationId": dra_id})
    assert "FailureDetails" not in stored(fs_id)[0]


def test_delete_of_a_deleting_association(s3: Any) -> None:
    fs_id = new_fs(s3)
    dra_id = create(s3, fs_id)["AssociationId"]
    first = associations.delete_data_repository_association(
        {"AssociationId": dra_id, "ClientRequestToken": "del-1", "DeleteDataInFileSystem": True}
    )
    retry = associations.delete_data_repository_association(
        {"AssociationId": dra_id, "ClientRequestToken": "del-1", "DeleteDataInFileSystem": True}
    )
    assert retry == first
    with fsx_error("BadRequest", f"{dra_id} is already being deleted", "DeleteDataRepositoryAssociation"):
        associations.delete_data_repository_association({"AssociationId": dra_id})
    with fsx_error("BadRequest", "already being deleted", "DeleteDataRepositoryAssociation"):
        associations.delete_data_repository_association({"AssociationId": dra_id, "ClientRequestToken": "del-2"})
    with fsx_error("IncompatibleParameterError", "'del-1' was already used", "DeleteDataRepositoryAssociation"):
        associations.delete_data_repository_association({"AssociationId": dra_id, "ClientRequestToken": "del-1"})
    assert stored(fs_id)[0]["_DeleteDataInFileSystem"] is True


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"DeleteDataInFileSystem": "yes"}, "DeleteDataInFileSystem must be true or false"),
        ({"ClientRequestToken": "bad token!"}, "ClientRequestToken"),
        ({"Force": True}, "Unknown parameter: Force"),
    ],
)
def test_delete_errors(s3: Any, change: dict[str, Any], fragment: str) -> None:
    fs_id = new_fs(s3)
    dra_id = create(s3, fs_id)["AssociationId"]
    with fsx_error("BadRequest", fragment, "DeleteDataRepositoryAssociation"):
        associations.delete_data_repository_association({"AssociationId": dra_id, **change})
    assert stored(fs_id)[0]["Lifecycle"] == "AVAILABLE"


def test_deleting_the_file_system_deletes_its_associations(s3: Any) -> None:
    fs_id, kept = new_fs(s3), new_fs(s3)
    gone = create(s3, fs_id)["AssociationId"]
    other = create(s3, kept)["AssociationId"]
    control.delete_file_system(fs_id)
    assert [a["AssociationId"] for a in describe()["Associations"]] == [other]
    with fsx_error("DataRepositoryAssociationNotFound", gone, "DescribeDataRepositoryAssociations"):
        describe(gone)
    with fsx_error("FileSystemNotFound", fs_id, "DescribeDataRepositoryAssociations"):
        describe(filters=[{"Name": "file-system-id", "Values": [fs_id]}])


# ---------------------------------------------------------------------------------------------- the CLI


class Run:
    def __init__(self, rc: int, out: str, err: str) -> None:
        self.rc, self.out, self.err = rc, out, err

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.out)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]):
    def invoke(*argv: str) -> Run:
        rc = cli.main(list(argv))
        captured = capsys.readouterr()
        return Run(rc, captured.out, captured.err)

    return invoke


def ok(result: Run) -> dict[str, Any]:
    assert result.rc == 0, result.err
    return result.json


def test_cli_create_describe_update_delete(s3: Any, run: Any) -> None:
    fs_id = new_fs(s3)
    created = ok(run(
        "create-data-repository-association",
        "--file-system-id", fs_id,
        "--file-system-path", "/ref/",
        "--data-repository-path", f"s3://{BUCKET}/ref",
        "--batch-import-meta-data-on-create",
        "--imported-file-chunk-size", "2048",
        "--s3", "AutoImportPolicy={Events=[NEW,CHANGED,DELETED]},AutoExportPolicy={Events=[NEW]}",
        "--client-request-token", "cli-1",
        "--tags", "Key=Name,Value=ref", "Key=Team,Value=bio",
    ))  # fmt: skip
    assert_valid(created, "CreateDataRepositoryAssociationResponse")
    association = created["Association"]
    dra_id = association["AssociationId"]
    assert (association["FileSystemPath"], association["DataRepositoryPath"]) == ("/ref", f"s3://{BUCKET}/ref/")
    assert association["BatchImportMetaDataOnCreate"] is True
    assert association["ImportedFileChunkSize"] == 2048
    assert association["S3"] == {
        "AutoImportPolicy": {"Events": ["NEW", "CHANGED", "DELETED"]},
        "AutoExportPolicy": {"Events": ["NEW"]},
    }
    assert association["Tags"] == [{"Key": "Name", "Value": "ref"}, {"Key": "Team", "Value": "bio"}]

    json_s3 = ok(run(
        "create-data-repository-association", "--file-system-id", fs_id, "--file-system-path", "/scratch",
        "--data-repository-path", f"s3://{OTHER}/run42/", "--no-batch-import-meta-data-on-create",
        "--s3", '{"AutoExportPolicy": {"Events": ["NEW", "CHANGED", "DELETED"]}}',
    ))["Association"]  # fmt: skip
    assert json_s3["BatchImportMetaDataOnCreate"] is False
    assert json_s3["S3"]["AutoImportPolicy"] == {"Events": []}

    described = ok(run("describe-data-repository-associations", "--filters", f"Name=file-system-id,Values={fs_id}"))
    assert [a["AssociationId"] for a in described["Associations"]] == [dra_id, json_s3["AssociationId"]]
    assert ok(run("describe-data-repository-associations", "--association-ids", dra_id))["Associations"] == [
        association
    ]
    page = ok(run("describe-data-repository-associations", "--max-results", "1"))
    assert [a["AssociationId"] for a in page["Associations"]] == [dra_id]
    last = ok(run("describe-data-repository-associations", "--max-results", "1", "--next-token", page["NextToken"]))
    assert [a["AssociationId"] for a in last["Associations"]] == [json_s3["AssociationId"]]
    assert "NextToken" not in last

    updated = ok(run(
        "update-data-repository-association", "--association-id", dra_id, "--imported-file-chunk-size", "16",
        "--s3", "AutoExportPolicy={Events=[NEW,CHANGED]}", "--client-request-token", "u-1",
    ))  # fmt: skip
    assert_valid(updated, "UpdateDataRepositoryAssociationResponse")
    assert updated["Association"]["ImportedFileChunkSize"] == 16
    assert updated["Association"]["S3"]["AutoExportPolicy"] == {"Events": ["NEW", "CHANGED"]}

    deleted = ok(run("delete-data-repository-association", "--association-id", dra_id, "--delete-data-in-file-system"))
    assert deleted == {"AssociationId": dra_id, "Lifecycle": "DELETING", "DeleteDataInFileSystem": True}
    kept = ok(run("delete-data-repository-association", "--association-id", json_s3["AssociationId"],
                  "--no-delete-data-in-file-system"))  # fmt: skip
    assert kept["DeleteDataInFileSystem"] is False
    assert [a["_DeleteDataInFileSystem"] for a in stored(fs_id)] == [True, False]


def test_cli_requests_have_the_models_member_names(s3: Any, run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, dict[str, Any]] = {}

    def record(operation: str) -> Any:
        def fake(request: Any, *rest: Any) -> dict[str, Any]:
            seen[operation] = request
            return {}

        return fake

    for name, operation in [
        ("create_data_repository_association", "CreateDataRepositoryAssociation"),
        ("update_data_repository_association", "UpdateDataRepositoryAssociation"),
        ("delete_data_repository_association", "DeleteDataRepositoryAssociation"),
    ]:
        monkeypatch.setattr(associations, name, record(operation))
    dra = "dra-0123456789abcdef0"
    common = ["--client-request-token", "t"]
    ok(run("create-data-repository-association", "--file-system-id", "fs-0123456789abcdef0", "--file-system-path",
           "/a", "--data-repository-path", "s3://b/p", "--batch-import-meta-data-on-create",
           "--imported-file-chunk-size", "1", "--s3", "AutoImportPolicy={Events=[NEW]}", "--tags", "Key=k,Value=v",
           *common))  # fmt: skip
    ok(run("update-data-repository-association", "--association-id", dra, "--imported-file-chunk-size", "1",
           "--s3", '{"AutoImportPolicy": {"Events": ["NEW"]}}', *common))  # fmt: skip
    ok(run("delete-data-repository-association", "--association-id", dra, "--delete-data-in-file-system", *common))
    for operation, request in seen.items():
        assert set(request) == set(MODEL.operation_model(operation).input_shape.members), operation
    assert seen["CreateDataRepositoryAssociation"]["S3"] == {"AutoImportPolicy": "{Events=[NEW]}"}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_checks_the_bucket_through_the_file_systems_endpoint(s3: Any, run: Any) -> None:
    request = {"FileSystemType": "LUSTRE", "StorageCapacity": 1200}
    fs_id = control.create_file_system(request, s3, f"http://127.0.0.1:{closed_port()}", "us-east-1")["FileSystem"][
        "FileSystemId"
    ]
    result = run("create-data-repository-association", "--file-system-id", fs_id, "--file-system-path", "/a",
                 "--data-repository-path", f"s3://{BUCKET}/data")  # fmt: skip
    assert result.rc == 254
    assert result.out == ""
    assert result.err.startswith(
        ERROR_PREFIX.format(code="BadRequest", op="CreateDataRepositoryAssociation") + control.S3_ACCESS_MESSAGE
    )
    assert "_Associations" not in records.load_record(fs_id)


@pytest.mark.parametrize(
    ("argv", "code", "op"),
    [
        (["describe-data-repository-associations", "--association-ids", "dra-0123456789abcdef0"],
         "DataRepositoryAssociationNotFound", "DescribeDataRepositoryAssociations"),
        (["describe-data-repository-associations", "--filters", "Name=volume-id,Values=fsvol-1"], "BadRequest",
         "DescribeDataRepositoryAssociations"),
        (["update-data-repository-association", "--association-id", "dra-0123456789abcdef0"], "BadRequest",
         "UpdateDataRepositoryAssociation"),
        (["delete-data-repository-association", "--association-id", "dra-0123456789abcdef0"],
         "DataRepositoryAssociationNotFound", "DeleteDataRepositoryAssociation"),
        (["create-data-repository-association", "--file-system-id", "fs-0123456789abcdef0",
          "--data-repository-path", "s3://b/p"], "BadRequest", "CreateDataRepositoryAssociation"),
    ],
)  # fmt: skip
def test_cli_service_errors_exit_254(s3: Any, run: Any, argv: list[str], code: str, op: str) -> None:
    result = run(*argv)
    assert result.rc == 254
    assert result.out == ""
    assert result.err.startswith(ERROR_PREFIX.format(code=code, op=op))


@pytest.mark.parametrize(
    "argv",
    [
        ["create-data-repository-association", "--file-system-id", "fs-0123456789abcdef0"],
        ["create-data-repository-association", "--data-repository-path", "s3://b/p"],
        ["create-data-repository-association", "--file-system-id", "fs-0123456789abcdef0",
         "--data-repository-path", "s3://b/p", "--imported-file-chunk-size", "x"],
        ["create-data-repository-association", "--file-system-id", "fs-0123456789abcdef0",
         "--data-repository-path", "s3://b/p", "--s3", "{not json"],
        ["describe-data-repository-associations", "--max-results", "x"],
        ["describe-data-repository-associations", "--filters", "[1]"],
        ["update-data-repository-association"],
        ["delete-data-repository-association", "--association-id", "dra-0123456789abcdef0",
         "--delete-data-in-file-system=yes"],
    ],
)  # fmt: skip
def test_cli_usage_errors_exit_252(s3: Any, run: Any, argv: list[str]) -> None:
    result = run(*argv)
    assert result.rc == 252
    assert "usage: lustrefs" in result.err


def test_cli_help_lists_the_commands(run: Any) -> None:
    listed = " ".join(run("--help").out.split())
    for name in ("create", "describe", "update", "delete"):
        command = f"{name}-data-repository-association" + ("s" if name == "describe" else "")
        assert f" {command} " in listed
        assert run(command, "--help").rc == 0
