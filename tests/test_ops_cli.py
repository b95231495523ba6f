"""Operations commands: HSM output formats, task requests and reports, stats, the event log, fstab options."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import MotoEndpoint, create_fs, run_cli

from lustrefs import options, records, task_records
from lustrefs.client import cli
from lustrefs.client import hsm as hsm_cli
from lustrefs.daemon import hsm, tasks

REPORT = "Enabled=true,Path=s3://{bucket}/exp/reports,Format=REPORT_CSV_20191124,Scope=FAILED_FILES_ONLY"


# ------------------------------------------------------------------------------------------- HSM formats


@pytest.mark.parametrize(
    ("flags", "archive_id", "line"),
    [
        (0x0D, 1, "/mnt/fsx/a: (0x0000000d) released exists archived, archive_id:1"),
        (0x09, 1, "/mnt/fsx/a: (0x00000009) exists archived, archive_id:1"),
        (0x0B, 1, "/mnt/fsx/a: (0x0000000b) exists dirty archived, archive_id:1"),
        (0x00, 0, "/mnt/fsx/a: (0x00000000)"),
        (0x7D, 3, "/mnt/fsx/a: (0x0000007d) released exists archived never_release never_archive lost_from_hsm,"
                  " archive_id:3"),
    ],
)  # fmt: skip
def test_hsm_state_lines_are_lustre_s(flags: int, archive_id: int, line: str) -> None:
    assert hsm_cli.format_state("/mnt/fsx/a", flags, archive_id) == line


def test_hsm_action_lines_are_lustre_s() -> None:
    assert hsm_cli.format_action("/f", "NOOP") == "/f: NOOP"
    assert hsm_cli.format_action("/f", "RESTORE", "running", 1048576) == "/f: RESTORE running (1048576 bytes moved)"
    assert hsm_cli.format_action("/f", "ARCHIVE", "waiting") == "/f: ARCHIVE waiting (from 0 to EOF)"


def test_hsm_commands_leave_other_file_systems_alone(tmp_path: Path) -> None:
    f = tmp_path / "plain.txt"
    f.write_bytes(b"x")
    assert run_cli("hsm_archive", str(f)) == (
        1,
        "",
        f"Cannot send HSM request (use of {f}): not a file of a lustrefs mount\n",
    )
    assert run_cli("hsm_state", str(f)) == (1, "", f"can't get hsm state for {f}: not a file of a lustrefs mount\n")
    assert os.listxattr(f) == []  # nothing was set on it


def row(**kw: Any) -> SimpleNamespace:
    """An inode row as flags_of reads it (attributes)."""
    base = {"mode": stat.S_IFREG | 0o644, "dirty": 0, "etag": "e", "exported_key": None, "key": "k", "size": 10}
    return SimpleNamespace(**(base | kw))


@pytest.mark.parametrize(
    ("entry", "cached", "flags"),
    [
        (row(), 0, 0x0D),  # imported, not read
        (row(), 4, 0x09),  # some data cached
        (row(dirty=1), 4, 0x0B),  # changed since
        (row(dirty=3, etag=None, key=""), 4, 0x03),  # new, never exported
        (row(size=0), 0, 0x09),  # nothing to release in an empty file
        (row(mode=stat.S_IFDIR | 0o755, etag=None, key="d/"), 0, 0x09),
    ],
)
def test_flags_follow_fsx(entry: SimpleNamespace, cached: int, flags: int) -> None:
    assert hsm.flags_of(entry, cached) == flags  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- completion report


def test_report_csv_is_encoded_as_fsx_documents() -> None:
    failures = [
        ("dir1/myLargeFile", "FileSizeTooLarge"),
        ("@filename.txt", "S3AccessDenied"),
        ("file,name.txt", "PathSizeTooLong"),
        ('file"name.txt', "PathSizeTooLong"),
    ]
    assert tasks.report_csv(failures).decode().splitlines() == [
        "dir1/myLargeFile,failed,FileSizeTooLarge",
        '"""@filename.txt""",failed,S3AccessDenied',
        '"file,name.txt",failed,PathSizeTooLong',
        '"file""name.txt",failed,PathSizeTooLong',
    ]


# ------------------------------------------------------------------------------------ task requests (CLI)


@pytest.fixture
def fs(moto: MotoEndpoint, bucket: str, home: Path) -> str:
    return create_fs(moto, f"s3://{bucket}/in", ExportPath=f"s3://{bucket}/exp")


def create(fs_id: str, *argv: str) -> tuple[int, str, str]:
    return run_cli("create-data-repository-task", "--file-system-id", fs_id, *argv)


@pytest.mark.parametrize(
    ("argv", "code", "fragment"),
    [
        (["--type", "EXPORT_TO_REPOSITORY", "--report", "Enabled=false"], "BadRequest", "is not mounted"),
        (["--type", "EXPORT", "--report", "Enabled=false"], "BadRequest", "Invalid Type 'EXPORT'"),
        (["--type", "AUTO_RELEASE_DATA", "--report", "Enabled=false"], "BadRequest", "Amazon File Cache"),
        (["--type", "EXPORT_TO_REPOSITORY", "--report", "Enabled=true"], "BadRequest", "Report.Path is required"),
        (["--type", "EXPORT_TO_REPOSITORY", "--report", REPORT.replace("/exp/", "/in/")], "BadRequest",
         "must be located within the file system's ExportPath"),
        (["--type", "EXPORT_TO_REPOSITORY", "--report", REPORT.replace("FAILED_FILES_ONLY", "ALL")], "BadRequest",
         "the only scope is FAILED_FILES_ONLY"),
        (["--type", "EXPORT_TO_REPOSITORY", "--report", REPORT.replace("_20191124", "")], "BadRequest",
         "the only format is REPORT_CSV_20191124"),
        (["--type", "IMPORT_METADATA_FROM_REPOSITORY", "--paths", "in/a", "--report", "Enabled=false"],
         "BadRequest", "are S3 URIs"),
        (["--type", "RELEASE_DATA_FROM_FILESYSTEM", "--paths", "s3://b/in", "--report", "Enabled=false"],
         "BadRequest", "is an S3 URI"),
    ],
)  # fmt: skip
def test_create_task_errors(fs: str, bucket: str, argv: list[str], code: str, fragment: str) -> None:
    rc, out, err = create(fs, *(a.format(bucket=bucket) for a in argv))
    assert (rc, out) == (254, "")
    assert f"({code}) when calling the CreateDataRepositoryTask operation" in err and fragment in err


def test_create_task_for_unknown_file_system(home: Path) -> None:
    rc, _, err = create("fs-00000000000000000", "--type", "EXPORT_TO_REPOSITORY", "--report", "Enabled=false")
    assert rc == 254 and "(FileSystemNotFound)" in err


def test_describe_and_cancel_without_a_daemon(fs: str) -> None:
    now = round(time.time(), 3)
    task = {
        "TaskId": "task-0123456789abcdef0", "Lifecycle": "PENDING", "Type": task_records.RELEASE, "CreationTime": now,
        "FileSystemId": fs, "Paths": [], "Report": {"Enabled": False},
        "Status": {"TotalCount": 0, "SucceededCount": 0, "FailedCount": 0, "LastUpdatedTime": now},
    }  # fmt: skip
    task_records.save_task(task)
    rc, out, _ = run_cli("describe-data-repository-tasks", "--filters", f"Name=file-system-id,Values={fs}")
    assert json.loads(out) == {"DataRepositoryTasks": [task]}
    rc, out, _ = run_cli("describe-data-repository-tasks", "--filters", "Name=task-lifecycle,Values=SUCCEEDED,FAILED")
    assert json.loads(out) == {"DataRepositoryTasks": []}
    rc, out, err = run_cli("cancel-data-repository-task", "--task-id", task["TaskId"])
    assert json.loads(out) == {"Lifecycle": "CANCELED", "TaskId": task["TaskId"]}
    assert task_records.load_task(fs, task["TaskId"])["EndTime"] >= now  # type: ignore[index]
    rc, _, err = run_cli("cancel-data-repository-task", "--task-id", task["TaskId"])
    assert rc == 254 and "(DataRepositoryTaskEnded)" in err


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["describe-data-repository-tasks", "--task-ids", "task-00000000000000000"], "DataRepositoryTaskNotFound"),
        (["describe-data-repository-tasks", "--filters", "Name=owner,Values=x"], "BadRequest"),
        (["describe-data-repository-tasks", "--filters", "Name=file-system-id,Values=fs-00000000000000000"],
         "FileSystemNotFound"),
        (["cancel-data-repository-task", "--task-id", "task-00000000000000000"], "DataRepositoryTaskNotFound"),
    ],
)  # fmt: skip
def test_describe_and_cancel_errors(fs: str, argv: list[str], code: str) -> None:
    rc, _, err = run_cli(*argv)
    assert rc == 254 and f"({code})" in err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_wait_draws_a_progress_bar_only_on_a_terminal() -> None:
    task = {"TaskId": "task-1", "Lifecycle": "EXECUTING", "Status": {"TotalCount": 4, "SucceededCount": 1,
            "FailedCount": 1}}  # fmt: skip
    terminal = Terminal()
    draw = cli._progress_bar(terminal, width=8)
    draw(task)
    draw({**task, "Lifecycle": "FAILED", "Status": {"TotalCount": 4, "SucceededCount": 3, "FailedCount": 1}})
    assert terminal.getvalue() == (
        "\rtask-1 EXECUTING [####----] 2/4 files, 1 failed\rtask-1 FAILED    [########] 4/4 files, 1 failed\n"
    )
    piped = io.StringIO()
    cli._progress_bar(piped)(task)
    assert piped.getvalue() == ""


# ---------------------------------------------------------------------------------------------- the event log


def test_describe_events_filters_by_time(fs: str) -> None:
    now = datetime.now(UTC)
    lines = [
        json.dumps({"time": (now - timedelta(hours=h)).strftime("%Y-%m-%dT%H:%M:%SZ"), "code": f"E{h}"})
        for h in (30, 2, 0)
    ]
    (records.fs_dir(fs) / "events.jsonl").write_text("\n".join(lines) + "\n")
    rc, out, _ = run_cli("describe-events", "--file-system-id", fs)
    assert (rc, out.splitlines()) == (0, lines)
    assert run_cli("describe-events", "--file-system-id", fs, "--since", "-3h")[1].splitlines() == lines[1:]
    assert run_cli("describe-events", "--file-system-id", fs, "--since", "-10m")[1].splitlines() == lines[2:]
    since = (now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert run_cli("describe-events", "--file-system-id", fs, "--since", since)[1].splitlines() == lines[1:]
    assert run_cli("describe-events", "--file-system-id", fs, "--since", "yesterday")[0] == 252
    assert run_cli("describe-events", "--file-system-id", "fs-00000000000000000")[0] == 254


def test_parse_since() -> None:
    assert cli.parse_since("2024-05-01T10:00:00Z") == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert cli.parse_since("2024-05-01") == datetime(2024, 5, 1, tzinfo=UTC)
    assert cli.parse_since("2024-05-01T12:00:00+02:00") == datetime(2024, 5, 1, 10, tzinfo=UTC)
    ago = datetime.now(UTC) - cli.parse_since("-90s")
    assert timedelta(seconds=89) < ago < timedelta(seconds=100)


# -------------------------------------------------------------------------------------------- fstab options


@pytest.mark.parametrize(
    ("fstab_options", "daemon_options"),
    [
        ("defaults,_netdev,nofail", None),
        ("defaults,noatime,nodiratime,nosuid,x-systemd.automount,x-systemd.idle-timeout=60", None),
        ("defaults,nosuid,nodev", "nodev"),  # nodev is kept: no device node comes from S3
        ("rw,relatime,allow_other,cache_size=10", "allow_other,cache_size=10"),
        ("ro,_netdev,uid=1000,comment=systemd.automount", "ro,uid=1000"),
    ],
)
def test_fstab_options_reach_the_daemon_as_lustrefs_options(fstab_options: str, daemon_options: str | None) -> None:
    line = f"fs-0123456789abcdef0 /mnt/fsx lustrefs {fstab_options} 0 0"
    kept = cli.filter_mount_options(line.split()[3])
    assert kept == daemon_options
    options.parse_options(kept)  # all accepted


@pytest.mark.parametrize("guarantee", ["noexec", "sync"])
def test_fstab_options_that_cannot_be_honoured_are_refused(guarantee: str) -> None:
    kept = cli.filter_mount_options(f"defaults,{guarantee}")
    assert kept == guarantee
    with pytest.raises(options.OptionError, match=f"unknown mount option '{guarantee}'"):
        options.parse_options(kept)


# --------------------------------------------------------------------------------------------------- stats


@pytest.mark.fuse
def test_stats_table_and_json(s3: Any, bucket: str, mounter: Any, tmp_path: Path) -> None:
    s3.put_object(Bucket=bucket, Key="a.bin", Body=b"a" * 3000)
    m = mounter(f"s3://{bucket}", options="export_delay=3600")
    assert (m.path / "a.bin").read_bytes() == b"a" * 3000
    (m.path / "new.txt").write_bytes(b"12345")
    rc, out, err = run_cli("stats", str(m.path), "--json")
    assert rc == 0, err
    snapshot = json.loads(out)
    assert snapshot["file_system_id"] == m.fs_id
    assert snapshot["dirty"] == {"entries": 1, "bytes": 5, "deletions": 0}
    assert snapshot["cache"]["bytes_fetched"] == 3000 and snapshot["requests"]["GET"] >= 1
    assert snapshot["tasks"] == {"executing": None, "pending": 0}

    rc, out, err = run_cli("stats", str(m.path))
    assert rc == 0, err
    table = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines())
    assert table["File system"] == f"{m.fs_id} mounted at {m.path}"
    assert table["Lifecycle"] == "AVAILABLE"
    assert table["Cache"] == "2.9 KiB used of 1.2 TiB"
    assert table["Hits / misses"] == "0 / 1 parts (0.0% hits)"
    assert table["Not exported"] == "1 entry, 5 B of data"
    assert table["Not deleted in S3"] == "0 objects"
    assert table["Export queue"] == "1"
    assert f"GET {snapshot['requests']['GET']}" in table["Requests"]
    assert table["Tasks"] == "none executing, 0 pending"

    rc, _, err = run_cli("stats", str(tmp_path))
    assert rc == 1 and err == f"lustrefs stats: {tmp_path}: not the root of a lustrefs mount\n"


def test_stats_table_shows_the_cluster_role_and_the_event_queue() -> None:
    from lustrefs.client.cli import format_stats

    snapshot = {
        "file_system_id": "fs-0123456789abcdef0",
        "cache": {"hits": 0, "misses": 0, "used": 0, "capacity": 1, "targets": [], "bytes_fetched": 0, "evictions": 0},
        "requests": {"GET": 0},
        "inodes": 1,
        "cluster": {"host": "node7:ab12", "leading": False},
        "event_queue": {"events_applied": 12, "foreign_dropped": 1, "last_error": "NonExistentQueue"},
    }
    table = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in format_stats(snapshot, "/m").splitlines())
    assert table["Cluster"] == "host node7:ab12, follower"
    assert table["Event queue"] == "12 events applied, 1 messages dropped, last error: NonExistentQueue"
