"""Cost of one auto-import poll over many objects, next to the same LISTs made directly with boto3.

Run by hand: ``.venv/bin/python -m benchmarks.poll [--objects 100000] [--dirs 100]``. moto's server runs in this
process on 127.0.0.1 (its backend is filled directly, which is fast); a file system with NEW_CHANGED_DELETED
is mounted, every directory loaded with ``find``, and the daemon's own poll timing read from its stats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer

from lustrefs import s3client
from lustrefs.client import control_client
from lustrefs.demo import locals3

LUSTREFS = str(Path(sys.executable).parent / "lustrefs")


def raw_lists(client: object, bucket: str, dirs: int) -> tuple[float, int]:
    """The delimiter listings a poll makes (root, then each directory), timed with boto3 sequentially."""
    started, requests = time.monotonic(), 0
    for prefix in [""] + [f"d{d:03d}/" for d in range(dirs)]:
        for _page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            requests += 1
    return time.monotonic() - started, requests


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--dirs", type=int, default=100)
    args = ap.parse_args()
    locals3.ensure_test_credentials(os.environ)
    port = locals3.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="lustrefs-poll-"))
    env = {**os.environ, "LUSTREFS_HOME": str(work / "home")}
    mnt = work / "mnt"
    mnt.mkdir()
    try:
        client = s3client.make_client(url)
        client.create_bucket(Bucket="poll")
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        per_dir = args.objects // args.dirs
        for d in range(args.dirs):
            for i in range(per_dir):
                backend.put_object("poll", f"d{d:03d}/f{i:06d}", b"x")
        conf = "ImportPath=s3://poll,AutoImportPolicy=NEW_CHANGED_DELETED"
        out = subprocess.run(
            [LUSTREFS, "--endpoint-url", url, "create-file-system", "--file-system-type", "LUSTRE",
             "--storage-capacity", "1200", "--lustre-configuration", conf],
            env=env, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        fs_id = json.loads(out)["FileSystem"]["FileSystemId"]
        opts = "posix_metadata=off,poll_interval=5"
        subprocess.run([LUSTREFS, "mount", fs_id, str(mnt), "-o", opts], env=env, check=True, timeout=120)
        try:
            t = time.monotonic()
            subprocess.run(["find", str(mnt), "-type", "f"], check=True, stdout=subprocess.DEVNULL, timeout=1800)
            load = time.monotonic() - t
            stats = control_client.request(str(mnt), "stats")
            start = stats["import"]["cycles"]
            deadline = time.monotonic() + 600
            while stats["import"]["cycles"] < start + 2 and time.monotonic() < deadline:
                time.sleep(0.5)
                stats = control_client.request(str(mnt), "stats")
            raw_seconds, raw_requests = raw_lists(client, "poll", args.dirs)
            rss = next(
                line.split()[1]
                for line in Path(
                    f"/proc/{json.loads((work / 'home' / fs_id / 'mount.json').read_text())['pid']}/status"
                )
                .read_text()
                .splitlines()
                if line.startswith("VmHWM")
            )
            result = {
                "endpoint": "moto (threaded server, 127.0.0.1)",
                "objects": per_dir * args.dirs,
                "directories": args.dirs,
                "initial_load_find_seconds": round(load, 2),
                "poll_seconds": round(stats["import"]["last_poll_seconds"], 2),
                "poll_list_requests": stats["import"]["last_poll_requests"],
                "poll_other_requests": {k: v for k, v in stats["requests"].items() if k != "LIST"},
                "raw_boto3_same_lists_seconds": round(raw_seconds, 2),
                "raw_boto3_same_lists_requests": raw_requests,
                "daemon_peak_rss_kib": int(rss),
            }
            print(json.dumps(result, indent=2))
        finally:
            subprocess.run([LUSTREFS, "umount", str(mnt)], env=env, timeout=300)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
