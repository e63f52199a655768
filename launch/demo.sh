#!/usr/bin/env bash
# The README's demo: set up, shard the bundled genomes, pretrain a small transformer with
# DeepSpeed, validating bits per base per kingdom; then the downstream path: a kingdom task
# from the shards (test fragments from the held-out split), a linear probe of the export on it,
# and the kingdom predicted for three phage genomes (training records of the viral class: a
# demonstration of the command, not an evaluation). Everything is logged to runs/mlflow.db.
# Extra arguments go to launch/pretrain.py, e.g.  launch/demo.sh --set train.max_steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
launch/setup.sh
source "${NUCLEO_VENV:-.venv}/bin/activate"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(python -c 'from nucleo.core.device import resolve; print(resolve("auto").type)')}"  # the launcher's device, as nucleo decides it

shards=data/shards/sample
if [ ! -f "$shards/manifest.json" ] || [ data_pipeline/sample/sources.tsv -nt "$shards/manifest.json" ]; then
    nucleo data build --sources data_pipeline/sample/sources.tsv --out "$shards" --overwrite
fi
# One process (DeepSpeed's CPU accelerator would otherwise start one per NUMA node).
deepspeed --num_gpus 1 launch/pretrain.py --config experiments/configs/demo.yaml "$@"
export=$(ls -td runs/*/export | head -1)

echo
echo "== downstream: kingdom task -> fine-tune $export -> predict"
# 100 training and 20 test fragments per kingdom (kingdoms whose held-out split is too small
# for 20 are left out and named); a linear probe on the pretrained embeddings, both strands
[ -f data/tasks/demo_kingdom/task.json ] || nucleo tasks build kingdom --shards "$shards" \
    --out data/tasks/demo_kingdom --train-per-class 100 --test-per-class 20
python launch/finetune.py data/tasks/demo_kingdom --export "$export" --mode probe \
    --seeds 0 --rc-conjoin --out runs/finetune
classifier=$(ls -td runs/finetune/kingdom-*-probe-seed0 | head -1)
nucleo predict "$classifier" data_pipeline/sample/viral/lactococcus_phages.fasta.bz2
echo
echo "Open the runs in MLflow:  .venv/bin/mlflow ui --backend-store-uri sqlite:///$PWD/runs/mlflow.db"
