"""Seed-compatible entry point: the original documented commands keep working.

    python train_generic.py
    python train_generic.py --data-path ./data/input.txt --checkpoint-dir ./my_checkpoints --no-wandb
    torchrun --nproc-per-node=4 train_generic.py --mode generic
    python train_generic.py --mode modal

Every flag maps onto a setting of `avatarl train` (see `avatarl config`); training is RL only.
"""

from __future__ import annotations

import argparse
import sys

from avatarl.cli import main as avatarl_main


def translate(argv: list[str]) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("generic", "modal"), help="TRAINING_MODE")
    parser.add_argument("--data-path", help="DATA_PATH")
    parser.add_argument("--checkpoint-dir", help="CHECKPOINT_DIR")
    parser.add_argument("--wandb-project", help="WANDB_PROJECT")
    parser.add_argument("--wandb-name", help="WANDB_NAME")
    parser.add_argument("--no-wandb", action="store_true", help="USE_WANDB=false")
    parser.add_argument("--config", dest="env_file", help="dotenv file with settings")
    args = parser.parse_args(argv)
    flags = {"--training-mode": args.mode, "--data-path": args.data_path,
             "--checkpoint-dir": args.checkpoint_dir, "--wandb-project": args.wandb_project,
             "--wandb-name": args.wandb_name, "--env-file": args.env_file,
             "--use-wandb": "false" if args.no_wandb else None}
    translated = ["train"]
    for flag, value in flags.items():
        if value is not None:
            translated += [flag, value]
    return translated


if __name__ == "__main__":
    sys.exit(avatarl_main(translate(sys.argv[1:])))
