"""``python -m lowrank``: the command line (see :mod:`lowrank.cli`)."""

import sys

from lowrank.cli import main

sys.exit(main())
