"""``python -m aurora_loop.cli``: the same as ``aurora-train``."""

import sys

from aurora_loop.cli.train import main

sys.exit(main())
