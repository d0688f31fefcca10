"""``python -m vtprune``: the same as the ``vtprune`` command."""

import sys

from .cli import main

sys.exit(main())
