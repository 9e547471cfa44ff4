"""``python -m morelora``: the command line."""

import sys

from morelora.cli import main

sys.exit(main())
