"""Hardening of the command line: ids that could name paths, the state directory's mode, control characters in
the daemon log, a closed stdout and Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import LUSTREFS, run_cli, wait_for

from lustrefs import records, task_records
from lustrefs.daemon import process as daemon
from lustrefs.errors import FsxError

FS_ID = "fs-0123456789abcdef0"
TASK_ID = "task-0123456789abcdef0"
BAD_FS_IDS = [
    "../victim",
    f"{FS_ID}/../../victim",
    f"../{FS_ID}/mount",
    f"{FS_ID}\n",
    "FS-0123456789ABCDEF0",
    "fs-0123456789abcdef",  # 16 digits
    "fs-0123456",  # 7 digits
    "",
]
BAD_TASK_IDS = ["../victim", f"{TASK_ID}/../x", f"{TASK_ID}\n", "task-0123"]
SIGPIPE_EXIT = 128 + signal.SIGPIPE
SIGINT_EXIT = 128 + signal.SIGINT


def save_fs(fs_id: str = FS_ID) -> None:
    """A minimal record: enough for the commands that only read records and local files."""
    records.save_record({"FileSystemId": fs_id, "CreationTime": 1.0, "LustreConfiguration": {}})


def assert_fsx_error(rc: int, out: str, err: str, code: str, operation: str) -> None:
    """The command failed as the AWS CLI reports an FSx error, and printed no traceback."""
    assert (rc, out) == (254, ""), err
    assert err.startswith(f"\nAn error occurred ({code}) when calling the {operation} operation: "), err


# ----------------------------------------------------------------------------------------- file system ids


def test_delete_leaves_a_directory_outside_the_home_alone(home: Path) -> None:
    victim = home.parent / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    records.home_dir()
    (home / "victim.json").write_text("{}")  # what '../victim' names as a record: filesystems/../victim.json
    rc, out, err = run_cli("delete-file-system", "--file-system-id", "../victim")
    assert_fsx_error(rc, out, err, "BadRequest", "DeleteFileSystem")
    assert "fs- followed by 8 or 17" in err
    assert (victim / "precious.txt").read_text() == "keep me"
    assert (home / "victim.json").exists()


def test_describe_of_a_path_into_the_state_directory_is_an_fsx_error(home: Path, fake_daemon: Any) -> None:
    fake_daemon(FS_ID, "/mnt/fsx")  # writes <home>/<fs-id>/mount.json, a JSON file without a FileSystemId
    rc, out, err = run_cli("describe-file-systems", "--file-system-ids", f"../{FS_ID}/mount")
    assert_fsx_error(rc, out, err, "BadRequest", "DescribeFileSystems")


@pytest.mark.parametrize("bad", BAD_FS_IDS)
@pytest.mark.parametrize(
    ("argv", "operation"),
    [
        (["describe-file-systems", "--file-system-ids", "{id}"], "DescribeFileSystems"),
        (["update-file-system", "--file-system-id", "{id}", "--lustre-configuration", "AutoImportPolicy=NEW"],
         "UpdateFileSystem"),
        (["delete-file-system", "--file-system-id", "{id}"], "DeleteFileSystem"),
        (["describe-events", "--file-system-id", "{id}"], "DescribeEvents"),
        (["create-data-repository-task", "--file-system-id", "{id}", "--type", "EXPORT_TO_REPOSITORY", "--report",
          "Enabled=false"], "CreateDataRepositoryTask"),
        (["describe-data-repository-tasks", "--filters", '[{"Name": "file-system-id", "Values": ["{id}"]}]'],
         "DescribeDataRepositoryTasks"),
    ],
)  # fmt: skip
def test_malformed_file_system_ids_are_refused(home: Path, bad: str, argv: list[str], operation: str) -> None:
    save_fs()
    (home / ".control.lock").touch()
    before = sorted(p.relative_to(home.parent) for p in home.parent.rglob("*"))
    rc, out, err = run_cli(*(a.replace('"{id}"', json.dumps(bad)).replace("{id}", bad) for a in argv))
    assert_fsx_error(rc, out, err, "BadRequest", operation)
    assert sorted(p.relative_to(home.parent) for p in home.parent.rglob("*")) == before  # nothing created


@pytest.mark.parametrize("bad", BAD_TASK_IDS)
@pytest.mark.parametrize(
    ("argv", "operation"),
    [
        (["describe-data-repository-tasks", "--task-ids", "{id}"], "DescribeDataRepositoryTasks"),
        (["cancel-data-repository-task", "--task-id", "{id}"], "CancelDataRepositoryTask"),
    ],
)
def test_malformed_task_ids_are_refused(home: Path, bad: str, argv: list[str], operation: str) -> None:
    save_fs()
    rc, out, err = run_cli(*(a.replace("{id}", bad) for a in argv))
    assert_fsx_error(rc, out, err, "BadRequest", operation)


def test_record_helpers_refuse_malformed_ids(home: Path) -> None:
    for bad in BAD_FS_IDS:
        for call in (records.fs_dir, records.load_record, records.mount_state, records.delete_record):
            with pytest.raises(FsxError) as excinfo:
                call(bad)
            assert excinfo.value.code == "BadRequest"
    for bad in BAD_TASK_IDS:
        with pytest.raises(FsxError):
            task_records.load_task(FS_ID, bad)
    assert not (home / "filesystems").exists() or not list((home / "filesystems").iterdir())


def test_eight_and_seventeen_digit_ids_are_well_formed(home: Path) -> None:
    for fs_id in ("fs-01234567", FS_ID):
        with pytest.raises(FsxError) as excinfo:
            records.load_record(fs_id)
        assert excinfo.value.code == "FileSystemNotFound"
        save_fs(fs_id)
        assert records.load_record(fs_id)["FileSystemId"] == fs_id


def test_a_record_that_names_another_id_is_ignored(home: Path) -> None:
    save_fs()
    forged = home / "filesystems" / "fs-00000000000000000.json"
    forged.write_text(json.dumps({"FileSystemId": "../victim", "CreationTime": 2.0}))
    assert [r["FileSystemId"] for r in records.list_records()] == [FS_ID]
    with pytest.raises(FsxError) as excinfo:
        records.load_record("fs-00000000000000000")
    assert excinfo.value.code == "FileSystemNotFound"


# ------------------------------------------------------------------------------------------ state directory


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_existing_state_directory_keeps_its_mode(home: Path) -> None:
    home.mkdir()
    os.chmod(home, 0o1777)  # LUSTREFS_HOME=/tmp
    save_fs()
    rc, _, err = run_cli("describe-events", "--file-system-id", FS_ID)
    assert rc == 0, err
    rc, _, err = run_cli("delete-file-system", "--file-system-id", FS_ID)
    assert rc == 0, err
    assert mode(home) == 0o1777
    assert mode(home / "filesystems") == 0o700


def test_a_missing_state_directory_is_created_private(home: Path) -> None:
    old = os.umask(0o277)  # even a umask that takes the owner's write bit does not make it unusable
    try:
        save_fs()
    finally:
        os.umask(old)
    assert mode(home) == 0o700
    assert mode(home / "filesystems") == 0o700
    assert mode(records.fs_dir(FS_ID)) == 0o700


def test_private_dir_never_changes_a_directory_it_did_not_create(tmp_path: Path) -> None:
    shared = tmp_path / "cache"
    shared.mkdir()
    os.chmod(shared, 0o755)
    assert records.private_dir(shared) == shared
    assert mode(shared) == 0o755
    assert mode(records.private_dir(shared / FS_ID)) == 0o700


# ---------------------------------------------------------------------------------------------- daemon log


@contextlib.contextmanager
def daemon_logging(path: Path) -> Iterator[Path]:
    """The daemon's logging set up by _setup_logging (called in the test, so that its stderr handler writes to
    what capsys captures then), restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        daemon._setup_logging("INFO", path)
        yield path
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved[0], saved[1]


def test_log_lines_escape_control_characters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("lustrefs.test")
    key = "a\r\n2024-01-01 00:00:00,000 ERROR lustrefs.daemon.fs: forged\x1b[2J\x00\x7f\x9b\u2028."
    with daemon_logging(tmp_path / "daemon.log") as logfile:
        log.warning("object %s changed", key)
        log.info("plain text stays: café ü 日本\ttab %d%% C:\\dir", 5)
    lines = logfile.read_text().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith(
        " WARNING lustrefs.test: object a\\r\\n2024-01-01 00:00:00,000 ERROR lustrefs.daemon.fs: forged"
        "\\x1b[2J\\x00\\x7f\\x9b\\u2028. changed"
    )
    assert lines[1].endswith(" INFO lustrefs.test: plain text stays: café ü 日本\ttab 5% C:\\dir")
    assert capsys.readouterr().err.splitlines() == lines  # the stderr handler formats the same way


def test_tracebacks_in_the_log_escape_the_exception_message(tmp_path: Path) -> None:
    log = logging.getLogger("lustrefs.test")
    with daemon_logging(tmp_path / "daemon.log") as logfile:
        try:
            raise ValueError("bad key k\n2024-01-01 00:00:00,000 ERROR forged\x1b]0;x\x07")
        except ValueError:
            log.exception("export of %s failed", "k\x1b")
    text = logfile.read_text()
    assert " ERROR lustrefs.test: export of k\\x1b failed\nTraceback (most recent call last):\n" in text
    assert text.endswith("ValueError: bad key k\\n2024-01-01 00:00:00,000 ERROR forged\\x1b]0;x\\x07\n")
    assert "\x1b" not in text and "\x07" not in text


# --------------------------------------------------------------------------------------------- closed stdout


def run_into_closed_pipe(*argv: str, read_first_line: bool = False) -> tuple[int, str, str]:
    """Run ``lustrefs ARGV`` with stdout into a pipe whose reader has gone (at once, or after one line)."""
    r, w = os.pipe()
    if not read_first_line:
        os.close(r)
    proc = subprocess.Popen([LUSTREFS, *argv], stdout=w, stderr=subprocess.PIPE, text=True)
    os.close(w)
    first = ""
    if read_first_line:
        with os.fdopen(r, "rb") as reader:  # like head -1: read one line, then close
            first = reader.readline().decode()
    _, err = proc.communicate(timeout=60)
    return proc.returncode, first, err


def write_events(n: int) -> list[str]:
    lines = [json.dumps({"time": "2024-05-01T10:00:00Z", "code": "E", "message": f"event {i}"}) for i in range(n)]
    (records.fs_dir(FS_ID) / "events.jsonl").write_text("\n".join(lines) + "\n")
    return lines


@pytest.mark.parametrize("read_first_line", [False, True])
def test_a_closed_stdout_ends_quietly(home: Path, read_first_line: bool) -> None:
    save_fs()
    lines = write_events(20_000)  # more than a pipe holds
    rc, first, err = run_into_closed_pipe("describe-events", "--file-system-id", FS_ID, read_first_line=read_first_line)
    assert (rc, err) == (SIGPIPE_EXIT, "")
    assert first == (lines[0] + "\n" if read_first_line else "")


def test_a_closed_stdout_ends_quietly_for_a_short_output(home: Path) -> None:
    save_fs()  # the output fits in stdout's buffer: the failure comes when it is flushed
    assert run_into_closed_pipe("describe-file-systems") == (SIGPIPE_EXIT, "", "")
    rc, _, err = run_into_closed_pipe("--help")  # argparse itself ignores the failed write of the help
    assert rc in (0, SIGPIPE_EXIT) and err == ""


@pytest.mark.fuse
def test_stats_into_a_closed_pipe(s3: Any, bucket: str, mounter: Any) -> None:
    m = mounter(f"s3://{bucket}")
    assert run_into_closed_pipe("stats", str(m.path)) == (SIGPIPE_EXIT, "", "")
    rc, first, err = run_into_closed_pipe("stats", str(m.path), "--json", read_first_line=True)
    assert (first, err) == ("{\n", "") and rc in (0, SIGPIPE_EXIT)  # the rest may fit in the pipe before it closes


# ------------------------------------------------------------------------------------------------- Ctrl-C


WRAPPER = """
import sys, json
from lustrefs.client import cli, control, tasks

task = json.loads(sys.argv[1])
marker = sys.argv[2]


def create(request):  # the daemon accepted the task (it stays PENDING: nothing runs it)
    tasks.save_task(task)
    return {"DataRepositoryTask": tasks.public(task)}


load_task = tasks.load_task


def watched_load_task(fs_id, task_id):
    open(marker, "a").close()  # the CLI is waiting now
    return load_task(fs_id, task_id)


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


tasks.create_data_repository_task = create
tasks.load_task = watched_load_task
control.describe_file_systems = interrupt
sys.exit(cli.main(sys.argv[3:]))
"""


def run_wrapped(tmp_path: Path, *argv: str) -> subprocess.Popen[str]:
    now = round(time.time(), 3)
    task = {
        "TaskId": TASK_ID, "Lifecycle": "PENDING", "Type": task_records.EXPORT, "CreationTime": now,
        "FileSystemId": FS_ID, "Paths": [], "Report": {"Enabled": False},
        "Status": {"TotalCount": 0, "SucceededCount": 0, "FailedCount": 0, "LastUpdatedTime": now},
    }  # fmt: skip
    argv_ = [sys.executable, "-c", WRAPPER, json.dumps(task), str(tmp_path / "waiting"), *argv]
    return subprocess.Popen(argv_, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_during_wait_says_the_task_keeps_running(home: Path, tmp_path: Path) -> None:
    save_fs()
    proc = run_wrapped(
        tmp_path, "create-data-repository-task", "--file-system-id", FS_ID, "--type", task_records.EXPORT,
        "--report", "Enabled=false", "--wait",
    )  # fmt: skip
    try:
        wait_for(lambda: (tmp_path / "waiting").exists() or proc.poll() is not None, 60, "the CLI to wait")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == SIGINT_EXIT, err
    assert out == ""
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"{TASK_ID} keeps running" in err
    assert f"lustrefs describe-data-repository-tasks --task-ids {TASK_ID}" in err
    assert f"lustrefs cancel-data-repository-task --task-id {TASK_ID}" in err
    assert task_records.load_task(FS_ID, TASK_ID)["Lifecycle"] == "PENDING"  # type: ignore[index]


def test_ctrl_c_anywhere_exits_130_without_a_traceback(home: Path, tmp_path: Path) -> None:
    proc = run_wrapped(tmp_path, "describe-file-systems")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == SIGINT_EXIT, err
    assert out == "" and "Traceback" not in err and "KeyboardInterrupt" not in err
