"""``python -m toponas_kernels``: the ``toponas`` command."""

import sys

from .cli import main

sys.exit(main())
