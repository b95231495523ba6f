"""Command line: the ``lustrefs`` console script (AWS CLI style) and the ``mount.lustrefs`` mount(8) helper.

``lustrefs`` parses arguments the way the AWS CLI does (shorthand ``k=v,k2=v2`` or JSON for structures,
``Key=a,Value=b`` items for lists of structures), prints responses as indented JSON and exits 254 on a
service error and 252 on a usage error, like ``aws``. ``hsm_state``, ``hsm_archive``, ``hsm_release``,
``hsm_restore`` and ``hsm_action`` print what Lustre's ``lfs`` prints, so FSx scripts work with ``lfs``
replaced by ``lustrefs``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TextIO

import botocore.exceptions

from lustrefs import engine, records
from lustrefs.client import associations, control, control_client, hsm, mount, tasks
from lustrefs.errors import FsxError
from lustrefs.s3client import make_client

EXIT_SERVICE_ERROR = 254
EXIT_USAGE = 252
EXIT_OTHER_ERROR = 255
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: Ctrl-C, as a shell reports a process killed by SIGINT
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141: stdout's reader went away, as for coreutils (`seq 1e6 | head -1`)
MOUNT_EXIT_USAGE = 1  # mount(8): incorrect invocation
MOUNT_EXIT_FAILURE = 32  # mount(8): mount failure

# Shorthand values are strings; these members are coerced as the AWS CLI does from the service model.
INTEGER_MEMBERS = frozenset(
    ("ImportedFileChunkSize", "PerUnitStorageThroughput", "AutomaticBackupRetentionDays", "ThroughputCapacity")
)
BOOLEAN_MEMBERS = frozenset(("CopyTagsToBackups", "EfaEnabled", "Enabled"))

# mount(8) options that mean nothing to the FUSE daemon (``ro``, ``dev`` and ``nodev`` are kept). A FUSE mount
# is always nosuid; access times are not kept. Options whose loss would weaken a guarantee (noexec, sync) are
# passed on, and refused as unknown.
GENERIC_MOUNT_OPTIONS = (
    frozenset(("defaults", "_netdev", "nofail", "auto", "noauto", "user", "nouser", "users", "owner", "group", "rw"))
    | frozenset(("nosuid", "suid", "exec", "async", "silent", "loud", "lazytime", "nolazytime"))
    | frozenset(
        ("atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime", "diratime", "nodiratime")
    )
)
HSM_COMMANDS = ("hsm_state", "hsm_action", "hsm_archive", "hsm_release", "hsm_restore")
HSM_ACTIONS_AT_ONCE = 8
SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SHORTHAND_KEY = re.compile(r"\s*([A-Za-z0-9_.:-]+)\s*=")
CONFIGURE_ENGINE = "ConfigureMetadataEngine"
DESCRIBE_ENGINE = "DescribeMetadataEngine"
# A password in a libpq connection string: key=value form (quoted or with backslash escapes), or a URI's.
KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|(?:\\.|[^\s\\])+)")
URI_USER_PASSWORD = re.compile(r"\A(postgres(?:ql)?://[^:@/?#]*:)[^@/?#]*@", re.IGNORECASE)
URI_PARAM_PASSWORD = re.compile(r"([?&]password=)[^&#]*")


class UsageError(ValueError):
    """A malformed argument value (reported like argparse errors, exit 252)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors exit with ``exit_code`` (252 for ``lustrefs``, as ``aws``)."""

    exit_code = EXIT_USAGE

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(self.exit_code, f"{self.prog}: error: {message}\n")


class MountParser(Parser):
    exit_code = MOUNT_EXIT_USAGE


# --------------------------------------------------------------------------------- shorthand parsing


def parse_shorthand(text: str) -> dict[str, Any]:
    """Parse AWS CLI shorthand ``k=v,k2=v2`` into a dict of strings.

    Values may be quoted (``k="a,b"``); an unquoted value runs up to the next ``,key=``, so a comma that
    is not followed by ``key=`` stays in the value.
    """
    result: dict[str, Any] = {}
    pos = 0
    while pos < len(text):
        m = SHORTHAND_KEY.match(text, pos)
        if not m:
            raise UsageError(f"expected key=value at position {pos} in {text!r}")
        key, pos = m.group(1), m.end()
        if pos < len(text) and text[pos] in "\"'":
            end = text.find(text[pos], pos + 1)
            if end < 0:
                raise UsageError(f"unterminated quote in {text!r}")
            value, pos = text[pos + 1 : end], end + 1
            if pos < len(text) and text[pos] != ",":
                raise UsageError(f"expected ',' after the quoted value of {key!r} in {text!r}")
        else:
            end = _value_end(text, pos)
            value, pos = text[pos:end].strip(), end
        if key in result:
            raise UsageError(f"duplicate key {key!r} in {text!r}")
        result[key] = value
        pos += 1  # skip the comma
    return result


def _value_end(text: str, pos: int) -> int:
    """The end of an unquoted value: the first comma followed by ``key=``, else the end of the text."""
    while True:
        comma = text.find(",", pos)
        if comma < 0 or SHORTHAND_KEY.match(text, comma + 1):
            return len(text) if comma < 0 else comma
        pos = comma + 1


def _coerce_members(struct: dict[str, Any]) -> dict[str, Any]:
    """Convert shorthand strings of integer/boolean members; values that do not convert are left as given."""
    out: dict[str, Any] = {}
    for key, value in struct.items():
        if key in INTEGER_MEMBERS and re.fullmatch(r"-?\d+", value):
            value = int(value)
        elif key in BOOLEAN_MEMBERS and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        out[key] = value
    return out


def parse_structure(text: str) -> dict[str, Any]:
    """A structure argument: JSON (``{...}``) or shorthand (``k=v,...``); argparse ``type=``."""
    if text.lstrip().startswith("{"):
        value = _parse_json(text)
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("expected a JSON object")
        return value
    try:
        return _coerce_members(parse_shorthand(text))
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_structure_list_item(text: str) -> list[dict[str, Any]]:
    """One word of a list-of-structures argument: a JSON list, or one structure (JSON or shorthand)."""
    if text.lstrip().startswith("["):
        value = _parse_json(text)
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise argparse.ArgumentTypeError("expected a JSON list of objects")
        return value
    return [parse_structure(text)]


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON: {e}") from None


def _flatten(items: list[list[dict[str, Any]]] | None) -> list[dict[str, Any]] | None:
    return None if items is None else [s for item in items for s in item]


# ------------------------------------------------------------------------------------------- commands


def _print_json(value: dict[str, Any]) -> None:
    print(json.dumps(value, indent=4, ensure_ascii=False))


def _endpoint(args: argparse.Namespace) -> str | None:
    """The S3 endpoint in effect: ``--endpoint-url``, else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``."""
    return args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _request(**members: Any) -> dict[str, Any]:
    """An API request from options: the members whose option was given."""
    return {k: v for k, v in members.items() if v is not None}


def cmd_create_file_system(args: argparse.Namespace) -> int:
    request = _request(
        ClientRequestToken=args.client_request_token,
        FileSystemType=args.file_system_type,
        StorageCapacity=args.storage_capacity,
        StorageType=args.storage_type,
        SubnetIds=args.subnet_ids,
        SecurityGroupIds=args.security_group_ids,
        Tags=_flatten(args.tags),
        LustreConfiguration=args.lustre_configuration,
        FileSystemTypeVersion=args.file_system_type_version,
    )
    endpoint = _endpoint(args)
    s3 = make_client(endpoint, args.region, args.profile)
    _print_json(control.create_file_system(request, s3, endpoint, s3.meta.region_name))
    return 0


def cmd_describe_file_systems(args: argparse.Namespace) -> int:
    for fs_id in args.file_system_ids or []:  # a malformed id is a BadRequest, as FSx's validation says
        records.check_file_system_id(fs_id, "DescribeFileSystems")
    if args.max_results is not None or args.next_token is not None:
        _print_json(control.describe_file_systems(args.file_system_ids, args.max_results, args.next_token))
        return 0
    # Like the AWS CLI, without paging parameters every page is fetched and merged.
    file_systems: list[dict[str, Any]] = []
    token = None
    while True:
        page = control.describe_file_systems(args.file_system_ids, None, token)
        file_systems += page["FileSystems"]
        token = page.get("NextToken")
        if token is None:
            break
    _print_json({"FileSystems": file_systems})
    return 0


def cmd_update_file_system(args: argparse.Namespace) -> int:
    _print_json(control.update_file_system(args.file_system_id, args.lustre_configuration))
    return 0


def cmd_delete_file_system(args: argparse.Namespace) -> int:
    _print_json(control.delete_file_system(args.file_system_id))
    return 0


def cmd_create_data_repository_association(args: argparse.Namespace) -> int:
    request = _request(
        FileSystemId=args.file_system_id,
        FileSystemPath=args.file_system_path,
        DataRepositoryPath=args.data_repository_path,
        BatchImportMetaDataOnCreate=args.batch_import_meta_data_on_create,
        ImportedFileChunkSize=args.imported_file_chunk_size,
        S3=args.s3,
        ClientRequestToken=args.client_request_token,
        Tags=_flatten(args.tags),
    )

    def s3_for(record: dict[str, Any]) -> Any:  # the file system's endpoint and region, as a mount uses them
        return make_client(
            args.endpoint_url or record.get("_EndpointUrl"), args.region or record.get("_Region"), args.profile
        )

    _print_json(associations.create_data_repository_association(request, s3_for))
    return 0


def cmd_describe_data_repository_associations(args: argparse.Namespace) -> int:
    # One page, as the AWS CLI prints it: botocore has no paginator for this operation.
    _print_json(
        associations.describe_data_repository_associations(
            args.association_ids, _flatten(args.filters), args.max_results, args.next_token
        )
    )
    return 0


def cmd_update_data_repository_association(args: argparse.Namespace) -> int:
    request = _request(
        AssociationId=args.association_id,
        ClientRequestToken=args.client_request_token,
        ImportedFileChunkSize=args.imported_file_chunk_size,
        S3=args.s3,
    )
    _print_json(associations.update_data_repository_association(request))
    return 0


def cmd_delete_data_repository_association(args: argparse.Namespace) -> int:
    request = _request(
        AssociationId=args.association_id,
        ClientRequestToken=args.client_request_token,
        DeleteDataInFileSystem=args.delete_data_in_file_system,
    )
    _print_json(associations.delete_data_repository_association(request))
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    return mount.mount(
        args.fs_id,
        args.mountpoint,
        options=filter_mount_options(args.options),
        foreground=args.foreground,
        endpoint_url=args.endpoint_url,
        region=args.region,
        profile=args.profile,
    )


def cmd_umount(args: argparse.Namespace) -> int:
    return mount.umount(args.mountpoint)


# ------------------------------------------------------------------------------------- metadata engine


def masked_conninfo(conninfo: str) -> str:
    """``conninfo`` with any password in it replaced by ``***``."""
    if re.match(r"postgres(?:ql)?://", conninfo, re.IGNORECASE):
        return URI_PARAM_PASSWORD.sub(r"\1***", URI_USER_PASSWORD.sub(r"\1***@", conninfo))
    return KEYWORD_PASSWORD.sub(r"\1***", conninfo)


def _engine_view(setting: engine.Engine) -> dict[str, str]:
    return {"Engine": setting.kind, "ConnectionString": masked_conninfo(setting.conninfo)}


def _write_private_json(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` to ``path`` atomically (temporary file, fsync, rename), readable by its owner only."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cmd_configure_metadata_engine(args: argparse.Namespace) -> int:
    """Write ``$LUSTREFS_HOME/metadata-engine.json``, after checking that a PostgreSQL database answers."""
    if args.engine == engine.SQLITE and args.conninfo is not None:
        raise FsxError("BadRequest", "--conninfo is only used with --engine postgresql.", CONFIGURE_ENGINE)
    setting = engine.Engine(args.engine, args.conninfo or "")
    if setting.shared:
        from lustrefs.store import pgrecords  # psycopg is loaded only by the cluster engine

        pgrecords.check(setting.conninfo, CONFIGURE_ENGINE)
    _write_private_json(records.home_dir() / engine.CONFIG_FILE, setting.to_json())
    if os.environ.get("LUSTREFS_METADATA_ENGINE"):
        print("lustrefs: note: LUSTREFS_METADATA_ENGINE is set and overrides this setting", file=sys.stderr)
    _print_json({"MetadataEngine": _engine_view(setting)})
    return 0


def cmd_describe_metadata_engine(args: argparse.Namespace) -> int:
    """Print the metadata engine in effect and where its setting comes from (as ``lustrefs.engine`` decides)."""
    setting = records.metadata_engine(DESCRIBE_ENGINE)
    path = records.home_dir() / engine.CONFIG_FILE
    view = _engine_view(setting)
    if os.environ.get("LUSTREFS_METADATA_ENGINE"):
        view["Source"] = "environment"
    elif path.exists():
        view.update(Source="file", ConfigFile=str(path))
    else:
        view["Source"] = "default"
    _print_json({"MetadataEngine": view})
    return 0


# --------------------------------------------------------------------------------- HSM commands (as lfs)


def cmd_hsm(args: argparse.Namespace) -> int:
    """``lustrefs hsm_* FILE...``: one line per file as ``lfs`` prints it; errors on stderr, exit 1 if any."""
    verb = args.command

    def one(path: str) -> tuple[str | None, str | None]:
        try:
            if verb == "hsm_state":
                return hsm.read_state(path), None
            if verb == "hsm_action":
                return hsm.read_action(path), None
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return None, f'error: "{path}" is not a regular file'
            hsm.request(path, verb)
            return None, None
        except OSError as exc:
            return None, _hsm_error(verb, path, exc)

    with ThreadPoolExecutor(max_workers=min(HSM_ACTIONS_AT_ONCE, len(args.files))) as pool:
        results = list(pool.map(one, args.files))  # archives run in parallel, as lfs requests do
    for out, err in results:
        if out is not None:
            print(out)
        if err is not None:
            print(err, file=sys.stderr)
    return 1 if any(err for _, err in results) else 0


def _hsm_error(verb: str, path: str, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if isinstance(exc, control_client.NotLustrefs):
        reason = "not a file of a lustrefs mount"
    if verb in ("hsm_state", "hsm_action"):
        return f"can't get hsm {verb.removeprefix('hsm_')} for {path}: {reason}"
    return f"Cannot send HSM request (use of {path}): {reason}"


# ------------------------------------------------------------------------------- data repository tasks


def cmd_create_data_repository_task(args: argparse.Namespace) -> int:
    request = _request(
        Type=args.type,
        FileSystemId=args.file_system_id,
        Paths=args.paths,
        Report=args.report,
        ReleaseConfiguration=args.release_configuration,
        Tags=_flatten(args.tags),
    )
    result = tasks.create_data_repository_task(request)
    if args.wait:
        task = result["DataRepositoryTask"]
        try:
            final = tasks.wait_for_task(task["FileSystemId"], task["TaskId"], _progress_bar(sys.stderr))
        except KeyboardInterrupt:
            _still_running(task["TaskId"], sys.stderr)
            return EXIT_INTERRUPTED
        result = {"DataRepositoryTask": tasks.public(final)}
        _print_json(result)
        return 0 if final["Lifecycle"] == "SUCCEEDED" else 1  # --wait: a task that did not succeed fails
    _print_json(result)
    return 0


def _still_running(task_id: str, stream: TextIO) -> None:
    """After Ctrl-C during ``--wait``: the task is the daemon's, not this command's; say how to reach it."""
    stream.write(
        f"\nInterrupted: data repository task {task_id} keeps running in the file system's daemon.\n"
        f"  Follow it:  lustrefs describe-data-repository-tasks --task-ids {task_id}\n"
        f"  Cancel it:  lustrefs cancel-data-repository-task --task-id {task_id}\n"
    )
    stream.flush()


def _progress_bar(stream: TextIO, width: int = 30) -> Callable[[dict[str, Any]], None]:
    """A function drawing a task's progress on ``stream`` (only on a terminal)."""
    if not stream.isatty():
        return lambda task: None

    def draw(task: dict[str, Any]) -> None:
        status = task["Status"]
        total, failed = status["TotalCount"], status["FailedCount"]
        done = status["SucceededCount"] + failed
        ended = task["Lifecycle"] not in tasks.ACTIVE
        filled = width if ended else width * done // total if total else 0
        bar = "#" * filled + "-" * (width - filled)
        stream.write(f"\r{task['TaskId']} {task['Lifecycle']:<9} [{bar}] {done}/{total} files, {failed} failed")
        stream.write("\n" if ended else "")
        stream.flush()

    return draw


def cmd_describe_data_repository_tasks(args: argparse.Namespace) -> int:
    _print_json(tasks.describe_data_repository_tasks(args.task_ids, _flatten(args.filters)))
    return 0


def cmd_cancel_data_repository_task(args: argparse.Namespace) -> int:
    _print_json(tasks.cancel_data_repository_task(args.task_id))
    return 0


# ------------------------------------------------------------------------------------------ seeing inside


def cmd_stats(args: argparse.Namespace) -> int:
    """``lustrefs stats MOUNTPOINT [--json]``: the daemon's counters, asked of the mount root."""
    try:
        snapshot = control_client.request(args.mountpoint, "stats")
    except OSError as exc:
        not_root = isinstance(exc, control_client.NotLustrefs) or (
            isinstance(exc, control_client.ControlError) and exc.errno == errno.ENOTSUP  # a directory of the mount
        )
        reason = "not the root of a lustrefs mount" if not_root else exc.strerror
        print(f"lustrefs stats: {args.mountpoint}: {reason}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(snapshot)
    else:
        print(format_stats(snapshot, args.mountpoint))
    return 0


def format_stats(s: dict[str, Any], mountpoint: str) -> str:
    """The stats snapshot as a two-column table."""
    cache, imported = s["cache"], s.get("import") or {}
    hits, misses = cache["hits"], cache["misses"]
    rows = [
        ("File system", f"{s.get('file_system_id', '?')} mounted at {mountpoint}"),
        ("Lifecycle", imported.get("lifecycle", "AVAILABLE")),
        ("Cache", f"{_size(cache['used'])} used of {_size(cache['capacity'])}"),
        *((f"  {t['path']}", _size(t["used"])) for t in cache["targets"]),
        ("Hits / misses", f"{hits} / {misses} parts ({100 * hits / max(hits + misses, 1):.1f}% hits)"),
        ("Fetched", f"{_size(cache['bytes_fetched'])}, {cache['evictions']} parts evicted"),
        ("Requests", "  ".join(f"{kind} {n}" for kind, n in s["requests"].items())),
    ]
    if "dirty" in s:
        n = s["dirty"]["entries"]
        rows.append(("Not exported", f"{n} {'entry' if n == 1 else 'entries'}, {_size(s['dirty']['bytes'])} of data"))
        deletions = s["dirty"].get("deletions", 0)
        rows.append(("Not deleted in S3", f"{deletions} {'object' if deletions == 1 else 'objects'}"))
    rows.append(("Export queue", str(s.get("export_queue", 0))))
    if imported.get("last_poll"):
        when = datetime.fromtimestamp(imported["last_poll"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        rows.append(("Last poll", f"{when} ({imported.get('last_poll_seconds', 0):.2f} s)"))
    elif imported:
        rows.append(("Last poll", "never"))
    if "tasks" in s:
        rows.append(("Tasks", f"{s['tasks']['executing'] or 'none'} executing, {s['tasks']['pending']} pending"))
    if cluster := s.get("cluster"):
        rows.append(("Cluster", f"host {cluster['host']}, {'leader' if cluster['leading'] else 'follower'}"))
    if queue := s.get("event_queue"):
        error = f", last error: {queue['last_error']}" if queue.get("last_error") else ""
        applied, dropped = queue["events_applied"], queue["foreign_dropped"]
        rows.append(("Event queue", f"{applied} events applied, {dropped} messages dropped{error}"))
    rows.append(("Inodes", str(s["inodes"])))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_since(text: str) -> datetime:
    """``--since``: an ISO 8601 time (UTC unless it says otherwise) or a time ago, e.g. ``-10m``, ``-2h``."""
    m = re.fullmatch(r"-(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m:
        return datetime.now(UTC) - timedelta(seconds=float(m[1]) * SINCE_UNITS[m[2]])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time or -<n>s|m|h|d: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def cmd_describe_events(args: argparse.Namespace) -> int:
    """Print the file system's event log (JSON lines), from ``--since`` on."""
    records.load_record(args.file_system_id, "DescribeEvents")
    path = records.fs_path(args.file_system_id, "DescribeEvents") / "events.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in lines:
        try:
            when = datetime.fromisoformat(json.loads(line)["time"])
        except (ValueError, KeyError, TypeError):
            continue
        if args.since is None or (when if when.tzinfo else when.replace(tzinfo=UTC)) >= args.since:
            print(line)
    return 0


# --------------------------------------------------------------------------------------------- parser


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--endpoint-url", default=default, help="override the S3 endpoint URL")
    parser.add_argument("--region", default=default, help="the AWS Region")
    parser.add_argument("--profile", default=default, help="a profile from the AWS config/credentials files")


def build_parser() -> Parser:
    """The ``lustrefs`` argument parser (global options are accepted before or after the command)."""
    parser = Parser(prog="lustrefs", description="FSx for Lustre style file systems linked to S3 buckets.")
    _global_options(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    Command = Callable[[argparse.Namespace], int]

    def command(name: str, help_text: str, func: Command) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func)
        return p

    p = command("create-file-system", "Create a file system linked to an S3 bucket.", cmd_create_file_system)
    p.add_argument("--file-system-type", required=True, help="LUSTRE")
    p.add_argument("--storage-capacity", type=int, help="storage capacity in GiB")
    p.add_argument("--lustre-configuration", type=parse_structure, help="shorthand k=v,... or JSON")
    p.add_argument("--tags", nargs="+", type=parse_structure_list_item, help="Key=k,Value=v ... or JSON list")
    p.add_argument("--client-request-token", help="idempotency token")
    p.add_argument("--subnet-ids", nargs="+", help="accepted and stored, not used")
    p.add_argument("--security-group-ids", nargs="+", help="accepted and stored, not used")
    p.add_argument("--file-system-type-version", help="accepted and stored, not used")
    p.add_argument("--storage-type", help="accepted and stored, not used")

    p = command("describe-file-systems", "Describe file systems.", cmd_describe_file_systems)
    p.add_argument("--file-system-ids", nargs="+", metavar="ID")
    p.add_argument("--max-results", type=int)
    p.add_argument("--next-token")

    p = command("update-file-system", "Change a file system's updatable settings.", cmd_update_file_system)
    p.add_argument("--file-system-id", required=True)
    p.add_argument("--lustre-configuration", type=parse_structure, required=True, help="shorthand or JSON")

    p = command("delete-file-system", "Delete a file system and its local state.", cmd_delete_file_system)
    p.add_argument("--file-system-id", required=True)

    p = command(
        "create-data-repository-association",
        "Link a directory of a file system to an S3 bucket or prefix.",
        cmd_create_data_repository_association,
    )
    p.add_argument("--file-system-id", required=True)
    p.add_argument("--file-system-path", help="the directory in the file system, e.g. /ns1")
    p.add_argument("--data-repository-path", required=True, help="s3://bucket[/prefix]")
    p.add_argument("--batch-import-meta-data-on-create", action=argparse.BooleanOptionalAction)
    p.add_argument("--imported-file-chunk-size", type=int, help="MiB, 1 to 512000 (default 1024)")
    p.add_argument("--s3", type=parse_structure, help="'AutoImportPolicy={Events=[...]},AutoExportPolicy=…' or JSON")
    p.add_argument("--client-request-token", help="idempotency token")
    p.add_argument("--tags", nargs="+", type=parse_structure_list_item, help="Key=k,Value=v ... or JSON list")

    p = command(
        "describe-data-repository-associations",
        "Describe data repository associations.",
        cmd_describe_data_repository_associations,
    )
    p.add_argument("--association-ids", nargs="+", metavar="ID")
    p.add_argument("--filters", nargs="+", type=parse_structure_list_item, help="Name=file-system-id,Values=fs-…")
    p.add_argument("--max-results", type=int)
    p.add_argument("--next-token")

    p = command(
        "update-data-repository-association",
        "Change a data repository association's chunk size or S3 policies.",
        cmd_update_data_repository_association,
    )
    p.add_argument("--association-id", required=True)
    p.add_argument("--client-request-token", help="idempotency token")
    p.add_argument("--imported-file-chunk-size", type=int, help="MiB, 1 to 512000")
    p.add_argument("--s3", type=parse_structure, help="'AutoImportPolicy={Events=[...]},AutoExportPolicy=…' or JSON")

    p = command(
        "delete-data-repository-association",
        "Unlink a data repository association (its data stays in the file system unless deleted).",
        cmd_delete_data_repository_association,
    )
    p.add_argument("--association-id", required=True)
    p.add_argument("--client-request-token", help="idempotency token")
    p.add_argument("--delete-data-in-file-system", action=argparse.BooleanOptionalAction)

    p = command(
        "configure-metadata-engine",
        "Set this host's metadata engine: SQLite (one host) or a cluster's PostgreSQL database.",
        cmd_configure_metadata_engine,
    )
    p.add_argument("--engine", required=True, choices=engine.ENGINES)
    p.add_argument("--conninfo", help="postgresql: a libpq connection string or URI (default: libpq's environment)")

    command(
        "describe-metadata-engine",
        "Show this host's metadata engine and where the setting comes from.",
        cmd_describe_metadata_engine,
    )

    p = command("mount", "Mount a file system with the FUSE daemon.", cmd_mount)
    p.add_argument("fs_id", metavar="FS_ID")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-o", dest="options", metavar="OPTS", help="comma-separated mount options")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground")

    p = command("umount", "Unmount a lustrefs mount point.", cmd_umount)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")

    for name, help_text in zip(
        HSM_COMMANDS,
        (
            "Print the HSM state of files (as lfs hsm_state).",
            "Print the HSM action in progress on files (as lfs hsm_action).",
            "Export files to S3 now and wait for it (as lfs hsm_archive).",
            "Drop the cached data of exported, unchanged files (as lfs hsm_release).",
            "Fetch the data of released files in the background (as lfs hsm_restore).",
        ),
        strict=True,
    ):
        p = command(name, help_text, cmd_hsm)
        p.add_argument("files", nargs="+", metavar="FILE")

    p = command(
        "create-data-repository-task",
        "Export, import or release data in the background (the file system must be mounted).",
        cmd_create_data_repository_task,
    )
    p.add_argument("--file-system-id", required=True)
    p.add_argument("--type", required=True, help=" | ".join(tasks.TYPES))
    p.add_argument("--paths", nargs="+", metavar="PATH", help="paths in the file system (import: s3:// URIs)")
    p.add_argument("--report", type=parse_structure, required=True, help="Enabled=true,Path=s3://…,Format=…,Scope=…")
    p.add_argument("--release-configuration", type=parse_structure, help="JSON: DurationSinceLastAccess")
    p.add_argument("--tags", nargs="+", type=parse_structure_list_item, help="Key=k,Value=v ... or JSON list")
    p.add_argument("--wait", action="store_true", help="wait for the end (progress on a terminal's stderr)")

    p = command("describe-data-repository-tasks", "Describe data repository tasks.", cmd_describe_data_repository_tasks)
    p.add_argument("--task-ids", nargs="+", metavar="ID")
    p.add_argument("--filters", nargs="+", type=parse_structure_list_item, help="Name=file-system-id,Values=fs-…")

    p = command("cancel-data-repository-task", "Cancel a pending or running task.", cmd_cancel_data_repository_task)
    p.add_argument("--task-id", required=True)

    p = command("stats", "Show a mount's cache, requests, dirty data and import state.", cmd_stats)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print the JSON snapshot")

    p = command("describe-events", "Print a file system's event log (JSON lines).", cmd_describe_events)
    p.add_argument("--file-system-id", required=True)
    p.add_argument("--since", type=parse_since, help="ISO 8601 time or a time ago such as -10m, -2h, -1d")
    return parser


def _run(func: Callable[[], int], service_exit: int) -> int:
    """Run a command; errors print like the AWS CLI (blank line, then the message) on stderr."""
    try:
        return func()
    except FsxError as e:
        print(f"\n{e}", file=sys.stderr)
        return service_exit
    except botocore.exceptions.BotoCoreError as e:  # e.g. an unknown --profile
        print(f"\n{e}", file=sys.stderr)
        return EXIT_OTHER_ERROR


def _attach_since(argv: Sequence[str]) -> list[str]:
    """``--since -10m`` as ``--since=-10m``: argparse would take a value starting with '-' for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--since" and arg.startswith("-"):
            out[-1] = f"--since={arg}"
        else:
            out.append(arg)
    return out


def _as_a_tool(func: Callable[[], int]) -> int:
    """Run a whole command the way Unix tools end: a closed stdout (``lustrefs … | head -1``) ends it quietly
    with 141, as SIGPIPE ends coreutils; Ctrl-C ends it with 130. Neither prints a traceback."""
    try:
        rc = func()
        sys.stdout.flush()  # here, not at the interpreter's exit, where a failure is reported but not caught
        return rc
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        with contextlib.suppress(OSError, ValueError):
            print(file=sys.stderr)  # past the ^C the terminal echoed
        return EXIT_INTERRUPTED


def _drop_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for the closed pipe is discarded at exit, silently."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # not a file (tests): nothing is flushed at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lustrefs`` console script."""

    def command() -> int:
        try:
            args = build_parser().parse_args(_attach_since(sys.argv[1:] if argv is None else argv))
        except SystemExit as e:  # --help (0) and usage errors (252)
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        return _run(lambda: args.func(args), EXIT_SERVICE_ERROR)

    return _as_a_tool(command)


# ------------------------------------------------------------------------------------ mount(8) helper


def filter_mount_options(options: str | None) -> str | None:
    """Drop mount(8)'s generic options (``defaults``, ``_netdev``, ``x-*``…; ``ro`` stays); None if empty."""
    kept = [
        opt
        for opt in (o.strip() for o in (options or "").split(","))
        if opt and opt not in GENERIC_MOUNT_OPTIONS and not opt.startswith(("comment=", "x-", "_"))
    ]
    return ",".join(kept) or None


def mount_helper_main(argv: Sequence[str] | None = None) -> int:
    """``mount.lustrefs FS_ID MOUNTPOINT [-o OPTS] [-s] [-f] [-n] [-v] [-N ns] [-t type]`` (mount(8) helper).

    ``-f`` (fake) does everything but the mount; ``-s``, ``-n``, ``-N`` and ``-t`` are accepted and ignored.
    """
    return _as_a_tool(lambda: _mount_helper(argv))


def _mount_helper(argv: Sequence[str] | None) -> int:
    parser = MountParser(prog="mount.lustrefs", description="mount(8) helper for lustrefs file systems.")
    parser.add_argument("fs_id", metavar="FS_ID")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument("-o", dest="options", action="append", metavar="OPTS")
    parser.add_argument("-s", action="store_true", help="sloppy: tolerate unknown options (ignored)")
    parser.add_argument("-f", dest="fake", action="store_true", help="fake: do everything but the mount")
    parser.add_argument("-n", action="store_true", help="do not write /etc/mtab (ignored)")
    parser.add_argument("-v", dest="verbose", action="store_true", help="verbose")
    parser.add_argument("-N", dest="namespace", help="mount namespace (ignored)")
    parser.add_argument("-t", dest="type", help="file system type (ignored)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else MOUNT_EXIT_USAGE
    options = filter_mount_options(",".join(args.options or []))
    if args.verbose:
        print(f"mount.lustrefs: mounting {args.fs_id} on {args.mountpoint} (options: {options or '-'})")
    if args.fake:
        return 0

    def mount_it() -> int:
        return mount.mount(
            args.fs_id,
            args.mountpoint,
            options=options,
            foreground=False,
            endpoint_url=None,
            region=None,
            profile=None,
        )

    return _run(mount_it, MOUNT_EXIT_FAILURE)


if __name__ == "__main__":
    sys.exit(main())
