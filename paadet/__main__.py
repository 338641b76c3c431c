"""``python -m paadet``: the same as the ``paadet`` command."""

import sys

from paadet.cli import main

sys.exit(main())
