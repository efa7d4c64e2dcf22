"""The student learns from RL alone: validation CE falls, entropy holds, no supervised gradient reaches it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from avatarl.config_sources import load_config
from avatarl.periodic import COMPLETED
from avatarl.trainer import train
from tests.helpers import run_cli

pytestmark = pytest.mark.slow  # real trainer processes: see `make test-fast`

# GRPO on a 2-layer, 64-wide student, 48 contexts x K=4 per step, 40 steps (~15 s on one core).
LEARN = {"N_LAYER": "2", "N_HEAD": "4", "N_EMB": "64", "CONTEXT_LEN": "32", "HORIZON": "8", "K_SAMPLES": "4",
         "BATCH": "48", "MICRO_BATCH": "48", "TOTAL_ITERS": "40", "WARMUP_ITERS": "5",
         "LR": "1e-3", "LOG_INTERVAL": "5",
         "EVAL_INTERVAL": "10", "EVAL_WINDOWS": "128", "SAMPLE_INTERVAL": "0", "CHECKPOINT_INTERVAL": "1000",
         "USE_WANDB": "false"}
MARGIN = 0.5  # nats/char that the final validation CE must be below the initial one


def curve(run_dir: Path) -> tuple[list[float], list[float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_ce"] for r in lines if "val_ce" in r], [r["entropy"] for r in lines if "entropy" in r]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_grpo_student_learns_without_collapse(seed, tmp_path, corpus_path):
    run_dir = tmp_path / "run"
    result = run_cli(["train"], tmp_path, **LEARN, SEED=str(seed), DATA_PATH=str(corpus_path),
                     CHECKPOINT_DIR=str(run_dir))
    assert result.returncode == 0, result.stderr
    val, entropy = curve(run_dir)
    print(f"seed {seed}: val CE {[round(v, 3) for v in val]}, entropy {[round(e, 2) for e in entropy]}")
    assert val[-1] < val[0] - MARGIN, val
    assert min(entropy) > 1.0, f"entropy collapsed: {entropy}"


def test_student_never_receives_a_cross_entropy_gradient(tmp_path, corpus_path, monkeypatch):
    """Every supervised loss computed during an RL run (the validation CE) runs with autograd off."""
    calls: list[bool] = []
    original = F.cross_entropy

    def recording_cross_entropy(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", recording_cross_entropy)
    monkeypatch.chdir(tmp_path)
    cfg, _ = load_config(environ={**LEARN, "TOTAL_ITERS": "4", "DATA_PATH": str(corpus_path),
                                  "CHECKPOINT_DIR": str(tmp_path / "run")})
    assert train(cfg) == COMPLETED
    assert calls, "validation CE should have been measured"
    assert not any(calls), "cross-entropy was computed with autograd enabled during student training"
