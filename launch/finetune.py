"""Fine-tune or probe a pretrained DNA model on a classification task (same as ``nucleo
finetune``).

    python launch/finetune.py tasks/kingdom --export runs/NAME/export --mode full --seeds 0,1,2
    python launch/finetune.py tasks/kingdom --export runs/NAME/export --init scratch
    python launch/finetune.py tasks/kingdom tasks/coding --export ce=runs/a/export \
        --export ce+rc+cgr=runs/b/export --compare --seeds 0,1,2 --table results.md

Thin on purpose: parse, then ``nucleo.downstream.finetune``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # usable from a plain checkout

from nucleo.core.runtime import configure_threads

configure_threads()  # before torch is imported

from nucleo.cli.downstream import finetune_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(finetune_main())
