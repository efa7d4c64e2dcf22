"""Small GRPO runs on Tiny Shakespeare to choose knob defaults that do not collapse the policy.

Each run is a real `avatarl train` (`trainer.train` with the GRPO objective the product ships: old
policy refreshed every OLD_POLICY_INTERVAL, the adaptive KL controller, the n-gram reference) of a
fresh student, at a constant learning rate after the warm-up (USE_LR_DECAY=false, so a collapse is not
hidden by a vanishing step size). The study starts from the seed's knobs (STUDY_SETTINGS: BETA_KL 1e-3,
KL_WARM 50k chars, KL_TARGET 0.02, a bigram reference) on a 2-layer, 128-wide student with 64 contexts
per step; every avatarl setting flag (`--beta-kl 1.0`, `--ngram-order 3`, ...) overrides them.
--reward-off sets EXACT_MATCH_REWARD=0 and PARTIAL_CREDIT=0: only the KL and entropy terms train.

Prints the validation CE of each evaluation with the training metrics logged at that iteration, and
appends a JSON summary to --out.

    python scripts/grpo_defaults_study.py --label seed --total-iters 300 --out study.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from avatarl.cli import add_setting_flags, cli_settings
from avatarl.config_sources import load_config
from avatarl.run_dir import METRICS
from avatarl.tracking import read_metrics
from avatarl.trainer import train

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
STUDY_SETTINGS = {
    "N_LAYER": "2", "N_HEAD": "4", "N_EMB": "128", "CONTEXT_LEN": "32", "HORIZON": "8", "K_SAMPLES": "4",
    "BATCH": "64", "MICRO_BATCH": "64", "TOTAL_ITERS": "300", "LR": "1e-3", "MIN_LR": "1e-3",
    "WARMUP_ITERS": "10", "USE_LR_DECAY": "false", "BETA_KL": "1e-3", "KL_WARM": "50000", "KL_TARGET": "0.02",
    "NGRAM_ORDER": "2", "LOG_INTERVAL": "5", "EVAL_INTERVAL": "25", "EVAL_WINDOWS": "512",
    "SAMPLE_INTERVAL": "0", "USE_WANDB": "false", "DEVICE": "cpu", "SAVE_INTERMEDIATE_CHECKPOINTS": "false",
    "SAVE_FINAL_CHECKPOINT": "false", "RESUME": "never", "OVERWRITE": "true",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="run")
    parser.add_argument("--out", default="", help="append the JSON summary to this file")
    parser.add_argument("--run-dir", default="study-runs", help="the runs go to RUN_DIR/LABEL")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--reward-off", action="store_true", help="EXACT_MATCH_REWARD=0 and PARTIAL_CREDIT=0")
    add_setting_flags(parser)
    return parser.parse_args(argv)


def last_before(records: list[dict[str, Any]], iteration: int, name: str) -> float:
    """The newest logged value of `name` at or before `iteration` (nan when none)."""
    values = [r[name] for r in records if name in r and r["iter"] <= iteration]
    return values[-1] if values else math.nan


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir) / args.label
    settings = {**STUDY_SETTINGS, "DATA_PATH": str(DEFAULT_CORPUS), **cli_settings(args),
                "CHECKPOINT_DIR": str(run_dir)}
    if args.reward_off:
        settings.update(EXACT_MATCH_REWARD="0", PARTIAL_CREDIT="0")
    cfg, _ = load_config(settings, args.env_file)
    started = time.time()
    outcome = train(cfg)  # completed or stopped; what ends it otherwise raises (avatarl/errors.py)
    records = read_metrics(run_dir / METRICS)
    history = {r["iter"]: r["val_ce"] for r in records if "val_ce" in r}
    for it, val_ce in history.items():
        shown = " ".join(f"{name} {last_before(records, it, name):.3f}"
                         for name in ("entropy", "kl", "kl_coef", "reward_mean", "exact_match", "clip_frac"))
        print(f"[{args.label}] iter {it} val CE {val_ce:.3f} {shown}", flush=True)
    final = next((r for r in reversed(records) if "entropy" in r), {})
    summary = {"label": args.label, "outcome": outcome, "settings": settings, "val_ce": history,
               "final": final, "seconds": time.time() - started}
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(summary) + "\n")
    return summary


if __name__ == "__main__":
    main()
