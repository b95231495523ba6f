"""``python -m lustrefs.demo``: see lustrefs.demo.run."""

import sys

from .run import main

sys.exit(main())
