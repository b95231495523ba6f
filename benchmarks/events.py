"""``python -m benchmarks.events``: event-driven import (issue 15), run by hand as root, never by ``make test``.

moto's server on 127.0.0.1 (S3 and SQS), a bucket whose S3 event notifications go to an SQS queue, and two
mounts of file systems linked to it with ``AutoImportPolicy=NEW_CHANGED_DELETED``: one with ``event_queue`` (and
an hour between polls), one with polls only (``--poll`` seconds apart). For each, ``--n`` objects are PUT one at
a time, each into a directory the mount has listed; the time from the PUT's return until the file exists in the
mount (checked every millisecond) is measured. Prints p50, p99 and the maximum, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lustrefs.sync import s3events

from .endpoints import apply_env, moto


def _cli(env: dict[str, str], *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "lustrefs.client.cli", *args], env=env, capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"lustrefs {args[0]}: {res.stderr.strip()[-500:]}")
    return res.stdout


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def measure(url: str, s3: Any, bucket: str, work: Path, name: str, options: str, n: int) -> dict[str, Any]:
    """Latencies (s) from PUT to visibility in a new mount with ``options``."""
    env = {**os.environ, "LUSTREFS_HOME": str(work / name / "home")}
    out = _cli(env, "--endpoint-url", url, "create-file-system", "--file-system-type", "LUSTRE",
               "--storage-capacity", "1200", "--lustre-configuration",
               f"ImportPath=s3://{bucket}/{name}/,AutoImportPolicy=NEW_CHANGED_DELETED")  # fmt: skip
    fs_id = json.loads(out)["FileSystem"]["FileSystemId"]
    mnt = work / name / "mnt"
    mnt.mkdir(parents=True)
    _cli(env, "mount", fs_id, str(mnt), "-o", options)
    try:
        s3.put_object(Bucket=bucket, Key=f"{name}/d/first", Body=b"x")
        os.listdir(mnt / name / "d")  # listed: new names come by events or polls
        latencies = []
        for i in range(n):
            started = time.monotonic()
            s3.put_object(Bucket=bucket, Key=f"{name}/d/f{i}", Body=b"x")
            target = mnt / name / "d" / f"f{i}"
            while not target.exists():
                if time.monotonic() - started > 120:
                    raise RuntimeError(f"{target} not visible within 120 s")
                time.sleep(0.001)
            latencies.append(time.monotonic() - started)
    finally:
        _cli(env, "umount", str(mnt))
    return {
        "options": options,
        "n": n,
        "p50_s": statistics.median(latencies),
        "p99_s": _percentile(latencies, 99),
        "max_s": max(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.events", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="objects PUT for each mount (200)")
    ap.add_argument("--poll", type=float, default=5.0, help="poll interval of the poll-only mount, s (5)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/events.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lustrefs-events-") as tmp:
        work = Path(tmp)
        with moto(work / "moto.log") as endpoint:
            apply_env(endpoint)
            s3 = endpoint.client()
            sqs = s3events.make_client(endpoint.url, "us-east-1", wait_seconds=1)
            bucket = "lustrefs-events-bench"
            s3.create_bucket(Bucket=bucket)
            queue = sqs.create_queue(QueueName="lustrefs-events-bench")["QueueUrl"]
            arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            s3.put_bucket_notification_configuration(
                Bucket=bucket, NotificationConfiguration=s3events.notification_config(arn)
            )
            with_events = f"event_queue={queue},poll_interval=3600"
            results = {
                "events": measure(endpoint.url, s3, bucket, work, "events", with_events, args.n),
                "polls": measure(endpoint.url, s3, bucket, work, "polls", f"poll_interval={args.poll}", args.n),
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    for name, r in results.items():
        print(f"{name:7} ({r['options']}): p50 {r['p50_s'] * 1000:.0f} ms, p99 {r['p99_s'] * 1000:.0f} ms,"
              f" max {r['max_s'] * 1000:.0f} ms over {r['n']} objects")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
