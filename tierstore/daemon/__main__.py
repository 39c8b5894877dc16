"""``python -m tierstore.daemon``: the same as the ``tierstored`` command."""

import sys

from tierstore.cli import tierstored

sys.exit(tierstored())
