"""`python -m hoop_addon ...`: see `hoop_addon.cli`."""

import sys

from hoop_addon.cli import main

sys.exit(main())
