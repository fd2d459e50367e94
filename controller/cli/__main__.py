"""`python -m hotlab.controller.cli`: the same as the `hotlab` command."""

import sys

from hotlab.controller.cli.main import main

sys.exit(main())
