"""The read-performance benchmark suite of lustrefs, run by hand: ``python -m benchmarks --help``.

Against one S3 endpoint on 127.0.0.1 (moto, s3rver, or an explicit loopback ``AWS_ENDPOINT_URL``) it populates
a data set, measures the raw endpoint with boto3, a local-disk baseline, lustrefs and the installed peers (s3fs,
rclone), and writes a Markdown table and a JSON file under ``benchmarks/out/``.
"""
