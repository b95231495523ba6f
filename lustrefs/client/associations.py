"""Data repository associations, the control plane: CreateDataRepositoryAssociation,
DescribeDataRepositoryAssociations, UpdateDataRepositoryAssociation and DeleteDataRepositoryAssociation.

Requests and responses use FSx's shapes (``botocore/data/fsx/2018-03-01``) and errors are FSx's. An association
is kept in its file system's record, in the list ``record["_Associations"]`` (oldest first), in the shape
``DataRepositoryAssociation`` plus private fields: ``_ClientRequestToken`` and ``_RequestFingerprint`` (create's
idempotency), ``_DeleteDataInFileSystem`` and ``_DeleteClientRequestToken`` (set by delete). Every change is made
under the control lock, which the daemon takes too.

The lifecycle: an association created or updated while a daemon serves its file system on this host is CREATING
or UPDATING until the daemon has applied it (AVAILABLE, or MISCONFIGURED with FailureDetails). Without a daemon,
create checks that the bucket can be read and stores it AVAILABLE, and update leaves the lifecycle as it is. Delete
always leaves it DELETING: the daemon completes it (exports the association's changes unless its data is deleted,
removes its subtree and then the association).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from lustrefs import records
from lustrefs.client import control
from lustrefs.errors import FsxError
from lustrefs.s3client import S3Url

CREATE = "CreateDataRepositoryAssociation"
DESCRIBE = "DescribeDataRepositoryAssociations"
UPDATE = "UpdateDataRepositoryAssociation"
DELETE = "DeleteDataRepositoryAssociation"

MAX_ASSOCIATIONS = 8  # per file system
MAX_IDS = 50  # DataRepositoryAssociationIds
MAX_RESULTS = 25  # LimitedMaxResults
MAX_PAGE = 100  # DataRepositoryAssociations: the most a response holds
MAX_FILTERS = 10
MAX_FILTER_VALUES = 20
MAX_NAMESPACE = 4096  # Namespace: a FileSystemPath's length
NAME_MAX = 255  # bytes in one path component (Linux, Lustre)

ASSOCIATION_ID = re.compile(r"dra-[0-9a-f]{8,19}\Z")  # ^(dra-[0-9a-f]{8,})$, 13 to 23 characters
FILTER_VALUE = re.compile(r"[0-9a-zA-Z*.\\/?_-]{1,128}\Z")
FILTER_NAMES = ("file-system-id", "data-repository-type", "file-cache-id")  # those of this operation
REPOSITORY_TYPES = ("S3", "NFS")
POLICIES = ("AutoImportPolicy", "AutoExportPolicy")
UPDATABLE = ("ImportedFileChunkSize", "S3")
CREATE_MEMBERS = frozenset(
    (
        "FileSystemId",
        "FileSystemPath",
        "DataRepositoryPath",
        "BatchImportMetaDataOnCreate",
        "ImportedFileChunkSize",
        "S3",
        "ClientRequestToken",
        "Tags",
    )
)
UPDATE_MEMBERS = frozenset(("AssociationId", "ClientRequestToken", *UPDATABLE))
DELETE_MEMBERS = frozenset(("AssociationId", "ClientRequestToken", "DeleteDataInFileSystem"))
# The members of DataRepositoryAssociation that an S3 association of a file system has, in the model's order.
PUBLIC_MEMBERS = (
    "AssociationId",
    "ResourceARN",
    "FileSystemId",
    "Lifecycle",
    "FailureDetails",
    "FileSystemPath",
    "DataRepositoryPath",
    "BatchImportMetaDataOnCreate",
    "ImportedFileChunkSize",
    "S3",
    "Tags",
    "CreationTime",
)
NOT_FOUND_MESSAGE = "No data repository associations were found based upon supplied parameters."


def public_view(association: dict[str, Any]) -> dict[str, Any]:
    """The FSx description of a stored association: its public members in the model's order (records are stored
    with sorted keys), private fields left out."""
    view = {k: association[k] for k in PUBLIC_MEMBERS if k in association}
    if "S3" in view:
        view["S3"] = {p: view["S3"][p] for p in POLICIES if p in view["S3"]}
    return view


def check_association_id(value: object, operation: str) -> str:
    """``value`` if it is a well-formed association id; else BadRequest."""
    if not isinstance(value, str) or not ASSOCIATION_ID.match(value):
        shape = "an association id is dra- followed by 8 to 19 lowercase hex digits"
        raise FsxError("BadRequest", f"Invalid AssociationId {value!r}: {shape}.", operation)
    return value


def _bad(message: str, operation: str) -> FsxError:
    return FsxError("BadRequest", message, operation)


def _check_members(request: dict[str, Any], allowed: frozenset[str], operation: str) -> None:
    unknown = sorted(set(request) - allowed)
    if unknown:
        raise _bad(f"Unknown parameter: {unknown[0]}.", operation)


def _check_bool(request: dict[str, Any], member: str, operation: str) -> bool:
    value = request.get(member, False)
    if not isinstance(value, bool):
        raise _bad(f"{member} must be true or false.", operation)
    return value


# ---------------------------------------------------------------------------------------------- create


def create_data_repository_association(
    request: dict[str, Any], s3_for: Callable[[dict[str, Any]], Any]
) -> dict[str, Any]:
    """CreateDataRepositoryAssociation: validate ``request``, store the association; ``{"Association"}``.

    ``s3_for(record)`` gives a boto3 S3 client for the file system (its endpoint and region); it is used to check
    that the bucket can be read when no daemon serves the file system here. A ``ClientRequestToken`` already used
    with the same parameters returns that association as it is now.
    """
    token = control.check_client_request_token(request.get("ClientRequestToken"), CREATE)
    settings = _validate_create(request)
    fingerprint = control.request_fingerprint(settings)
    fs_id = settings["FileSystemId"]
    with control.control_lock(CREATE):
        record = records.load_record(fs_id, CREATE)
        if token is not None:
            existing = _association_for_token(token, fingerprint)
            if existing is not None:
                return {"Association": public_view(existing)}
        _check_fits(record, settings)
        mounted = records.mount_state(fs_id) is not None
        if not mounted:  # else the daemon checks it while the association is CREATING
            control.check_bucket_access(s3_for(record), settings["DataRepositoryPath"], CREATE, "BadRequest")
        association = _new_association(record, settings, "CREATING" if mounted else "AVAILABLE")
        association["_ClientRequestToken"] = token
        association["_RequestFingerprint"] = fingerprint
        record.setdefault("_Associations", []).append(association)
        records.save_record(record, CREATE)
    return {"Association": public_view(association)}


def _validate_create(request: dict[str, Any]) -> dict[str, Any]:
    """The request's parameters, checked and normalised, defaults applied (the token left out)."""
    _check_members(request, CREATE_MEMBERS, CREATE)
    control.validate_tags(request.get("Tags"), CREATE)
    return {
        "FileSystemId": records.check_file_system_id(request.get("FileSystemId"), CREATE),
        "FileSystemPath": _file_system_path(request.get("FileSystemPath")),
        "DataRepositoryPath": _data_repository_path(request.get("DataRepositoryPath")),
        "BatchImportMetaDataOnCreate": _check_bool(request, "BatchImportMetaDataOnCreate", CREATE),
        "ImportedFileChunkSize": control.validate_chunk_size(
            request.get("ImportedFileChunkSize", control.DEFAULT_CHUNK_SIZE), CREATE
        ),
        "S3": _s3_configuration(request.get("S3"), None, CREATE),
        "Tags": list(request.get("Tags") or []),
    }


def _file_system_path(value: Any) -> str:
    """A FileSystemPath (shape ``Namespace``, a leading ``/``) normalised: ``/a/b``, or ``/`` for the root."""
    if value is None:
        raise _bad("FileSystemPath is required.", CREATE)
    forbidden = control.ARCHIVE_PATH_FORBIDDEN
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAMESPACE or forbidden.search(value):
        raise _bad(
            f"FileSystemPath must be 1 to {MAX_NAMESPACE} characters long and contain no NUL, CR, LF, U+0085, "
            "U+2028 or U+2029.",
            CREATE,
        )
    if not value.startswith("/"):
        raise _bad(f"FileSystemPath {value!r} must start with '/'.", CREATE)
    names = [name for name in value.split("/") if name]
    if any(name in (".", "..") for name in names):
        raise _bad(f"FileSystemPath {value!r} must not contain '.' or '..' components.", CREATE)
    if any(len(name.encode()) > NAME_MAX for name in names):
        raise _bad(f"Each component of FileSystemPath must be at most {NAME_MAX} bytes long.", CREATE)
    return "/" + "/".join(names)


def _data_repository_path(value: Any) -> str:
    """A DataRepositoryPath (shape ``ArchivePath``) normalised as FSx does: ``s3://bucket/prefix/``, ``s3://bucket/``."""
    if value is None:
        raise _bad("DataRepositoryPath is required.", CREATE)
    control.check_archive_path(value, "DataRepositoryPath", CREATE)
    url = S3Url.parse(value)
    if url is None:
        raise _bad(f"DataRepositoryPath {value!r} is not s3://bucket[/prefix] with a valid bucket name.", CREATE)
    prefix = value[len(f"s3://{url.bucket}/") :].removesuffix("/")
    if prefix and any(name in ("", ".", "..") for name in prefix.split("/")):
        message = f"DataRepositoryPath {value!r} must not contain empty, '.' or '..' components."
        raise _bad(message, CREATE)
    return f"s3://{url.bucket}/" + (f"{prefix}/" if prefix else "")


def _s3_configuration(value: Any, current: dict[str, Any] | None, operation: str) -> dict[str, Any]:
    """``S3`` (shape ``S3DataRepositoryConfiguration``) with both policies: those given replace ``current``'s; a
    policy given nowhere has no events (FSx's default)."""
    base = current or {policy: {"Events": []} for policy in POLICIES}
    if value is None:
        return base
    if not isinstance(value, dict) or set(value) - set(POLICIES):
        raise _bad("S3 must be a structure with AutoImportPolicy and/or AutoExportPolicy.", operation)
    return {
        policy: control.validate_events_policy(value[policy], policy, operation) if policy in value else base[policy]
        for policy in POLICIES
    }


def _association_for_token(token: str, fingerprint: str) -> dict[str, Any] | None:
    """The association created with ``token`` if its parameters match; IncompatibleParameterError otherwise."""
    for association in _associations(records.list_records(CREATE)):
        if association.get("_ClientRequestToken") != token:
            continue
        if association.get("_RequestFingerprint") != fingerprint:
            raise FsxError(
                "IncompatibleParameterError",
                f"The client request token '{token}' was already used with different parameters "
                f"(data repository association {association['AssociationId']}).",
                CREATE,
            )
        return association
    return None


def _check_fits(record: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse an association the file system cannot take: a legacy link, 8 already, an overlap with another
    (in any lifecycle, DELETING too: it exists until its deletion is complete)."""
    fs_id = record["FileSystemId"]
    if record.get("LustreConfiguration", {}).get("DataRepositoryConfiguration") is not None:
        raise _bad(
            f"File system {fs_id} is linked to a data repository by its ImportPath; data repository associations "
            "are not supported on a file system with an ImportPath.",
            CREATE,
        )
    others = record.get("_Associations", [])
    if len(others) >= MAX_ASSOCIATIONS:
        raise FsxError(
            "ServiceLimitExceeded",
            f"File system {fs_id} already has {MAX_ASSOCIATIONS} data repository associations, the most it can have.",
            CREATE,
        )
    path, repository = settings["FileSystemPath"], settings["DataRepositoryPath"]
    if others and "/" in (path, *(o["FileSystemPath"] for o in others)):
        raise _bad(
            'The file system path "/" can only be used by the first data repository association of a file system, '
            "and then it is the only one.",
            CREATE,
        )
    for other in others:
        if _nested(_as_dir(path), _as_dir(other["FileSystemPath"])):
            raise _bad(
                f"FileSystemPath {path} overlaps the file system path {other['FileSystemPath']} of data repository "
                f"association {other['AssociationId']} ({other['Lifecycle']}).",
                CREATE,
            )
        if _nested(repository, other["DataRepositoryPath"]):
            raise _bad(
                f"DataRepositoryPath {repository} overlaps the data repository path {other['DataRepositoryPath']} of "
                f"data repository association {other['AssociationId']} ({other['Lifecycle']}).",
                CREATE,
            )


def _as_dir(path: str) -> str:
    return path if path == "/" else path + "/"


def _nested(a: str, b: str) -> bool:
    """Whether one of two paths that end in ``/`` is the other or below it."""
    return a.startswith(b) or b.startswith(a)


def _new_association(record: dict[str, Any], settings: dict[str, Any], lifecycle: str) -> dict[str, Any]:
    fs_id = record["FileSystemId"]
    existing = {a["AssociationId"] for a in _associations(records.list_records(CREATE))}
    while (dra_id := "dra-" + secrets.token_hex(9)[:17]) in existing:
        pass
    association = {
        "AssociationId": dra_id,
        "ResourceARN": record["ResourceARN"].rsplit(":", 1)[0] + f":association/{fs_id}/{dra_id}",
        "FileSystemId": fs_id,
        "Lifecycle": lifecycle,
        "FileSystemPath": settings["FileSystemPath"],
        "DataRepositoryPath": settings["DataRepositoryPath"],
        "BatchImportMetaDataOnCreate": settings["BatchImportMetaDataOnCreate"],
        "ImportedFileChunkSize": settings["ImportedFileChunkSize"],
        "S3": settings["S3"],
        "CreationTime": round(time.time(), 3),
    }
    if settings["Tags"]:  # the shape Tags holds 1 to 50: an association without tags has none
        association["Tags"] = settings["Tags"]
    return association


# -------------------------------------------------------------------------------------------- describe


def describe_data_repository_associations(
    association_ids: list[str] | None = None,
    filters: list[dict[str, Any]] | None = None,
    max_results: int | None = None,
    next_token: str | None = None,
) -> dict[str, Any]:
    """DescribeDataRepositoryAssociations: ``{"Associations": [...]}`` plus ``NextToken`` when more pages remain.

    The associations of every file system, oldest first, or those of ``association_ids`` in that order; narrowed
    by ``filters``. Pages hold at most ``max_results`` (1 to 25), without it at most 100.
    """
    if max_results is not None and (not control.is_int(max_results) or not 1 <= max_results <= MAX_RESULTS):
        raise _bad(f"MaxResults must be an integer from 1 to {MAX_RESULTS}.", DESCRIBE)
    if association_ids is not None and len(association_ids) > MAX_IDS:
        raise _bad(f"At most {MAX_IDS} AssociationIds can be given.", DESCRIBE)
    for dra_id in association_ids or []:
        check_association_id(dra_id, DESCRIBE)
    wanted = _parse_filters(filters or [])
    start = control.decode_token(next_token, DESCRIBE) if next_token is not None else 0
    stored = records.list_records(DESCRIBE)
    known = {r["FileSystemId"] for r in stored}
    for fs_id in sorted(wanted.get("file-system-id", ())):
        records.check_file_system_id(fs_id, DESCRIBE)
        if fs_id not in known:
            raise FsxError("FileSystemNotFound", f"File system '{fs_id}' does not exist.", DESCRIBE)
    selected = sorted(_associations(stored), key=lambda a: (a["CreationTime"], a["AssociationId"]))
    if association_ids:
        by_id = {a["AssociationId"]: a for a in selected}
        missing = [i for i in association_ids if i not in by_id]
        if missing:
            raise FsxError("DataRepositoryAssociationNotFound", f"{NOT_FOUND_MESSAGE} ({missing[0]})", DESCRIBE)
        selected = [by_id[i] for i in dict.fromkeys(association_ids)]
    if "file-system-id" in wanted:
        selected = [a for a in selected if a["FileSystemId"] in wanted["file-system-id"]]
    if "S3" not in wanted.get("data-repository-type", {"S3"}) or "file-cache-id" in wanted:
        selected = []  # every association here links a file system to S3
    page_size = max_results or MAX_PAGE
    result: dict[str, Any] = {"Associations": [public_view(a) for a in selected[start : start + page_size]]}
    if start + page_size < len(selected):
        result["NextToken"] = control.encode_token(start + page_size)
    return result


def _parse_filters(filters: Any) -> dict[str, set[str]]:
    """``{name: values}`` from a Filters list (``Values`` may be one comma-separated string); filters of the same
    name narrow each other."""
    if not isinstance(filters, list) or len(filters) > MAX_FILTERS:
        raise _bad(f"Filters must be a list of at most {MAX_FILTERS} filters.", DESCRIBE)
    out: dict[str, set[str]] = {}
    for f in filters:
        name, values = (f.get("Name"), f.get("Values")) if isinstance(f, dict) else (None, None)
        if isinstance(values, str):
            values = [v for v in values.split(",") if v]
        if name not in FILTER_NAMES:
            raise _bad(f"Invalid filter name {name!r}; valid names: {', '.join(FILTER_NAMES)}.", DESCRIBE)
        if not isinstance(values, list) or not 1 <= len(values) <= MAX_FILTER_VALUES:
            raise _bad(f"Filter {name} needs 1 to {MAX_FILTER_VALUES} Values.", DESCRIBE)
        if not all(isinstance(v, str) and FILTER_VALUE.match(v) for v in values):
            raise _bad(f"Filter {name}: each value is 1 to 128 characters of [0-9a-zA-Z*.\\/?_-].", DESCRIBE)
        if name == "data-repository-type" and not set(values) <= set(REPOSITORY_TYPES):
            raise FsxError(
                "InvalidDataRepositoryType",
                f"Invalid data repository type in {values}; valid types: {', '.join(REPOSITORY_TYPES)}.",
                DESCRIBE,
            )
        out[name] = out[name] & set(values) if name in out else set(values)
    return out


# ---------------------------------------------------------------------------------------------- update


def update_data_repository_association(request: dict[str, Any]) -> dict[str, Any]:
    """UpdateDataRepositoryAssociation: change ImportedFileChunkSize and/or the S3 policies; ``{"Association"}``.

    Only an AVAILABLE or MISCONFIGURED association can be updated; it becomes UPDATING while a daemon serves its
    file system on this host, for the daemon to apply the change.
    """
    _check_members(request, UPDATE_MEMBERS, UPDATE)
    dra_id = check_association_id(request.get("AssociationId"), UPDATE)
    control.check_client_request_token(request.get("ClientRequestToken"), UPDATE)
    if all(request.get(member) is None for member in UPDATABLE):
        raise _bad(f"Specify at least one of {', '.join(UPDATABLE)}.", UPDATE)
    chunk = request.get("ImportedFileChunkSize")
    if chunk is not None:
        control.validate_chunk_size(chunk, UPDATE)
    with control.control_lock(UPDATE):
        record, association = _find(dra_id, UPDATE)
        if association["Lifecycle"] not in ("AVAILABLE", "MISCONFIGURED"):
            raise _bad(
                f"Data repository association {dra_id} is {association['Lifecycle']}; only an AVAILABLE or "
                "MISCONFIGURED association can be updated.",
                UPDATE,
            )
        association["S3"] = _s3_configuration(request.get("S3"), association["S3"], UPDATE)
        if chunk is not None:
            association["ImportedFileChunkSize"] = chunk
        if records.mount_state(record["FileSystemId"]) is not None:
            association["Lifecycle"] = "UPDATING"
            association.pop("FailureDetails", None)
        records.save_record(record, UPDATE)
    return {"Association": public_view(association)}


# ---------------------------------------------------------------------------------------------- delete


def delete_data_repository_association(request: dict[str, Any]) -> dict[str, Any]:
    """DeleteDataRepositoryAssociation: mark the association DELETING for the daemon to complete;
    ``{"AssociationId", "Lifecycle", "DeleteDataInFileSystem"}``.

    An association already DELETING is a BadRequest, unless the request repeats the one that deleted it (same
    ClientRequestToken, same DeleteDataInFileSystem), which gets the same answer.
    """
    _check_members(request, DELETE_MEMBERS, DELETE)
    dra_id = check_association_id(request.get("AssociationId"), DELETE)
    token = control.check_client_request_token(request.get("ClientRequestToken"), DELETE)
    delete_data = _check_bool(request, "DeleteDataInFileSystem", DELETE)
    response = {"AssociationId": dra_id, "Lifecycle": "DELETING", "DeleteDataInFileSystem": delete_data}
    with control.control_lock(DELETE):
        record, association = _find(dra_id, DELETE)
        if association["Lifecycle"] == "DELETING":
            if token is None or token != association.get("_DeleteClientRequestToken"):
                raise _bad(f"Data repository association {dra_id} is already being deleted.", DELETE)
            if delete_data != association["_DeleteDataInFileSystem"]:
                raise FsxError(
                    "IncompatibleParameterError",
                    f"The client request token '{token}' was already used with different parameters "
                    "(DeleteDataInFileSystem).",
                    DELETE,
                )
            return response
        association["Lifecycle"] = "DELETING"
        association.pop("FailureDetails", None)
        association["_DeleteDataInFileSystem"] = delete_data
        association["_DeleteClientRequestToken"] = token
        records.save_record(record, DELETE)
    return response


# ----------------------------------------------------------------------------------------------- shared


def _associations(stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The associations of file system records ``stored``."""
    return [a for r in stored for a in r.get("_Associations", [])]


def _find(dra_id: str, operation: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The record holding association ``dra_id`` and the association in it; DataRepositoryAssociationNotFound."""
    for record in records.list_records(operation):
        for association in record.get("_Associations", []):
            if association["AssociationId"] == dra_id:
                return record, association
    raise FsxError("DataRepositoryAssociationNotFound", f"{NOT_FOUND_MESSAGE} ({dra_id})", operation)


# ------------------------------------------------------------------------------------- the daemon's side


def report_lifecycle(fs_id: str, dra_id: str, lifecycle: str, failure: str | None) -> None:
    """The daemon moved association ``dra_id`` on (AVAILABLE, MISCONFIGURED with ``failure``); gone: no-op."""
    with control.control_lock(UPDATE):
        record = records.load_record(fs_id, UPDATE)
        for entry in record.get("_Associations") or []:
            if entry["AssociationId"] == dra_id and entry["Lifecycle"] != "DELETING":
                entry["Lifecycle"] = lifecycle
                entry.pop("FailureDetails", None)
                if failure is not None:
                    entry["FailureDetails"] = {"Message": failure}
        records.save_record(record, UPDATE)


def forget(fs_id: str, dra_id: str) -> None:
    """The daemon finished the deletion of association ``dra_id``: it leaves the record."""
    with control.control_lock(DELETE):
        record = records.load_record(fs_id, DELETE)
        record["_Associations"] = [e for e in record.get("_Associations") or [] if e["AssociationId"] != dra_id]
        records.save_record(record, DELETE)
