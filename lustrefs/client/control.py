"""The control plane: CreateFileSystem, DescribeFileSystems, UpdateFileSystem and DeleteFileSystem.

Requests and responses use the shapes of the FSx API (``botocore/data/fsx/2018-03-01``); file systems are
kept as records (see :mod:`lustrefs.records`) that hold the public FSx description plus private fields
whose names start with ``_``. Every error is an :class:`~lustrefs.errors.FsxError` with FSx's error name.

On a host configured for the cluster engine the records are in the cluster's database, changes are serialised
across hosts by its advisory lock, and a deletion also drops the file system's namespace there.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import botocore.exceptions

from lustrefs import records
from lustrefs.errors import FsxError
from lustrefs.s3client import S3Url

CREATE = "CreateFileSystem"
DESCRIBE = "DescribeFileSystems"
UPDATE = "UpdateFileSystem"
DELETE = "DeleteFileSystem"

DEFAULT_OWNER_ID = "123456789012"
DEPLOYMENT_TYPES = ("SCRATCH_1", "SCRATCH_2", "PERSISTENT_1", "PERSISTENT_2")
AUTO_IMPORT_POLICIES = ("NONE", "NEW", "NEW_CHANGED", "NEW_CHANGED_DELETED")
DEFAULT_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 512000
WEEKLY_TIME = re.compile(r"^[1-7]:([01]\d|2[0-3]):?([0-5]\d)$")
CLIENT_REQUEST_TOKEN = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")
ARCHIVE_PATH_FORBIDDEN = re.compile("[\u0000\u0085\u2028\u2029\r\n]")
MAX_PAGE = 50

# Members of CreateFileSystemLustreConfiguration: the data repository ones are validated, the others are
# accepted and echoed in the description as given (they have no effect on a local file system).
REPOSITORY_MEMBERS = ("ImportPath", "ExportPath", "ImportedFileChunkSize", "AutoImportPolicy", "AutoExportPolicy")
EXPORT_EVENTS = ("NEW", "CHANGED", "DELETED")
ECHOED_LUSTRE_MEMBERS = (
    "PerUnitStorageThroughput",
    "DailyAutomaticBackupStartTime",
    "AutomaticBackupRetentionDays",
    "CopyTagsToBackups",
    "DriveCacheType",
    "DataCompressionType",
    "EfaEnabled",
    "LogConfiguration",
    "RootSquashConfiguration",
    "MetadataConfiguration",
    "ThroughputCapacity",
    "DataReadCacheConfiguration",
)
LUSTRE_MEMBERS = frozenset(
    ("WeeklyMaintenanceStartTime", "DeploymentType", *REPOSITORY_MEMBERS, *ECHOED_LUSTRE_MEMBERS)
)
IMMUTABLE_MEMBERS = ("ImportPath", "ExportPath", "ImportedFileChunkSize", "DeploymentType")
UPDATABLE_MEMBERS = ("AutoImportPolicy", "AutoExportPolicy", "WeeklyMaintenanceStartTime")

S3_ACCESS_MESSAGE = (
    "Amazon FSx is unable to validate access to the S3 bucket. Ensure the IAM role or user you are using "
    "has s3:Get*, s3:List* and s3:PutObject permissions to the S3 bucket prefix."
)
NOT_FOUND_MESSAGE = "No Amazon FSx file systems were found based upon supplied parameters."
S3_MISSING_CODES = frozenset(("404", "NoSuchBucket", "NotFound"))


def public_view(record: dict[str, Any]) -> dict[str, Any]:
    """The FSx description of a record: private (``_``-prefixed) fields removed, and while it is mounted the
    data repository's Lifecycle (AVAILABLE or MISCONFIGURED, with FailureDetails) as the daemon sees it."""
    view = {k: v for k, v in record.items() if not k.startswith("_")}
    repo = view.get("LustreConfiguration", {}).get("DataRepositoryConfiguration")
    fs_id = record["FileSystemId"]
    if repo is not None and records.mount_state(fs_id) is not None:
        try:
            state = json.loads((records.home_dir() / fs_id / "repository-state.json").read_text())
        except (OSError, ValueError):
            state = {}
        if "Lifecycle" in state:
            repo = view["LustreConfiguration"]["DataRepositoryConfiguration"] = {
                **repo,
                "Lifecycle": state["Lifecycle"],
            }
            if "FailureDetails" in state:
                repo["FailureDetails"] = state["FailureDetails"]
    return view


# ---------------------------------------------------------------------------------------------- create


def create_file_system(request: dict[str, Any], s3: Any, endpoint_url: str | None, region: str) -> dict:
    """CreateFileSystem: validate ``request`` (FSx request shape), store the record; ``{"FileSystem"}``.

    ``s3`` is a boto3 S3 client used to check that the import bucket exists and is readable; it is only
    used when an ImportPath is given. Nothing is written unless every check passes. A ``ClientRequestToken``
    already used with the same parameters returns the existing file system.
    """
    token = check_client_request_token(request.get("ClientRequestToken"), CREATE)
    fingerprint = request_fingerprint(request)
    with control_lock(CREATE):
        if token is not None:
            existing = _record_for_token(token, fingerprint)
            if existing is not None:
                return {"FileSystem": public_view(existing)}
        settings = _validate_create(request)
        if settings.get("ImportPath") is not None:
            check_bucket_access(s3, settings["ImportPath"])
        record = _new_record(request, settings, endpoint_url, region)
        record["_ClientRequestToken"] = token
        record["_RequestFingerprint"] = fingerprint
        records.save_record(record, CREATE)
    return {"FileSystem": public_view(record)}


def check_client_request_token(token: Any, operation: str) -> str | None:
    """``token`` (None if not given) if it is a well-formed ClientRequestToken; else BadRequest."""
    if token is not None and (not isinstance(token, str) or not CLIENT_REQUEST_TOKEN.match(token)):
        raise FsxError("BadRequest", "ClientRequestToken must match [A-Za-z0-9_.-]{1,63}.", operation)
    return token


def request_fingerprint(request: dict[str, Any]) -> str:
    """A canonical hash of the create parameters (everything but the token), for idempotency."""
    params = {k: v for k, v in request.items() if k != "ClientRequestToken" and v is not None}
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _record_for_token(token: str, fingerprint: str) -> dict[str, Any] | None:
    """The record created with ``token`` if its parameters match; IncompatibleParameterError otherwise."""
    for record in records.list_records(CREATE):
        if record.get("_ClientRequestToken") != token:
            continue
        if record.get("_RequestFingerprint") != fingerprint:
            raise FsxError(
                "IncompatibleParameterError",
                f"The client request token '{token}' was already used with different parameters "
                f"(file system {record['FileSystemId']}).",
                CREATE,
            )
        return record
    return None


def _validate_create(request: dict[str, Any]) -> dict[str, Any]:
    """Check a CreateFileSystem request; returns the effective LustreConfiguration (defaults not applied)."""
    if request.get("FileSystemType") != "LUSTRE":
        message = f"FileSystemType {request.get('FileSystemType')!r} is not supported; use LUSTRE."
        raise FsxError("BadRequest", message, CREATE)
    capacity = request.get("StorageCapacity")
    if not is_int(capacity) or capacity <= 0:
        raise FsxError("BadRequest", "StorageCapacity must be a positive integer (GiB).", CREATE)
    validate_tags(request.get("Tags"), CREATE)
    conf = request.get("LustreConfiguration") or {}
    if not isinstance(conf, dict):
        raise FsxError("BadRequest", "LustreConfiguration must be a structure.", CREATE)
    unknown = sorted(set(conf) - LUSTRE_MEMBERS)
    if unknown:
        raise FsxError("BadRequest", f"Unknown parameter in LustreConfiguration: {unknown[0]}.", CREATE)
    deployment = conf.get("DeploymentType", "SCRATCH_1")
    if deployment not in DEPLOYMENT_TYPES:
        raise FsxError(
            "BadRequest",
            f"Invalid DeploymentType {deployment!r}; valid values: {', '.join(DEPLOYMENT_TYPES)}.",
            CREATE,
        )
    if "WeeklyMaintenanceStartTime" in conf:
        _validate_weekly_time(conf["WeeklyMaintenanceStartTime"], CREATE)
    import_path = conf.get("ImportPath")
    if import_path is None:
        for member in ("ExportPath", "ImportedFileChunkSize", "AutoImportPolicy", "AutoExportPolicy"):
            if conf.get(member) is not None:
                raise FsxError("BadRequest", f"{member} can only be specified with ImportPath.", CREATE)
        return conf
    if deployment == "PERSISTENT_2":
        raise FsxError(
            "BadRequest",
            "ImportPath, ExportPath, ImportedFileChunkSize and AutoImportPolicy are not supported with the "
            "PERSISTENT_2 deployment type; use a data repository association.",
            CREATE,
        )
    import_url = _archive_path(import_path, "ImportPath", "InvalidImportPath", "import")
    export_path = conf.get("ExportPath")
    if export_path is not None:
        export_url = _archive_path(export_path, "ExportPath", "InvalidExportPath", "export")
        if export_url.bucket != import_url.bucket:
            raise FsxError(
                "InvalidExportPath",
                f"The path provided for data repository export isn't valid: the export bucket "
                f"'{export_url.bucket}' must be the same as the import bucket '{import_url.bucket}'.",
                CREATE,
            )
    validate_chunk_size(conf.get("ImportedFileChunkSize", DEFAULT_CHUNK_SIZE), CREATE)
    _validate_policy(conf.get("AutoImportPolicy", "NONE"), CREATE)
    if "AutoExportPolicy" in conf:
        conf["AutoExportPolicy"] = validate_events_policy(conf["AutoExportPolicy"], "AutoExportPolicy", CREATE)
    return conf


def validate_tags(tags: Any, operation: str) -> None:
    """Check a ``Tags`` list (shape ``Tags``): 1 to 50 ``{Key, Value}``; BadRequest otherwise."""
    if tags is None:
        return
    if not isinstance(tags, list) or not 1 <= len(tags) <= 50:
        raise FsxError("BadRequest", "Tags must be a list of 1 to 50 {Key, Value} structures.", operation)
    for tag in tags:
        if not isinstance(tag, dict) or set(tag) - {"Key", "Value"}:
            raise FsxError("BadRequest", "Each tag must be a structure with Key and Value.", operation)
        key, value = tag.get("Key"), tag.get("Value", "")
        if not isinstance(key, str) or not 1 <= len(key) <= 128:
            raise FsxError("BadRequest", "Tag keys must be 1 to 128 characters long.", operation)
        if not isinstance(value, str) or len(value) > 256:
            raise FsxError("BadRequest", "Tag values must be at most 256 characters long.", operation)


def validate_chunk_size(value: Any, operation: str) -> int:
    """``value`` if it is a valid ImportedFileChunkSize (shape ``Megabytes``: 1 to 512000); else BadRequest."""
    if not is_int(value) or not 1 <= value <= MAX_CHUNK_SIZE:
        message = f"ImportedFileChunkSize must be an integer from 1 to {MAX_CHUNK_SIZE} (MiB)."
        raise FsxError("BadRequest", message, operation)
    return value


def check_archive_path(path: Any, member: str, operation: str) -> str:
    """``path`` if it has the shape ``ArchivePath`` (3 to 4357 characters, none forbidden); else BadRequest."""
    if not isinstance(path, str) or not 3 <= len(path) <= 4357 or ARCHIVE_PATH_FORBIDDEN.search(path):
        raise FsxError(
            "BadRequest",
            f"{member} must be 3 to 4357 characters long and contain no NUL, CR, LF, U+0085, U+2028 or U+2029.",
            operation,
        )
    return path


def _archive_path(path: Any, member: str, invalid_code: str, direction: str) -> S3Url:
    """Check an ImportPath/ExportPath (shape ``ArchivePath``) and parse it."""
    check_archive_path(path, member, CREATE)
    url = S3Url.parse(path)
    if url is None:
        raise FsxError(
            invalid_code,
            f"The path provided for data repository {direction} isn't valid: {path!r} is not s3://bucket[/prefix].",
            CREATE,
        )
    return url


def check_bucket_access(
    s3: Any, import_path: str, operation: str = CREATE, missing_code: str = "InvalidImportPath"
) -> None:
    """Check that the import bucket exists and its prefix can be listed (HeadBucket + ListObjectsV2).

    A missing bucket is ``missing_code``; a bucket that cannot be read is BadRequest with FSx's S3 access message.
    """
    url = S3Url.parse(import_path)
    assert url is not None  # validated by the caller
    try:
        s3.head_bucket(Bucket=url.bucket)
        s3.list_objects_v2(Bucket=url.bucket, Prefix=url.prefix, MaxKeys=1)
    except botocore.exceptions.ClientError as e:
        if e.response.get("Error", {}).get("Code") in S3_MISSING_CODES:
            raise FsxError(
                missing_code,
                f"The path provided for data repository import isn't valid: bucket '{url.bucket}' does not exist.",
                operation,
            ) from None
        raise FsxError("BadRequest", S3_ACCESS_MESSAGE, operation) from None
    except botocore.exceptions.BotoCoreError:  # unreachable endpoint, no credentials…
        raise FsxError("BadRequest", S3_ACCESS_MESSAGE, operation) from None


def _new_record(request: dict[str, Any], conf: dict[str, Any], endpoint_url: str | None, region: str) -> dict[str, Any]:
    """The record of a new file system from a validated request."""
    fs_id = _new_file_system_id()
    owner = _owner_id()
    created = round(time.time(), 3)
    deployment = conf.get("DeploymentType", "SCRATCH_1")
    lustre: dict[str, Any] = {
        "WeeklyMaintenanceStartTime": conf.get("WeeklyMaintenanceStartTime") or _default_weekly_time(fs_id),
        "DeploymentType": deployment,
        "MountName": "fsx" if deployment == "SCRATCH_1" else _random_mount_name(),
    }
    lustre.update({k: conf[k] for k in ECHOED_LUSTRE_MEMBERS if k in conf})
    if conf.get("ImportPath") is not None:
        import_url = S3Url.parse(conf["ImportPath"])
        assert import_url is not None
        stamp = datetime.fromtimestamp(created, UTC).strftime("%Y%m%dT%H%M%SZ")
        lustre["DataRepositoryConfiguration"] = {
            "Lifecycle": "AVAILABLE",
            "ImportPath": conf["ImportPath"],
            "ExportPath": conf.get("ExportPath") or f"s3://{import_url.bucket}/FSxLustre{stamp}",
            "ImportedFileChunkSize": conf.get("ImportedFileChunkSize", DEFAULT_CHUNK_SIZE),
            "AutoImportPolicy": conf.get("AutoImportPolicy", "NONE"),
            "AutoExportPolicy": conf.get("AutoExportPolicy") or {"Events": list(EXPORT_EVENTS)},
        }
    record: dict[str, Any] = {
        "OwnerId": owner,
        "CreationTime": created,
        "FileSystemId": fs_id,
        "FileSystemType": "LUSTRE",
        "FileSystemTypeVersion": request.get("FileSystemTypeVersion")
        or ("2.12" if deployment == "PERSISTENT_2" else "2.10"),
        "Lifecycle": "AVAILABLE",
        "StorageCapacity": request["StorageCapacity"],
        "StorageType": request.get("StorageType") or "SSD",
        "SubnetIds": list(request.get("SubnetIds") or []),
        "DNSName": f"{fs_id}.fsx.{region}.amazonaws.com",
        "ResourceARN": f"arn:aws:fsx:{region}:{owner}:file-system/{fs_id}",
        "Tags": list(request.get("Tags") or []),
        "LustreConfiguration": lustre,
        "_EndpointUrl": endpoint_url,
        "_Region": region,
        "_SecurityGroupIds": list(request.get("SecurityGroupIds") or []),
    }
    return record


def _new_file_system_id() -> str:
    existing = {r["FileSystemId"] for r in records.list_records(CREATE)}
    while True:
        fs_id = "fs-" + secrets.token_hex(9)[:17]
        if fs_id not in existing:
            return fs_id


def _owner_id() -> str:
    account = os.environ.get("AWS_ACCOUNT_ID", "")
    return account if re.fullmatch(r"\d{12}", account) else DEFAULT_OWNER_ID


def _default_weekly_time(fs_id: str) -> str:
    """A deterministic 30-minute-aligned weekly maintenance window derived from the id."""
    n = int(fs_id[3:], 16)
    return f"{n % 7 + 1}:{n // 7 % 24:02d}:{n // 168 % 2 * 30:02d}"


def _random_mount_name() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(8))


# -------------------------------------------------------------------------------------------- describe


def describe_file_systems(
    ids: list[str] | None = None, max_results: int | None = None, next_token: str | None = None
) -> dict[str, Any]:
    """DescribeFileSystems: ``{"FileSystems": [...]}`` plus ``NextToken`` when more pages remain.

    Without ``ids`` every file system is listed, oldest first. Pages hold at most ``max_results`` (and at
    most 50) file systems; ``next_token`` is the opaque token of a previous page.
    """
    if max_results is not None and (not is_int(max_results) or max_results < 1):
        raise FsxError("BadRequest", "MaxResults must be an integer greater than or equal to 1.", DESCRIBE)
    page_size = min(max_results or MAX_PAGE, MAX_PAGE)
    start = decode_token(next_token, DESCRIBE) if next_token is not None else 0
    if ids:
        if len(ids) > MAX_PAGE:
            raise FsxError("BadRequest", f"At most {MAX_PAGE} FileSystemIds can be given.", DESCRIBE)
        selected = []
        for fs_id in dict.fromkeys(ids):
            try:
                selected.append(records.load_record(fs_id, DESCRIBE))
            except FsxError:
                raise FsxError("FileSystemNotFound", f"{NOT_FOUND_MESSAGE} ({fs_id})", DESCRIBE) from None
    else:
        selected = records.list_records()
    page = selected[start : start + page_size]
    result: dict[str, Any] = {"FileSystems": [public_view(r) for r in page]}
    if start + page_size < len(selected):
        result["NextToken"] = encode_token(start + page_size)
    return result


def encode_token(offset: int) -> str:
    """The opaque NextToken of the page that starts at ``offset``."""
    return base64.b64encode(json.dumps({"v": 1, "offset": offset}).encode()).decode()


def decode_token(token: str, operation: str) -> int:
    """The offset a NextToken from :func:`encode_token` stands for; BadRequest if it is not one."""
    try:
        data = json.loads(base64.b64decode(token, validate=True))
        offset = data["offset"]
        if data.get("v") != 1 or not is_int(offset) or offset < 0:
            raise ValueError(offset)
    except (binascii.Error, ValueError, TypeError, KeyError):
        raise FsxError("BadRequest", "The NextToken value is not valid.", operation) from None
    return offset


# ---------------------------------------------------------------------------------------------- update


def update_file_system(fs_id: str, lustre_configuration: dict[str, Any]) -> dict[str, Any]:
    """UpdateFileSystem: change AutoImportPolicy and/or WeeklyMaintenanceStartTime; ``{"FileSystem"}``."""
    with control_lock(UPDATE):
        record = records.load_record(fs_id, UPDATE)
        for member in lustre_configuration:
            if member in IMMUTABLE_MEMBERS:
                message = f"{member} cannot be changed after the file system is created."
                raise FsxError("BadRequest", message, UPDATE)
            if member not in UPDATABLE_MEMBERS:
                raise FsxError(
                    "BadRequest",
                    f"Unsupported parameter in LustreConfiguration: {member}; "
                    f"valid parameters: {', '.join(UPDATABLE_MEMBERS)}.",
                    UPDATE,
                )
        if not lustre_configuration:
            raise FsxError("BadRequest", f"Specify at least one of {', '.join(UPDATABLE_MEMBERS)}.", UPDATE)
        lustre = record["LustreConfiguration"]
        if "WeeklyMaintenanceStartTime" in lustre_configuration:
            lustre["WeeklyMaintenanceStartTime"] = _validate_weekly_time(
                lustre_configuration["WeeklyMaintenanceStartTime"], UPDATE
            )
        if "AutoImportPolicy" in lustre_configuration:
            repository = lustre.get("DataRepositoryConfiguration")
            if repository is None:
                message = "AutoImportPolicy can only be set on a file system with an ImportPath."
                raise FsxError("BadRequest", message, UPDATE)
            policy = _validate_policy(lustre_configuration["AutoImportPolicy"], UPDATE)
            repository["AutoImportPolicy"] = policy
        if "AutoExportPolicy" in lustre_configuration:
            repository = lustre.get("DataRepositoryConfiguration")
            if repository is None:
                message = "AutoExportPolicy can only be set on a file system with an ImportPath."
                raise FsxError("BadRequest", message, UPDATE)
            policy = validate_events_policy(lustre_configuration["AutoExportPolicy"], "AutoExportPolicy", UPDATE)
            repository["AutoExportPolicy"] = policy
        records.save_record(record, UPDATE)
    return {"FileSystem": public_view(record)}


# ---------------------------------------------------------------------------------------------- delete


def delete_file_system(fs_id: str) -> dict[str, Any]:
    """DeleteFileSystem: remove the record and the local directory (never S3 data); refused while mounted.

    In the cluster engine the file system's namespace is dropped from the database too (before the record, so a
    failure leaves a record to delete again). Only this host's mount is checked: a mount on another host is not
    seen, and loses its namespace.
    """
    with control_lock(DELETE):
        records.load_record(fs_id, DELETE)
        state = records.mount_state(fs_id)
        if state is not None:
            raise FsxError(
                "BadRequest",
                f"File system {fs_id} is mounted at {state.get('mountpoint')}; unmount it first.",
                DELETE,
            )
        conninfo = records.cluster_conninfo(DELETE)
        if conninfo is not None:
            from lustrefs.store import pgrecords  # psycopg is loaded only by the cluster engine

            pgrecords.drop_file_system(conninfo, fs_id, DELETE)
        shutil.rmtree(records.home_dir() / fs_id, ignore_errors=True)
        records.delete_record(fs_id)
    return {"FileSystemId": fs_id, "Lifecycle": "DELETING"}


# ----------------------------------------------------------------------------------------------- shared


def _validate_weekly_time(value: Any, operation: str) -> str:
    if not isinstance(value, str) or len(value) != 7 or not WEEKLY_TIME.match(value):
        raise FsxError("BadRequest", f"WeeklyMaintenanceStartTime {value!r} must be d:HH:MM (d = 1-7, UTC).", operation)
    return value


def _validate_policy(value: Any, operation: str) -> str:
    if value not in AUTO_IMPORT_POLICIES:
        raise FsxError(
            "BadRequest",
            f"Invalid AutoImportPolicy {value!r}; valid values: {', '.join(AUTO_IMPORT_POLICIES)}.",
            operation,
        )
    return value


def validate_events_policy(value: Any, member: str, operation: str) -> dict[str, list[str]]:
    """An event-list policy (``AutoExportPolicy``, a DRA's ``AutoImportPolicy``): ``{"Events": [...]}`` with distinct
    events from NEW, CHANGED, DELETED (the shorthand ``{Events=[NEW,CHANGED]}`` too); BadRequest naming ``member``."""
    if isinstance(value, str) and (m := re.fullmatch(r"\{Events=\[([A-Z,]*)\]\}", value.replace(" ", ""))):
        value = {"Events": [e for e in m[1].split(",") if e]}
    events = value.get("Events") if isinstance(value, dict) and set(value) == {"Events"} else None
    if not isinstance(events, list) or len(set(events)) != len(events) or not set(events) <= set(EXPORT_EVENTS):
        raise FsxError(
            "BadRequest",
            f'Invalid {member} {value!r}; use {{"Events": [...]}} with events from {", ".join(EXPORT_EVENTS)}.',
            operation,
        )
    return {"Events": events}


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


@contextlib.contextmanager
def control_lock(operation: str) -> Iterator[None]:
    """Serialise control-plane changes (token lookups, id allocation, updates, deletions): between this host's
    processes with a file lock, or, in the cluster engine, between every host's with the database's advisory lock."""
    conninfo = records.cluster_conninfo(operation)
    if conninfo is not None:
        from lustrefs.store import pgrecords  # psycopg is loaded only by the cluster engine

        with pgrecords.control_lock(conninfo, operation):
            yield
        return
    with open(records.home_dir() / ".control.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
