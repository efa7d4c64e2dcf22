#!/usr/bin/env bash
# The study of docs/grpo-defaults.md "Autoregressive GRPO: does its reward teach?": each row is
# `avatarl train --preset bench-quick` at the learning benchmark's budget for autoregressive GRPO (495 steps
# of 32 x (32 + 8) chars = 633,600 chars, warm-up and evaluations scaled as `avatarl bench learning` does),
# once per seed; each row's reward-off twin is the same settings with EXACT_MATCH_REWARD=0 PARTIAL_CREDIT=0.
# Prints one line per run (final validation accuracy, CE, calibrated CE, lowest entropy, credited share)
# and, per row, the mean and range over the seeds.
#   bash scripts/grpo_credit_study.sh [OUT_DIR] [ROW ...]   (1-4 min per K=4 run, 3-5 per K=16 run, 2 CPUs)
set -euo pipefail
out=${1:-grpo-credit-study}
shift || true
python=${PYTHON:-python}
seeds=${SEEDS:-"1337 1338 1339"}
common=(ALGORITHM=grpo ROLLOUTS=autoregressive TOTAL_ITERS=495 WARMUP_ITERS=25 EVAL_INTERVAL=41 USE_WANDB=false
        SAVE_INTERMEDIATE_CHECKPOINTS=false SAVE_FINAL_CHECKPOINT=false SAMPLE_INTERVAL=0 RESUME=never
        OVERWRITE=true)
off="EXACT_MATCH_REWARD=0 PARTIAL_CREDIT=0"
# B: no KL anchor, exact match only, 16 samples per context
bare="BETA_KL=0 ADAPTIVE_KL=false PARTIAL_CREDIT=0 K_SAMPLES=16"
declare -A rows=(
  [seed]=""                                     # the shipped defaults: CREDIT=all, adaptive KL to the trigram
  [seed_prefix]="CREDIT=prefix"
  [seed_off]="$off"                             # reward off: CREDIT changes nothing when every reward is 0
  [bare_all]="$bare"
  [bare_prefix]="$bare CREDIT=prefix"
  [bare_off]="$bare $off"
  [seed_log_reward]="CREDIT=prefix ADVANTAGE=log_reward"   # r / group mean - 1 on the true prefix
  [bare_log_reward]="$bare CREDIT=prefix ADVANTAGE=log_reward"
)
order=(seed seed_prefix seed_off bare_all bare_prefix bare_off seed_log_reward bare_log_reward)
[ $# -gt 0 ] && order=("$@")
for name in "${order[@]}"; do
  [ -n "${rows[$name]+set}" ] || { echo "error: no row $name (rows: ${!rows[*]})" >&2; exit 2; }
  for seed in $seeds; do
    dir="$out/$name/seed$seed"
    mkdir -p "$dir"
    # shellcheck disable=SC2086  # the row's settings are words on purpose
    env "${common[@]}" ${rows[$name]} SEED="$seed" CHECKPOINT_DIR="$dir" "$python" -m avatarl train \
      --preset bench-quick >"$dir/log.txt" 2>&1
    "$python" - "$dir/metrics.jsonl" "$name" "$seed" <<'PY' | tee -a "$out/runs.tsv"
import sys
from pathlib import Path

from avatarl.tracking import read_metrics

records = read_metrics(Path(sys.argv[1]))
last = [r for r in records if "val_acc" in r][-1]
low = min(r["entropy"] for r in records if "entropy" in r)
credited = [r["credited"] for r in records if "credited" in r]
shown = f"{sum(credited) / len(credited):.3f}" if credited else "1"
print(f"{sys.argv[2]}\t{sys.argv[3]}\t{last['val_acc']:.4f}\t{last['val_ce']:.3f}\t"
      f"{last['val_ce_calibrated']:.3f}\t{low:.2f}\t{shown}")
PY
  done
done
"$python" - "$out/runs.tsv" <<'PY'
import sys
from collections import defaultdict

runs = defaultdict(dict)
for line in open(sys.argv[1]):
    name, seed, acc, *_ = line.split("\t")
    runs[name][seed] = float(acc)  # a rerun of a seed replaces it
print("row\tseeds\tmean accuracy (min-max)")
for name, by_seed in runs.items():
    accs = list(by_seed.values())
    print(f"{name}\t{len(accs)}\t{sum(accs) / len(accs):.3f} ({min(accs):.3f}-{max(accs):.3f})")
PY
