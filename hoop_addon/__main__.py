"""`python -m hoop_addon ...`: see `hoop_addon.cli.main`."""

import sys

from hoop_addon.cli.main import main

sys.exit(main())
