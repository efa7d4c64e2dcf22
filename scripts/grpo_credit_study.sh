#!/usr/bin/env bash
# The study of docs/grpo-defaults.md "Autoregressive GRPO: does its reward teach?", as one learning
# benchmark of the char corpus (`avatarl bench learning --quick`: the same budget of 633,600 chars for every
# row, seeds 1337-1339): the shipped GRPO and its reward-off (bench rows grpo, grpo_reward_off), the
# --preset grpo-autoregressive rows (grpo_ar_credit, grpo_ar_credit_off), and the credit schemes between
# them as rows of their own. Writes OUT/learning.json and .png and prints the table (mean (min-max) over
# the seeds).
#   bash scripts/grpo_credit_study.sh [OUT_DIR]   (about 100 s a K=4 run, 150 s a K=16 run, 2 CPU cores)
set -euo pipefail
out=${1:-grpo-credit-study}
python=${PYTHON:-python}
"$python" -m avatarl bench learning --quick --seeds "${SEEDS:-3}" --out "$out" \
  --methods grpo grpo_reward_off grpo_ar_credit grpo_ar_credit_off \
  --row seed_prefix ALGORITHM=grpo CREDIT=prefix \
  --row seed_prefix_log_reward ALGORITHM=grpo CREDIT=prefix ADVANTAGE=log_reward \
  --row bare_group_std grpo-autoregressive CREDIT=all ADVANTAGE=group_std \
  --row bare_prefix grpo-autoregressive ADVANTAGE=group_std
