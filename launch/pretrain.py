"""Pretrain a DNA language model with DeepSpeed.

    deepspeed launch/pretrain.py --config experiments/configs/demo.yaml \
        --arch transformer --losses ce --set train.max_steps=300
    deepspeed --num_gpus 2 launch/pretrain.py --config ... --set train.max_steps=50
    python launch/pretrain.py ...            # one process, no launcher
    deepspeed launch/pretrain.py --resume runs/NAME [--set train.max_steps=2000]

Thin on purpose: parse, build the config, call ``nucleo.train.trainer.fit``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # usable from a plain checkout

from nucleo.core.runtime import configure_threads

configure_threads()  # before torch is imported

from nucleo.cli.main import pretrain_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(pretrain_main())
