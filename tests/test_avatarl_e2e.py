"""AvataRL end to end through the real CLI: `avatarl train-referee`, then `ALGORITHM=avatarl avatarl
train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avatarl.checkpoint import load_checkpoint
from avatarl.config_sources import load_config
from avatarl.periodic import COMPLETED
from avatarl.referee import export_referee
from avatarl.trainer import train
from tests.helpers import run_cli

pytestmark = pytest.mark.slow  # real trainer processes: see `make test-fast`

# 2-layer, 64-wide models on 32-char contexts; the referee trains once per module and serves all seeds.
SMALL = {"N_LAYER": "2", "N_HEAD": "4", "N_EMB": "64", "CONTEXT_LEN": "32", "BATCH": "32",
         "MICRO_BATCH": "32", "LR": "3e-3", "MIN_LR": "3e-4", "WARMUP_ITERS": "5", "LOG_INTERVAL": "10",
         "EVAL_WINDOWS": "128", "SAMPLE_INTERVAL": "0", "CHECKPOINT_INTERVAL": "1000",
         "SAVE_INTERMEDIATE_CHECKPOINTS": "false", "USE_WANDB": "false"}
REFEREE_ITERS = "80"
STUDENT = {"ALGORITHM": "avatarl", "TOTAL_ITERS": "40", "EVAL_INTERVAL": "20",
           "SAVE_FINAL_CHECKPOINT": "false"}
MARGIN = 0.8  # nats/char the final validation CE must be below the initial one (seen: 1.07 to 1.42)


def val_curve(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["val_ce"] for record in map(json.loads, lines) if "val_ce" in record]


@pytest.fixture(scope="module")
def referee(tmp_path_factory, corpus_path) -> Path:
    """A referee trained by `avatarl train-referee` on Tiny Shakespeare, shared by the tests of this file."""
    root = tmp_path_factory.mktemp("referee")
    result = run_cli(["train-referee"], root, **SMALL, REFEREE_ITERS=REFEREE_ITERS, EVAL_INTERVAL="40",
                     DATA_PATH=str(corpus_path), CHECKPOINT_DIR=str(root / "ckpt"))
    assert result.returncode == 0, result.stdout + result.stderr
    path = root / "ckpt" / "referee.pt"
    assert "referee saved to" in result.stdout
    return path


def test_referee_file_holds_vocab_context_and_val_ce(referee):
    saved = load_checkpoint(referee)
    assert len(saved["vocab_chars"]) == 65 and saved["vocab_chars"][:2] == ["\n", " "]
    assert saved["context_len"] == 32
    curve = val_curve(referee.parent / "referee")
    assert saved["val_ce"] == pytest.approx(curve[-1])
    assert saved["val_ce"] < curve[0] - MARGIN, curve


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_avatarl_student_learns(seed, referee, tmp_path, corpus_path):
    run_dir = tmp_path / "student"
    result = run_cli(["train"], tmp_path, **SMALL, **STUDENT, SEED=str(seed), DATA_PATH=str(corpus_path),
                     CHECKPOINT_DIR=str(run_dir), REFEREE_PATH=str(referee))
    assert result.returncode == 0, result.stdout + result.stderr
    curve = val_curve(run_dir)
    print(f"seed {seed}: student val CE {[round(v, 3) for v in curve]}")
    assert curve[-1] < curve[0] - MARGIN, curve
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("true_top_frac" in record and "reward_mean" in record for record in logged)


def test_on_policy_avatarl_student_learns(referee, tmp_path, corpus_path):
    """ACTION_SET=sampled: K = ceil(0.5 x 65) = 33 draws per position from the student, rewarded by the
    ideal."""
    run_dir = tmp_path / "student"
    result = run_cli(["train"], tmp_path, **SMALL, **STUDENT, ACTION_SET="sampled",
                     DATA_PATH=str(corpus_path), CHECKPOINT_DIR=str(run_dir), REFEREE_PATH=str(referee))
    assert result.returncode == 0, result.stdout + result.stderr
    curve = val_curve(run_dir)
    print(f"sampled: student val CE {[round(v, 3) for v in curve]}")
    assert curve[-1] < curve[0] - MARGIN, curve
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {record["action_set_size"] for record in logged if "action_set_size" in record} == {33.0}


def test_missing_referee_is_a_config_error(tmp_path, corpus_path):
    missing = tmp_path / "nowhere" / "referee.pt"
    result = run_cli(["train"], tmp_path, **SMALL, **STUDENT, DATA_PATH=str(corpus_path),
                     CHECKPOINT_DIR=str(tmp_path / "run"), REFEREE_PATH=str(missing))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "REFEREE_PATH" in output and str(missing) in output and "avatarl train-referee" in output


def other_corpus(path: Path) -> Path:
    """Text with another alphabet (no lower-case a-d, no punctuation but ':'), yet the trainer's sample
    prompts."""
    path.write_text("".join(f"First Citizen: ROMEO {i * 7919 % 10007}\n" for i in range(2000)))
    return path


def brief_referee(directory: Path, data: Path, context_len: int) -> Path:
    """A 1-step referee, trained and exported in-process (the CLI path is covered by the fixture above)."""
    settings = {**SMALL, "N_LAYER": "1", "CONTEXT_LEN": str(context_len), "BATCH": "8", "MICRO_BATCH": "8",
                "TOTAL_ITERS": "1", "EVAL_INTERVAL": "1", "EVAL_WINDOWS": "8", "DATA_PATH": str(data),
                "CHECKPOINT_DIR": str(directory)}
    cfg, _ = load_config(environ=settings, env_file=None)
    assert train(cfg, role="referee") == COMPLETED
    return export_referee(cfg)


@pytest.mark.parametrize("mismatch", ["shorter context", "other corpus"])
def test_incompatible_referee_is_a_config_error(mismatch, tmp_path, corpus_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if mismatch == "shorter context":
        made = brief_referee(tmp_path / "referee", corpus_path, context_len=16)
    else:
        made = brief_referee(tmp_path / "referee", other_corpus(tmp_path / "digits.txt"), context_len=32)
    result = run_cli(["train"], tmp_path, **SMALL, **STUDENT, DATA_PATH=str(corpus_path),
                     CHECKPOINT_DIR=str(tmp_path / "run"), REFEREE_PATH=str(made))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert f"REFEREE_PATH='{made}'" in output
    if mismatch == "shorter context":
        assert "CONTEXT_LEN=16" in output and "CONTEXT_LEN=32" in output and "avatarl train-referee" in output
    else:
        assert "vocabulary differs" in output and "avatarl train-referee" in output
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "the error must come before any training"
