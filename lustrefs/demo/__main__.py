"""``python -m lustrefs.demo``: see lustrefs.demo.run."""

import sys

from lustrefs.demo.run import main

sys.exit(main())
