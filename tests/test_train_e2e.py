"""The trainer through its real entry points: CLI, torchrun, train_generic.py, sample, wandb, gpt2
reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from avatarl.checkpoint import find_resume_checkpoint, load_checkpoint, write_checkpoint_file
from tests.helpers import REPO, clean_env, run_cli

pytestmark = pytest.mark.slow  # real trainer processes: see `make test-fast`


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["iter"], r["val_ce"]) for r in records(run_dir) if "val_ce" in r]


def test_train_writes_checkpoints_metrics_and_samples(tiny_env, tmp_path):
    result = run_cli(["train"], tmp_path, **tiny_env)
    assert result.returncode == 0, result.stderr
    run_dir = Path(tiny_env["CHECKPOINT_DIR"])
    assert sorted(p.name for p in run_dir.glob("ckpt_*.pt")) == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    logged = records(run_dir)
    train_lines = [r for r in logged if "reward_mean" in r]
    assert [r["iter"] for r in train_lines] == [2, 4]
    expected = {"reward_mean", "reward_std", "exact_match", "policy_loss", "kl", "kl_coef", "entropy",
                "ratio_mean", "ratio_max", "clip_frac", "grad_norm", "lr", "tokens_seen", "tokens_per_s"}
    assert expected <= set(train_lines[0])
    assert all(r["tokens_per_s"] > 0 and r["tokens_seen"] == r["iter"] * 16 * 20 for r in train_lines)
    assert [i for i, _ in val_curve(run_dir)] == [0, 2, 4]
    assert "samples @ iter 4" in result.stderr


def test_resume_continues_at_the_next_iteration(tiny_env, tmp_path):
    assert run_cli(["train"], tmp_path, **tiny_env).returncode == 0
    result = run_cli(["train"], tmp_path, **{**tiny_env, "TOTAL_ITERS": "6"})
    assert result.returncode == 0, result.stderr
    run_dir = Path(tiny_env["CHECKPOINT_DIR"])
    assert "resumed from" in result.stdout and "at iteration 4" in result.stdout
    iters = [r["iter"] for r in records(run_dir) if "reward_mean" in r]
    assert iters == [2, 4, 6]
    saved = load_checkpoint(find_resume_checkpoint(run_dir))
    assert saved["iteration"] == 6
    steps = {int(s["step"]) for s in saved["optimizer"]["state"].values()}
    assert steps == {6}, "AdamW state must continue from the checkpoint, not restart"


def test_a_checkpoint_written_before_tokens_were_the_unit_resumes(tiny_env, tmp_path):
    """Older checkpoints count chars_seen and hold no objective rank state: they resume, counting on."""
    assert run_cli(["train"], tmp_path, **tiny_env).returncode == 0
    run_dir = Path(tiny_env["CHECKPOINT_DIR"])
    path = run_dir / "ckpt_00000004.pt"
    saved = load_checkpoint(path)
    saved["chars_seen"] = saved.pop("tokens_seen")
    for rank_state in saved["rank_states"]:
        del rank_state["objective"]
    write_checkpoint_file(path, saved)
    result = run_cli(["train"], tmp_path, **{**tiny_env, "TOTAL_ITERS": "6"})
    assert result.returncode == 0, result.stderr
    assert "at iteration 4 (1280 tokens seen)" in result.stdout
    resumed = load_checkpoint(run_dir / "ckpt_00000006.pt")
    assert resumed["tokens_seen"] == 6 * 16 * 20 and "chars_seen" not in resumed


def test_torchrun_two_ranks_on_cpu(tiny_env, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "avatarl", "train"]
    result = subprocess.run(command, cwd=tmp_path, env=clean_env(**tiny_env), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = Path(tiny_env["CHECKPOINT_DIR"])
    logged = records(run_dir)
    final = [r for r in logged if "replica_divergence" in r]
    assert final and final[-1]["world_size"] == 2 and final[-1]["replica_divergence"] == 0.0
    assert [r["iter"] for r in logged if "reward_mean" in r] == [2, 4], "one metrics stream, not one per rank"
    assert sorted(p.name for p in run_dir.glob("ckpt_*.pt")) == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    assert len(load_checkpoint(run_dir / "ckpt_00000004.pt")["rank_states"]) == 2


def test_train_generic_shim_with_seed_flags(tiny_env, tmp_path, corpus_path):
    settings = {k: v for k, v in tiny_env.items() if k not in ("DATA_PATH", "CHECKPOINT_DIR", "USE_WANDB")}
    command = [sys.executable, str(REPO / "train_generic.py"), "--data-path", str(corpus_path),
               "--checkpoint-dir", str(tmp_path / "my_checkpoints"), "--no-wandb"]
    result = subprocess.run(command, cwd=tmp_path, env=clean_env(**settings), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "my_checkpoints" / "ckpt_00000004.pt").is_file()


def blocked_module(tmp_path: Path, name: str) -> dict[str, str]:
    """PYTHONPATH that makes `import name` fail as if the package were not installed."""
    shim = tmp_path / f"no_{name}" / name
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(f"raise ImportError('No module named {name}')\n")
    return {"PYTHONPATH": f"{shim.parent}:{REPO}"}


def test_train_generic_modal_mode_without_modal(tiny_env, tmp_path):
    command = [sys.executable, str(REPO / "train_generic.py"), "--mode", "modal"]
    env = clean_env(**tiny_env, **blocked_module(tmp_path, "modal"))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "pip install 'avatarl[modal]'" in result.stderr


def test_sample_from_checkpoint(tiny_env, tmp_path):
    assert run_cli(["train"], tmp_path, **tiny_env).returncode == 0
    result = run_cli(["sample", "--prompt", "ROMEO:", "--max-new-tokens", "30", "--num-samples", "2"],
                     tmp_path, CHECKPOINT_DIR=tiny_env["CHECKPOINT_DIR"])
    assert result.returncode == 0, result.stderr
    samples = [s for s in result.stdout.split("--- sample ") if s]
    assert len(samples) == 2 and all(s.split("\n", 1)[1].startswith("ROMEO:") for s in samples)
    assert all(len(s.split("\n", 1)[1].rstrip("\n")) >= len("ROMEO:") + 30 for s in samples)


def test_wandb_offline_run_has_the_same_metrics(tiny_env, tmp_path):
    pytest.importorskip("wandb")
    result = run_cli(["train"], tmp_path, **{**tiny_env, "USE_WANDB": "true", "WANDB_MODE": "offline",
                                              "WANDB_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    run_dir = Path(tiny_env["CHECKPOINT_DIR"])
    offline = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    # The offline run log is protobuf records; each logged value is stored as its JSON text, a whole float
    # (a peak RSS of 355.0 MiB, a longest run of 2.0 tokens) without its ".0".
    log_bytes = offline[0].read_bytes()
    for record in records(run_dir):
        for key, value in record.items():
            if key != "iter":
                whole = isinstance(value, float) and value.is_integer()
                texts = {json.dumps(value)} | ({str(int(value))} if whole else set())
                assert key.encode() in log_bytes and any(t.encode() in log_bytes for t in texts), (key, value)


def test_wandb_missing_warns_and_continues(tiny_env, tmp_path):
    env = {**tiny_env, "USE_WANDB": "true", **blocked_module(tmp_path, "wandb")}
    result = run_cli(["train"], tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert "wandb is not installed" in result.stderr


def test_gpt2_reference_through_transformers(tiny_env, tmp_path, tiny_hf_dir):  # noqa: F811
    env = {**tiny_env, "REFERENCE": "gpt2", "REFERENCE_MODEL": str(tiny_hf_dir), "TOTAL_ITERS": "2",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = run_cli(["train"], tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert [r["iter"] for r in records(Path(tiny_env["CHECKPOINT_DIR"])) if "reward_mean" in r] == [2]
