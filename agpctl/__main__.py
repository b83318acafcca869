"""``python -m agpctl``: the command line."""

import sys

from agpctl.cli import main

sys.exit(main())
