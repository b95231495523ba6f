"""The demo (``python -m lustrefs.demo``, ``make demo``) and the embedded local S3 endpoint it runs on.

:mod:`lustrefs.demo.run` is the walk-through; :mod:`lustrefs.demo.locals3` starts moto's S3 server on 127.0.0.1
and holds the sample data set (also used by the tests and the benchmarks). Not part of the runtime: neither the
CLI nor the daemon imports this package.
"""
