"""``python -m nucleo ...`` is the ``nucleo`` command."""

import sys

from nucleo.cli import main

sys.exit(main())
