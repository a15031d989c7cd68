"""``python -m cli``: the ``fedlora`` command."""

import sys

from cli.main import main

sys.exit(main())
