"""The demos (``make demo``, ``make demo-cluster``) and the private servers they run on.

:mod:`lustrefs.demo.run` is the walk-through; :mod:`lustrefs.demo.cluster` the same file system mounted by two
hosts; :mod:`lustrefs.demo.locals3` starts moto's S3 server on 127.0.0.1 and holds the sample data set, and
:mod:`lustrefs.demo.localpg` a private PostgreSQL server on a unix socket (both also used by the tests and the
benchmarks). Not part of the runtime: neither the
CLI nor the daemon imports this package.
"""
