"""The run's own guards, with real processes: non-finite steps, the heartbeat and `avatarl health`, the
lock on CHECKPOINT_DIR, and secrets that must never be written anywhere."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest
import torch

from avatarl.checkpoint import load_checkpoint
from tests.helpers import (
    FAULTY_TRAIN,
    TRAIN,
    assert_identical,
    kill_job,
    metric_records,
    newest_state,
    run,
    run_cli,
    settings,
    start,
    wait_for,
)

pytestmark = pytest.mark.slow  # real trainer processes: see `make test-fast`


def test_one_nan_step_is_skipped_and_counted(tmp_path, corpus_path):
    env = settings(tmp_path, corpus_path, TOTAL_ITERS=4, AVATARL_TEST_NAN_ITERS=1)
    done = run(FAULTY_TRAIN, env, tmp_path)
    assert done.proc.returncode == 0, done.stdout + done.stderr
    logged = [r for r in metric_records(Path(env["CHECKPOINT_DIR"])) if "skipped" in r]
    assert [(r["iter"], r["skipped"], r["bad_steps_total"]) for r in logged] == [(2, 0.5, 1), (4, 0.0, 1)]
    saved = newest_state(Path(env["CHECKPOINT_DIR"]))
    assert {int(s["step"]) for s in saved["optimizer"]["state"].values()} == {3}, "3 optimizer steps of 4"


def test_persistent_nans_stop_with_exit_3_and_the_last_good_weights(tmp_path, corpus_path):
    env = settings(tmp_path, corpus_path, TOTAL_ITERS=50, CHECKPOINT_INTERVAL=1, MAX_BAD_STEPS=3,
                   AVATARL_TEST_NAN_ITERS="2-1000")
    run_dir = Path(env["CHECKPOINT_DIR"])
    stopped = run(FAULTY_TRAIN, env, tmp_path)
    assert stopped.proc.returncode == 3, stopped.stdout + stopped.stderr
    assert "error: 3 consecutive non-finite steps (MAX_BAD_STEPS=3)" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    final = newest_state(run_dir)
    assert final["iteration"] == 5 and final["bad_streak"] == 3
    assert all(torch.isfinite(t).all() for t in final["model"].values())
    last_good = load_checkpoint(run_dir / "ckpt_00000002.pt")  # the last step that was not skipped
    assert_identical(last_good["model"], final["model"])


def test_health_during_a_run_and_after_it_died_and_the_run_lock(tmp_path, corpus_path):
    env = settings(tmp_path, corpus_path, TOTAL_ITERS=100_000, CHECKPOINT_INTERVAL=2, HEARTBEAT_INTERVAL=0.2,
                   EVAL_INTERVAL=1000)
    run_dir = Path(env["CHECKPOINT_DIR"])
    first = start(TRAIN, env, tmp_path)
    wait_for(lambda: (run_dir / "heartbeat.json").is_file() and (run_dir / "ckpt_00000002.pt").is_file(),
             first, what="a heartbeat and a checkpoint")
    health = run_cli(["health", "--max-age", "5"], tmp_path, timeout=120, CHECKPOINT_DIR=str(run_dir))
    assert health.returncode == 0 and health.stdout.startswith("healthy"), health.stdout + health.stderr

    second = run(TRAIN, env, tmp_path)
    assert second.proc.returncode == 75  # EX_TEMPFAIL: retryable, the other trainer may be terminating
    assert f"is in use by a running trainer (pid {first.proc.pid} on" in second.stderr

    kill_job(first)  # a dead trainer: no more heartbeats, and a lock file naming a process that is gone
    time.sleep(1.5)
    health = run_cli(["health", "--max-age", "1"], tmp_path, timeout=120, CHECKPOINT_DIR=str(run_dir))
    assert health.returncode == 1, health.stdout + health.stderr
    assert "unhealthy: last heartbeat" in health.stderr, health.stderr

    third = run(TRAIN, {**env, "TOTAL_ITERS": "1"}, tmp_path)
    assert third.proc.returncode == 0, third.stdout + third.stderr
    assert f"Taking over the stale lock of a process that is gone (pid {first.proc.pid}" in third.stderr
    assert "resumed from" in third.stdout


SECRETS = ("WANDB_API_KEY", "HF_TOKEN", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET")


def test_secrets_never_reach_logs_config_metrics_or_checkpoints(tmp_path, corpus_path):
    values = {name: f"{name.lower()}-{secrets.token_hex(16)}" for name in SECRETS}
    (tmp_path / ".env").write_text("HF_TOKEN=hf-dotenv-" + "7" * 24 + "\n")  # read from the working directory
    values_in_dotenv = ["hf-dotenv-" + "7" * 24]
    env = settings(tmp_path, corpus_path, TOTAL_ITERS=2, SAMPLE_INTERVAL=1, LOG_LEVEL="DEBUG", **values)
    trained = run(TRAIN, env, tmp_path)
    assert trained.proc.returncode == 0, trained.stdout + trained.stderr
    shown = run_cli(["config"], tmp_path, timeout=120, **env)
    assert shown.returncode == 0, shown.stderr
    texts = [trained.stdout.encode(), trained.stderr.encode(), shown.stdout.encode(), shown.stderr.encode()]
    files = [p for p in Path(env["CHECKPOINT_DIR"]).rglob("*") if p.is_file()]
    assert any(p.name.startswith("ckpt_") for p in files) and any(p.name == "metrics.jsonl" for p in files)
    for secret in [*values.values(), *values_in_dotenv]:
        assert not any(secret.encode() in blob for blob in texts), f"{secret[:8]}… printed"
        assert not any(secret.encode() in p.read_bytes() for p in files), f"{secret[:8]}… written to a file"
