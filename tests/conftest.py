"""Shared fixtures: the Tiny Shakespeare corpus from ../shared, and a runner for the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

# A model and budget small enough for 2 CPU cores; tests override what they need.
TINY = {
    "N_LAYER": "1", "N_HEAD": "2", "N_EMB": "32", "CONTEXT_LEN": "16", "HORIZON": "4", "K_SAMPLES": "2",
    "BATCH": "16", "MICRO_BATCH": "8", "TOTAL_ITERS": "4", "WARMUP_ITERS": "1", "LOG_INTERVAL": "2",
    "EVAL_INTERVAL": "2", "EVAL_WINDOWS": "32", "SAMPLE_INTERVAL": "0", "CHECKPOINT_INTERVAL": "2",
    "USE_WANDB": "false",
}


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    if not CORPUS.is_file():
        pytest.fail(f"Tiny Shakespeare is expected at {CORPUS} (../shared/data relative to the repo root)")
    return CORPUS


def clean_env(**settings: str) -> dict[str, str]:
    """The process environment without any avatarl setting, plus `settings`."""
    from avatarl.config import LAUNCHER_NAMES, config_fields

    names = set(config_fields()) | LAUNCHER_NAMES
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("AVATARL_TEST")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(settings)
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 300, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avatarl", *args], cwd=cwd, env=clean_env(**settings),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tiny_env(tmp_path: Path, corpus_path: Path) -> dict[str, str]:
    return {**TINY, "DATA_PATH": str(corpus_path), "CHECKPOINT_DIR": str(tmp_path / "ckpt")}
