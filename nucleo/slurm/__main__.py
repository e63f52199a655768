"""``python -m nucleo.slurm ...``: the Slurm launcher's steps (see ``nucleo.slurm.launcher``)."""

import sys

from nucleo.slurm.launcher import main

sys.exit(main())
