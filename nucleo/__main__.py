"""``python -m nucleo ...`` is the ``nucleo`` command."""

import sys

from nucleo.cli.main import main

sys.exit(main())
