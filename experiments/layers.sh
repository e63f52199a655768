#!/usr/bin/env bash
# The layer study of experiments/results/layers.md and the variant check of
# experiments/results/variants.md, on one pretrained hyena:
#
#   experiments/layers.sh          # ~35 min on 2 CPU cores; re-running skips what is done
#
# 1. the offline 12-kingdom corpus, unless it is there (nucleo data corpus);
# 2. a causal hyena (d_model 128, 4 layers) pretrained with `ce` on 12.3M tokens
#    (experiments/configs/downstream_pretrain.yaml, as in experiments/downstream.sh: runs/pre-ce);
# 3. the kingdom and coding_vs_intergenic tasks;
# 4. a linear probe on every layer of it (experiments/layer_probe.py);
# 5. variant effects at annotated start codons vs random positions of E. coli K-12
#    (experiments/variant_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${NUCLEO_PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || { launch/setup.sh; }
if [ ! -f data/offline/shards/manifest.json ]; then
    "$PY" -m nucleo data corpus --out data/offline
fi
NAME=pre-ce
if [ -f "runs/$NAME/export/config.json" ]; then
    echo "runs/$NAME: exported already"
elif [ -d "runs/$NAME" ]; then
    "$PY" launch/pretrain.py --resume "runs/$NAME"
else
    "$PY" launch/pretrain.py --config experiments/configs/downstream_pretrain.yaml --losses ce \
        --set "run.name=$NAME"
fi
build() {  # task train-per-class test-per-class
    [ -f "data/tasks/$1/task.json" ] || "$PY" -m nucleo tasks build "$1" --corpus data/offline \
        --out "data/tasks/$1" --train-per-class "$2" --test-per-class "$3"
}
build kingdom 300 100
build coding_vs_intergenic 1000 300
"$PY" experiments/layer_probe.py --export "runs/$NAME/export" data/tasks/kingdom \
    data/tasks/coding_vs_intergenic
GENBANK=$(find data/offline -name 'NC_000913.gbk*' 2>/dev/null | head -1)  # E. coli K-12
"$PY" experiments/variant_check.py --export "runs/$NAME/export" ${GENBANK:+--genbank "$GENBANK"}
