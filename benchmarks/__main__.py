"""``python -m benchmarks``: the command line of the read-performance benchmark (see ``--help``)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from .dataset import GIB, parse_size
from .endpoints import KINDS
from .mounts import SYSTEM_KEYS
from .runner import CASES, OUT, Settings, run

DESCRIPTION = """\
Benchmark lustrefs and its peers (s3fs, rclone) against one S3 endpoint on 127.0.0.1, with the raw endpoint
(boto3) and the local disk as references. Prints a Markdown report and writes it, with a JSON file, to
benchmarks/out/. Run as root for dropping the page cache and installing missing peers.

Endpoint: --endpoint moto|s3rver (or BENCH_ENDPOINT), else AWS_ENDPOINT_URL if set (loopback only), else moto.
moto copies the whole object for every ranged GET: big-object figures on moto measure moto (use s3rver)."""


def _systems(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SYSTEM_KEYS))
    if unknown:
        choices = ", ".join(SYSTEM_KEYS)
        raise argparse.ArgumentTypeError(f"unknown system(s) {', '.join(unknown)}; choose from {choices}")
    return names


def _cases(text: str) -> tuple[str, ...]:
    names = {s.strip() for s in text.split(",") if s.strip()}
    unknown = sorted(names - set(CASES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    return tuple(c for c in CASES if c in names)


def _size(text: str) -> int:
    try:
        size = parse_size(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64MiB, 1GiB)") from None
    if size < 1024**2:
        raise argparse.ArgumentTypeError("the big file must be at least 1 MiB")
    return size


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--endpoint",
        choices=KINDS,
        default=os.environ.get("BENCH_ENDPOINT") or None,
        help="start this endpoint on 127.0.0.1 (default: $BENCH_ENDPOINT, else moto)",
    )
    p.add_argument(
        "--endpoint-url",
        default=os.environ.get("AWS_ENDPOINT_URL") or None,
        help="use this running loopback endpoint instead (default: $AWS_ENDPOINT_URL)",
    )
    p.add_argument("--big-size", type=_size, default=GIB, metavar="SIZE", help="size of the big file (default 1GiB)")
    p.add_argument("--quick", action="store_true", help="small trees (10×100 files, 500-entry directory)")
    p.add_argument(
        "--systems",
        type=_systems,
        default=list(SYSTEM_KEYS),
        metavar="A,B",
        help=f"file systems to run (default all: {','.join(SYSTEM_KEYS)})",
    )
    p.add_argument(
        "--cases",
        type=_cases,
        default=CASES,
        metavar="A,B",
        help=f"cases to run on each file system (default all: {','.join(CASES)}); the raw endpoint always runs",
    )
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="limit of each operation (600 s)")
    p.add_argument(
        "--samples", type=int, default=None, metavar="N", help="latency samples, median reported (default 9, quick 5)"
    )
    p.add_argument(
        "--populate",
        choices=("auto", "api", "disk"),
        default="auto",
        help="how the bucket is filled: api: S3 PUTs; disk: files written into s3rver's store (fast, s3rver only);"
        " auto (default): api for the suite, disk for --million",
    )
    p.add_argument(
        "--no-install",
        dest="allow_install",
        action="store_false",
        help="do not apt-get install missing peers nor npm install s3rver",
    )
    p.add_argument("--keep-work", action="store_true", help=f"keep the work directory under {OUT}")
    p.add_argument(
        "--million",
        type=int,
        nargs="?",
        const=1_000_000,
        default=0,
        metavar="N",
        help="instead of the suite: lustrefs RSS after listing N objects (default 1,000,000)",
    )
    p.add_argument(
        "--lustrefs-rev",
        metavar="REV",
        help="benchmark lustrefs/ as of this git revision (e.g. HEAD), not the working tree",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = Settings(
        endpoint_kind=args.endpoint,
        endpoint_url=None if args.endpoint else args.endpoint_url,
        big_size=args.big_size,
        quick=args.quick,
        systems=args.systems,
        timeout=args.timeout,
        samples=args.samples or (5 if args.quick else 9),
        populate=args.populate,
        allow_install=args.allow_install,
        keep_work=args.keep_work,
        million=args.million,
        lustrefs_rev=args.lustrefs_rev,
        cases=args.cases,
        argv=shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)]),
    )
    _, md, js = run(settings)
    print(md.read_text())
    print(f"written: {md}\n         {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
