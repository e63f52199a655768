#!/usr/bin/env bash
# The downstream study of experiments/results/downstream.md, end to end:
#
#   experiments/downstream.sh       # ~2 h on 2 CPU cores; re-running skips what is done
#
# 1. the offline 12-kingdom corpus, unless it is there (nucleo data corpus, ~75 s);
# 2. two causal hyena models (d_model 128, 4 layers) pretrained on the same 12.3M tokens, one
#    with `ce`, one with `ce,rc,cgr` (experiments/configs/downstream_pretrain.yaml);
# 3. the three built tasks (kingdom, plasmid_vs_chromosome, coding_vs_intergenic) in data/tasks;
# 4. pretrained (full fine-tune, linear probe) vs scratch, 3 seeds each, on every task;
# 5. generation: 100-base prompts from held-out bacteria, 400 bases sampled from each model,
#    compared with held-out bacteria windows;
# 6. the report (experiments/downstream_report.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${NUCLEO_PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || { launch/setup.sh; }
if [ ! -f data/offline/shards/manifest.json ]; then
    "$PY" -m nucleo data corpus --out data/offline
fi
CFG=experiments/configs/downstream_pretrain.yaml
for LOSSES in ce ce,rc,cgr; do
    NAME="pre-${LOSSES//,/+}"
    if [ -f "runs/$NAME/export/config.json" ]; then
        echo "runs/$NAME: exported already"
    elif [ -d "runs/$NAME" ]; then
        "$PY" launch/pretrain.py --resume "runs/$NAME"
    else
        "$PY" launch/pretrain.py --config "$CFG" --losses "$LOSSES" --set "run.name=$NAME"
    fi
done
build() {  # task train-per-class test-per-class
    [ -f "data/tasks/$1/task.json" ] || "$PY" -m nucleo tasks build "$1" --corpus data/offline \
        --out "data/tasks/$1" --train-per-class "$2" --test-per-class "$3"
}
build kingdom 300 100
build plasmid_vs_chromosome 1000 300
build coding_vs_intergenic 1000 300
"$PY" -m nucleo finetune data/tasks/kingdom data/tasks/plasmid_vs_chromosome \
    data/tasks/coding_vs_intergenic \
    --export ce=runs/pre-ce/export --export ce+rc+cgr=runs/pre-ce+rc+cgr/export \
    --compare --seeds 0,1,2 --epochs 2 --rc-conjoin --experiment nucleo-downstream \
    --table experiments/results/downstream_table.md
mkdir -p data/generation
[ -f data/generation/prompts.fa ] || "$PY" - <<'PYEOF'
from nucleo.downstream.generate import real_windows
seqs = real_windows("data/offline/shards", "bacteria", 100, 64, seed=1)
with open("data/generation/prompts.fa", "w") as fh:
    fh.writelines(f">prompt{i}\n{s.decode()}\n" for i, s in enumerate(seqs))
PYEOF
for NAME in pre-ce pre-ce+rc+cgr; do
    [ -f "data/generation/$NAME.fa" ] || "$PY" -m nucleo generate "runs/$NAME/export" \
        --out "data/generation/$NAME.fa" --prompt-file data/generation/prompts.fa --num 64 \
        --length 400 --batch-size 32 --seed 0
    "$PY" -m nucleo evaluate-generation "data/generation/$NAME.fa" --shards data/offline/shards \
        --kingdom bacteria --label "$NAME" --out "experiments/results/generation/$NAME"
done
"$PY" experiments/downstream_report.py
