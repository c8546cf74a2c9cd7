#!/usr/bin/env bash
# polyp_kdas at the KDAS paper's setting on one GPU: the bundle's defaults (352 x 352, 100 epochs, AdamW 1e-4,
# batch 8, AMP), teacher, student alone (`none`) and KDAS, over seeds, with the comparison's confidence intervals.
#
# usage: bash scripts/paper_setting_polyp.sh KVASIR_DIR OUT [SEED ...]        (seeds default to 0)
#
#   KVASIR_DIR  the official Kvasir-SEG release (images/, masks/)
#   OUT         output folder: data/ (the prepared split), comparison/ (plan, jobs, results.md, results.json), logs/
#
# The runs go one after another (teacher, then `none` and `kdas` of each seed in turn): runs at once on one GPU share
# it by time-slicing and gain nothing (four at once on an H200 took 10 s per epoch each), and in turn a deadline
# leaves whole seeds finished. Environment:
#   NUM_WORKERS  data loader workers per run (default 4)
#   DEADLINE_S   stop the run still going after this many seconds, start no more, and build the tables from the
#                finished ones (the others are listed as missing); default: no limit
#   TRIAL=1      a check of the setup in a minute on any machine: 40 image pairs, 1 epoch at 64 x 64
set -uo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash scripts/paper_setting_polyp.sh KVASIR_DIR OUT [SEED ...]" >&2
    exit 2
fi
kvasir=$1
out=$2
shift 2
seeds=("$@")
[ ${#seeds[@]} -eq 0 ] && seeds=(0)
workers=${NUM_WORKERS:-4}
trial_prepare=()
trial_compare=()
if [ "${TRIAL:-0}" = 1 ]; then
    trial_prepare=(--limit 40)
    trial_compare=(--epochs 1 --teacher_epochs 1 --image_size 64 64)
fi
start=$(date +%s)
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out/logs"
elapsed() { echo $(($(date +%s) - start)); }
say() { echo "[$(date +%T) +$(elapsed)s] $*"; }

say "preparing Kvasir-SEG from $kvasir"
python -m kd_components.data.polyp --kvasir "$kvasir" --out "$out/data" --max-size 416 "${trial_prepare[@]}" >"$out/logs/prepare.log" 2>&1 ||
    { cat "$out/logs/prepare.log"; exit 1; }
tail -1 "$out/logs/prepare.log"

cmp=(python "$here/scripts/compare_methods.py" --out "$out/comparison")
python "$here/scripts/compare_methods.py" --bundle polyp_kdas --methods none kdas --seeds "${seeds[@]}" \
    --dataset_dir "$out/data" --out "$out/comparison" --num_workers "$workers" --no_mlflow \
    --no_deterministic_algorithms "${trial_compare[@]}" --plan >"$out/logs/plan.log" 2>&1 || { cat "$out/logs/plan.log"; exit 1; }

run_job() {  # run_job JOB: one job of the plan, its log in logs/; fails at the deadline
    local log="$out/logs/${1//[:+]/_}.log"
    if [ -n "${DEADLINE_S:-}" ] && [ "$(elapsed)" -ge "$DEADLINE_S" ]; then return 1; fi
    say "$1"
    "${cmp[@]}" --only_job "$1" >"$log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [ -n "${DEADLINE_S:-}" ] && [ "$(elapsed)" -ge "$DEADLINE_S" ]; then
            say "deadline: stopping $1 ($(grep -c 'Epoch\[.*\] Complete' "$log") engine epochs logged)"
            kill "$pid"
            return 1
        fi
        sleep 5
    done
    wait "$pid" || { say "$1 failed: see $log"; tail -5 "$log"; return 1; }
}

if run_job teacher; then
    for seed in "${seeds[@]}"; do
        run_job "none:$seed" && run_job "kdas:$seed" || break
    done
fi
say "collecting"
"${cmp[@]}" --collect >"$out/logs/collect.log" 2>&1
cat "$out/comparison/results.md" 2>/dev/null || cat "$out/logs/collect.log"
say "done"
