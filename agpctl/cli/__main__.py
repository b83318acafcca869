"""``python -m agpctl.cli``: how Ray jobs and the tests run the command line."""

import sys

from agpctl.cli import main

sys.exit(main())
