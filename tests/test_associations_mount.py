"""Data repository associations through a real mount on moto's server: two buckets in one namespace, each
re-rooted with its own policies, created and deleted with the CLI while mounted."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import MotoEndpoint, mount_fs, run_cli, wait_for

pytestmark = pytest.mark.fuse


def cli(moto: MotoEndpoint, *argv: str) -> dict[str, Any]:
    rc, out, err = run_cli("--endpoint-url", moto.url, *argv)
    assert rc == 0, err
    return json.loads(out) if out.strip() else {}


def lifecycle(moto: MotoEndpoint, dra_id: str) -> str | None:
    found = cli(moto, "describe-data-repository-associations")["Associations"]
    return next((a["Lifecycle"] for a in found if a["AssociationId"] == dra_id), None)


def keys(s3: Any, bucket: str) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


def test_two_associations_on_two_buckets_while_mounted(
    moto: MotoEndpoint, s3: Any, home: Path, tmp_path: Path
) -> None:
    genomes, lab = f"genomes-{uuid.uuid4().hex[:8]}", f"lab-{uuid.uuid4().hex[:8]}"
    for b in (genomes, lab):
        s3.create_bucket(Bucket=b)
    s3.put_object(Bucket=genomes, Key="ref/hg38.fa", Body=b">chr1\nACGT\n")
    s3.put_object(Bucket=lab, Key="run42/in.txt", Body=b"input")
    fs = cli(moto, "create-file-system", "--file-system-type", "LUSTRE", "--storage-capacity", "1200")
    fs_id = fs["FileSystem"]["FileSystemId"]
    ref = cli(
        moto, "create-data-repository-association", "--file-system-id", fs_id, "--file-system-path", "/ref",
        "--data-repository-path", f"s3://{genomes}/ref", "--s3", "AutoImportPolicy={Events=[NEW]}",
    )["Association"]  # fmt: skip
    assert ref["Lifecycle"] == "AVAILABLE" and ref["DataRepositoryPath"] == f"s3://{genomes}/ref/"
    res, m = mount_fs(fs_id, tmp_path / "mnt", "export_delay=0.2,poll_interval=3600")
    assert m is not None, res.stderr
    try:
        assert (m.path / "ref/hg38.fa").read_bytes() == b">chr1\nACGT\n"
        # A second association, on another bucket, created while mounted: CREATING, then AVAILABLE.
        scratch = cli(
            moto, "create-data-repository-association", "--file-system-id", fs_id,
            "--file-system-path", "/scratch/run42", "--data-repository-path", f"s3://{lab}/run42/",
            "--s3", "AutoImportPolicy={Events=[NEW,CHANGED,DELETED]},AutoExportPolicy={Events=[NEW,CHANGED,DELETED]}",
        )["Association"]  # fmt: skip
        assert scratch["Lifecycle"] == "CREATING"
        wait_for(lambda: lifecycle(moto, scratch["AssociationId"]) == "AVAILABLE", 30, "the association")
        assert (m.path / "scratch/run42/in.txt").read_bytes() == b"input"
        assert sorted(os.listdir(m.path)) == ["ref", "scratch"]
        # Each follows its own export events: /scratch/run42 exports to lab/run42/, /ref exports nothing.
        (m.path / "scratch/run42/out.csv").write_bytes(b"a,b\n")
        (m.path / "ref/local.txt").write_bytes(b"stays local")
        wait_for(lambda: "run42/out.csv" in keys(s3, lab), 30, "the export to the second bucket")
        assert s3.get_object(Bucket=lab, Key="run42/out.csv")["Body"].read() == b"a,b\n"
        assert keys(s3, genomes) == {"ref/hg38.fa"}
        # Data repository tasks take the paths of any association: an import task from the second bucket, an
        # export task of the first association's directory (whose policy exports nothing by itself).
        s3.put_object(Bucket=lab, Key="run42/by-task.txt", Body=b"imported by a task")
        task = cli(moto, "create-data-repository-task", "--file-system-id", fs_id, "--type",
                   "IMPORT_METADATA_FROM_REPOSITORY", "--paths", f"s3://{lab}/run42", "--report", "Enabled=false",
                   "--wait")["DataRepositoryTask"]  # fmt: skip
        assert task["Lifecycle"] == "SUCCEEDED", task
        assert (m.path / "scratch/run42/by-task.txt").read_bytes() == b"imported by a task"
        task = cli(moto, "create-data-repository-task", "--file-system-id", fs_id, "--type", "EXPORT_TO_REPOSITORY",
                   "--paths", "ref", "--report", "Enabled=false", "--wait")["DataRepositoryTask"]  # fmt: skip
        assert task["Lifecycle"] == "SUCCEEDED", task
        assert s3.get_object(Bucket=genomes, Key="ref/local.txt")["Body"].read() == b"stays local"
        # Deleted while mounted with a file not exported yet: exported first, then the directory goes.
        cli(moto, "update-data-repository-association", "--association-id", scratch["AssociationId"],
            "--s3", "AutoExportPolicy={Events=[]}")  # fmt: skip
        wait_for(lambda: lifecycle(moto, scratch["AssociationId"]) == "AVAILABLE", 30, "the update")
        (m.path / "scratch/run42/late.txt").write_bytes(b"late")
        out = cli(moto, "delete-data-repository-association", "--association-id", scratch["AssociationId"])
        assert out["Lifecycle"] == "DELETING"
        wait_for(lambda: lifecycle(moto, scratch["AssociationId"]) is None, 30, "the deletion")
        assert s3.get_object(Bucket=lab, Key="run42/late.txt")["Body"].read() == b"late"
        assert not (m.path / "scratch/run42").exists()
        assert (m.path / "ref/hg38.fa").read_bytes() == b">chr1\nACGT\n"
        m.unmount()
    finally:
        m.cleanup()
