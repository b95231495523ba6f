"""The package layout: the CLI side (lustrefs.client) loads neither the FUSE stack nor the daemon's modules."""

from __future__ import annotations

import subprocess
import sys

CHECK = (
    "import lustrefs.client.cli, sys; "
    "bad = {m for m in sys.modules if m.split('.')[0] in ('trio','pyfuse3')} "
    "| {m for m in sys.modules if m in ('lustrefs.tree.namespace','lustrefs.data.cache','lustrefs.sync.exporter',"
    "'lustrefs.sync.importer','lustrefs.daemon.fs')}; "
    "assert not bad, bad"
)


def test_the_cli_imports_neither_trio_nor_pyfuse3_nor_the_daemon() -> None:
    res = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
