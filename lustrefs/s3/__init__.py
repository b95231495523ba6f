"""S3 access of the daemon: ``repository`` (the ``ObjectStore`` interface and its boto3 implementation: bounded
requests in worker threads, errors with errno) and ``fastpath`` (GETs and HEADs on raw sockets)."""
