"""Train, resume, export and fine-tune every family in every precision and ZeRO stage.

    python launch/precision_check.py [--families hyena mamba] [--stages 0 3] [--precisions bf16]
    deepspeed --num_gpus 2 launch/precision_check.py ...

Thin on purpose: threads, then ``nucleo.studies.precision.main``.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # usable from a plain checkout

from nucleo.core.runtime import configure_threads

configure_threads()  # before torch is imported
os.environ.setdefault("TQDM_DISABLE", "1")  # DeepSpeed's checkpoint readers draw progress bars

from nucleo.studies.precision import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
