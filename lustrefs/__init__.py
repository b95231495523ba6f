"""lustrefs: a FUSE file system linking a POSIX namespace to S3 with FSx for Lustre semantics."""

__version__ = "0.1.0"
