"""``python -m simvm ...``: the same as the ``simvm`` console script."""

import sys

from vmmigrate.simvm.main import main

sys.exit(main())
