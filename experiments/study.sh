#!/usr/bin/env bash
# The study of experiments/results/study.md, end to end and resumable (re-running skips what is
# done and resumes interrupted runs): which architecture, loss and data treatment, at what size,
# for the compute, on the offline 12-kingdom corpus, with the floors and intervals beside.
#
#   experiments/study.sh            # on 2 CPU cores: ~2-3 h for the isoFLOP sweep, ~1 h for
#                                   # the ablation, ~20 min for the rest; stop and rerun freely
#   STUDY_STEPS="isoflop report" experiments/study.sh      # only some steps
#
# Steps: corpus (nucleo data corpus), masked (the same shards keeping soft-masked repeats, plus
# dust on unmasked records), markov (the k-mer floor), topology (nucleo data stats --topology),
# isoflop (plan, sweep, fit), ablation (plan, sweep, per-region evaluation of every run, fit),
# downstream (MCC of the baseline and the best variant on three tasks), report (study.md).
# experiments/sweeps/isoflop_gpu.yaml is the same study for GPUs (same commands).
# STUDY_PARALLEL=2 runs two sweep processes side by side (points lock, so they never train the
# same one), each with an equal share of the cores (OMP_NUM_THREADS): on 2 CPU cores that is
# about twice the throughput for these tiny models. Never run parallel sweeps without dividing
# the threads: two processes of 2 threads each on 2 cores ran them several times slower.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${NUCLEO_PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || { launch/setup.sh; }
STEPS="${STUDY_STEPS:-corpus masked markov topology isoflop ablation downstream report}"
RESULTS=experiments/results
want() { [[ " $STEPS " == *" $1 "* ]]; }
say() { echo "== study: $*"; }
sweep() {  # SPEC: run every point, in STUDY_PARALLEL processes sharing the cores
    local n="${STUDY_PARALLEL:-1}" cores
    cores="$(nproc)"
    if [ "$n" -le 1 ]; then "$PY" -m nucleo sweep run "$1"; return; fi
    local threads=$(( cores / n > 0 ? cores / n : 1 )) pids=() status=0
    for _ in $(seq "$n"); do
        OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" "$PY" -m nucleo sweep run "$1" &
        pids+=($!)
        sleep 5  # the first takes the first point's lock before the next looks
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    return "$status"
}

if want corpus && [ ! -f data/offline/shards/manifest.json ]; then
    say "the offline corpus"
    "$PY" -m nucleo data corpus --out data/offline
fi
if want masked && [ ! -f data/offline/shards_masked/manifest.json ]; then
    say "the soft-masked shards (dust on records that arrive unmasked)"
    "$PY" -m nucleo data build --sources data/offline/manifests/all.tsv \
        --out data/offline/shards_masked --mask dust
fi
if want markov && [ ! -f runs/markov/offline.npz ]; then
    say "the k-mer Markov floor"
    "$PY" -m nucleo baseline markov --shards data/offline/shards --max-order 10 --window 512 \
        --windows-per-kingdom 32 --seed 0 --save runs/markov/offline.npz \
        --out "$RESULTS/markov.md"
fi
if want topology && ! grep -q "topology" "$RESULTS/data_stats.md" 2>/dev/null; then
    say "topology across species"
    "$PY" -m nucleo data stats --shards data/offline/shards --out "$RESULTS/data_stats.md" \
        --topology-only
fi
if want isoflop; then
    say "the isoFLOP sweep (resumable)"
    [ -f experiments/sweeps/isoflop_plan.yaml ] || "$PY" -m nucleo scaling plan \
        experiments/sweeps/isoflop.yaml --out experiments/sweeps/isoflop_plan.yaml
    sweep experiments/sweeps/isoflop_plan.yaml
    "$PY" -m nucleo scaling isoflop --experiment nucleo-isoflop --sweep isoflop \
        --plan experiments/sweeps/isoflop_plan.yaml --floor "$RESULTS/markov.json" \
        --bootstrap 1000 --out "$RESULTS/isoflop.md"
fi
if want ablation; then
    say "the loss ablation (resumable)"
    [ -f experiments/sweeps/ablation_plan.yaml ] || "$PY" -m nucleo ablation plan \
        experiments/sweeps/ablation.yaml --out experiments/sweeps/ablation_plan.yaml
    sweep experiments/sweeps/ablation_plan.yaml
    if [ ! -f "$RESULTS/ablation_regions.json" ]; then
        MODELS=()
        for RUN in runs/sweeps/ablation/*/export; do
            MODELS+=(--model "$(basename "$(dirname "$RUN")")=$RUN")
        done
        "$PY" -m nucleo evaluate "${MODELS[@]}" --shards data/offline/shards_masked --split val \
            --max-bases-per-kingdom 30000 --markov runs/markov/offline.npz --markov-order 10 \
            --out "$RESULTS/ablation_regions.md"
    fi
    "$PY" -m nucleo ablation report --experiment nucleo-ablation --sweep ablation \
        --baseline ce --regions "$RESULTS/ablation_regions.json" --floor "$RESULTS/markov.json" \
        --out "$RESULTS/ablation.md"
fi
if want downstream; then
    say "downstream MCC of the baseline and the best variant, every pretraining seed"
    build() {  # task train-per-class test-per-class
        [ -f "data/tasks/$1/task.json" ] || "$PY" -m nucleo tasks build "$1" \
            --corpus data/offline --out "data/tasks/$1" --train-per-class "$2" \
            --test-per-class "$3"
    }
    build kingdom 300 100
    build plasmid_vs_chromosome 1000 300
    build coding_vs_intergenic 1000 300
    for FAMILY in hyena mamba; do
        OUT="$RESULTS/ablation_downstream_$FAMILY.md"
        [ -f "$OUT" ] && continue
        EXPORTS=()
        for PAIR in $("$PY" experiments/study_report.py --pick "$FAMILY"); do
            EXPORTS+=(--export "$PAIR")
        done
        "$PY" -m nucleo finetune data/tasks/kingdom data/tasks/plasmid_vs_chromosome \
            data/tasks/coding_vs_intergenic "${EXPORTS[@]}" --compare --no-scratch --seeds 0 \
            --experiment nucleo-ablation-downstream \
            --table "$OUT"
    done
fi
if want report; then
    say "the report"
    "$PY" experiments/study_report.py --out "$RESULTS/study.md"
fi
