"""`python -m luffy` is the `luffy` command."""

import sys

from luffy.cli.main import main

sys.exit(main())
