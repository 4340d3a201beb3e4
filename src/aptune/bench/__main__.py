"""``python -m aptune.bench ...``: the ``aptune bench`` subcommand, standalone."""

import sys

from .cli import main

sys.exit(main())
