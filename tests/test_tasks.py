"""Data repository tasks through a real FUSE mount against moto's server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import MotoEndpoint, create_fs, mount_fs, run_cli, wait_for

from lustrefs import task_records
from lustrefs.daemon import tasks

pytestmark = pytest.mark.fuse
MIB = 1024 * 1024
NO_REPORT = "Enabled=false"


def create_task(fs_id: str, kind: str, *paths: str, report: str = NO_REPORT, wait: bool = False) -> dict[str, Any]:
    argv = ["create-data-repository-task", "--file-system-id", fs_id, "--type", kind, "--report", report]
    argv += ["--paths", *paths] if paths else []
    rc, out, err = run_cli(*argv, *(["--wait"] if wait else []))
    task = json.loads(out)["DataRepositoryTask"]
    assert rc == (1 if wait and task["Lifecycle"] != "SUCCEEDED" else 0), err  # --wait fails with the task
    return task


def describe(*argv: str) -> list[dict[str, Any]]:
    rc, out, err = run_cli("describe-data-repository-tasks", *argv)
    assert rc == 0, err
    return json.loads(out)["DataRepositoryTasks"]


def finished(task_id: str, timeout: float = 60) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        task = describe("--task-ids", task_id)[0]
        return task if task["Lifecycle"] not in task_records.ACTIVE else None

    return wait_for(ended, timeout, f"task {task_id} to end")


def keys(s3: Any, bucket: str, prefix: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_export_task_reports_what_it_cannot_export(s3: Any, bucket: str, mounter: Any) -> None:
    m = mounter(f"s3://{bucket}", options="export_delay=3600", ExportPath=f"s3://{bucket}/exp")
    tree = m.path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "ok1.txt").write_bytes(b"one")
    (tree / "sub/ok2.txt").write_bytes(b"two")
    (m.path / "outside.txt").write_bytes(b"not in the task's paths")
    deep = tree
    for c in "abc":
        deep /= c * 250
    deep /= "d" * 200
    deep.mkdir(parents=True)  # its key is 968 bytes: exported
    long_file = deep / ("f" * 100)  # 1,069 bytes: PathSizeTooLong
    long_file.write_bytes(b"x")
    report = f"Enabled=true,Path=s3://{bucket}/exp/reports,Format=REPORT_CSV_20191124,Scope=FAILED_FILES_ONLY"

    task = create_task(m.fs_id, task_records.EXPORT, str(tree), report=report, wait=True)
    assert task["Paths"] == ["tree"] and task["Type"] == task_records.EXPORT
    assert task["TaskId"].startswith("task-") and len(task["TaskId"]) == 22
    assert task["ResourceARN"].endswith(f":task/{task['TaskId']}")
    status = task["Status"]
    assert task["Lifecycle"] == "FAILED" and status["FailedCount"] == 1
    assert status["SucceededCount"] == status["TotalCount"] - 1 >= 2
    assert task["EndTime"] >= task["StartTime"] >= task["CreationTime"]
    assert {"exp/tree/ok1.txt", "exp/tree/sub/ok2.txt"} <= keys(s3, bucket, "exp/tree/")
    assert "exp/outside.txt" not in keys(s3, bucket, "exp/")
    failures = s3.get_object(Bucket=bucket, Key=f"exp/reports/{task['TaskId']}/failures.csv")["Body"].read()
    assert failures.decode() == f"{long_file.relative_to(m.path)},failed,PathSizeTooLong\n"
    assert describe("--filters", f"Name=file-system-id,Values={m.fs_id}", "Name=task-lifecycle,Values=FAILED") == [task]


def test_cancel_a_running_export_task(s3: Any, bucket: str, mounter: Any) -> None:
    m = mounter(f"s3://{bucket}", options="export_delay=3600", ExportPath=f"s3://{bucket}/exp")
    many = m.path / "many"
    many.mkdir()
    for i in range(800):
        (many / f"f{i:04d}").write_bytes(b"%d" % i)
    wait_for(lambda: "exp/many/" in keys(s3, bucket, "exp/"), 30, "the directory's own export")
    task = create_task(m.fs_id, task_records.EXPORT, "many")
    wait_for(lambda: describe("--task-ids", task["TaskId"])[0]["Status"]["SucceededCount"] > 0, 30, "progress")
    rc, out, err = run_cli("cancel-data-repository-task", "--task-id", task["TaskId"])
    assert rc == 0, err
    assert json.loads(out) == {"Lifecycle": "CANCELING", "TaskId": task["TaskId"]}
    task = finished(task["TaskId"])
    assert task["Lifecycle"] == "CANCELED"
    status = task["Status"]
    assert status["TotalCount"] == 800
    assert 0 < status["SucceededCount"] < 800 and status["FailedCount"] == 0
    assert len(keys(s3, bucket, "exp/many/f")) == status["SucceededCount"]
    rc, _, err = run_cli("cancel-data-repository-task", "--task-id", task["TaskId"])
    assert rc == 254 and "(DataRepositoryTaskEnded)" in err


def test_release_task_frees_cache_space(s3: Any, bucket: str, mounter: Any) -> None:
    for name in ("data/a.bin", "data/sub/b.bin", "keep/c.bin"):
        s3.put_object(Bucket=bucket, Key=name, Body=os.urandom(2 * MIB))
    m = mounter(f"s3://{bucket}", options="export_delay=3600")
    for name in ("data/a.bin", "data/sub/b.bin", "keep/c.bin"):
        (m.path / name).read_bytes()
    (m.path / "data/dirty.txt").write_bytes(b"not exported: not released")
    used = m.stats()["cache"]["used"]

    task = finished(create_task(m.fs_id, task_records.RELEASE, "data")["TaskId"])
    assert task["Lifecycle"] == "SUCCEEDED"
    assert task["Status"]["ReleasedCapacity"] == 4 * MIB
    assert (task["Status"]["TotalCount"], task["Status"]["SucceededCount"]) == (2, 2)
    assert m.stats()["cache"]["used"] == used - 4 * MIB
    _, out, _ = run_cli("hsm_state", str(m.path / "data/a.bin"), str(m.path / "keep/c.bin"))
    assert [line.split(": ", 1)[1] for line in out.splitlines()] == [
        "(0x0000000d) released exists archived, archive_id:1",
        "(0x00000009) exists archived, archive_id:1",
    ]
    assert (m.path / "data/dirty.txt").read_bytes() == b"not exported: not released"


def test_tasks_wait_in_line_and_survive_a_restart(moto: MotoEndpoint, s3: Any, bucket: str, home: Path) -> None:
    fs_id = create_fs(moto, f"s3://{bucket}", ExportPath=f"s3://{bucket}/exp")
    now = round(time.time(), 3)
    status = {"TotalCount": 10, "SucceededCount": 3, "FailedCount": 0, "LastUpdatedTime": now}
    common = {"FileSystemId": fs_id, "Type": task_records.EXPORT, "Paths": [], "Report": {"Enabled": False}}
    # Both left by an earlier daemon, so both created before anything this test creates (describe sorts by time).
    interrupted = {**common, "TaskId": "task-0000000000000000a", "Lifecycle": "EXECUTING", "CreationTime": now - 2}
    queued = {**common, "TaskId": "task-0000000000000000b", "Lifecycle": "PENDING", "CreationTime": now - 1}
    task_records.save_task({**interrupted, "Status": status, "StartTime": now})
    task_records.save_task({**queued, "Status": {**status, "SucceededCount": 0}})
    res, m = mount_fs(fs_id, home.parent / "mnt", "export_delay=3600")
    assert m is not None, res.stderr
    try:
        first = finished(interrupted["TaskId"])
        assert first["Lifecycle"] == "FAILED" and first["FailureDetails"]["Message"] == tasks.INTERRUPTED
        assert finished(queued["TaskId"])["Lifecycle"] == "SUCCEEDED"

        (m.path / "f.txt").write_bytes(b"f")
        one = create_task(fs_id, task_records.EXPORT, "f.txt")
        two = create_task(fs_id, task_records.RELEASE)
        assert finished(two["TaskId"])["StartTime"] >= finished(one["TaskId"])["EndTime"]  # one at a time
        m.unmount()
        assert [t["TaskId"] for t in describe("--filters", f"Name=file-system-id,Values={fs_id}")] == [
            interrupted["TaskId"], queued["TaskId"], one["TaskId"], two["TaskId"],
        ]  # fmt: skip
        rc, _, err = run_cli(
            "create-data-repository-task", "--file-system-id", fs_id, "--type", task_records.EXPORT,
            "--report", NO_REPORT,
        )  # fmt: skip
        assert rc == 254 and "(BadRequest)" in err and "is not mounted" in err
    finally:
        m.cleanup()


def test_import_task_brings_in_new_objects(s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key="in/old.txt", Body=b"old")
    m = mounter(f"s3://{bucket}", AutoImportPolicy="NEW_CHANGED_DELETED")
    assert os.listdir(m.path / "in") == ["old.txt"]
    s3.put_object(Bucket=bucket, Key="in/new.txt", Body=b"new")
    s3.put_object(Bucket=bucket, Key="in/old.txt", Body=b"changed")
    task = finished(create_task(m.fs_id, task_records.IMPORT, f"s3://{bucket}/in")["TaskId"])
    assert task["Lifecycle"] == "SUCCEEDED"
    assert task["Status"]["SucceededCount"] == task["Status"]["TotalCount"] == 2
    assert sorted(os.listdir(m.path / "in")) == ["new.txt", "old.txt"]
    assert (m.path / "in/new.txt").read_bytes() == b"new"
    assert (m.path / "in/old.txt").read_bytes() == b"changed"
