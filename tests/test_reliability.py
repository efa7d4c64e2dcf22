"""Exact continuation, proven with real processes: N iterations straight vs N/2 -> SIGKILL -> resume to N."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avatarl.checkpoint import load_checkpoint
from tests.helpers import (
    TORCHRUN,
    TRAIN,
    compare_runs,
    kill_right_after_checkpoint,
    metric_records,
    run,
    settings,
    start,
)

pytestmark = pytest.mark.slow  # real trainer processes: see `make test-fast`


def check_equivalence(command: list[str], tmp_path: Path, corpus: Path) -> int:
    n = 8
    # Cut inside a log interval and an old-policy interval, with an unsaturated KL controller (measured KL
    # ~5.4 nats/char): the controller's update then depends on every rank's partial metric sums.
    common = dict(TOTAL_ITERS=n, CHECKPOINT_INTERVAL=n // 2, LOG_INTERVAL=3, EVAL_INTERVAL=4, OLD_POLICY_INTERVAL=3,
                  KL_WARM=0, BETA_KL=0.01, KL_TARGET=5.0)
    straight_env = settings(tmp_path, corpus, "straight", **common)
    resumed_env = settings(tmp_path, corpus, "resumed", **common)
    straight = start(command, straight_env, tmp_path, "straight")  # runs while the other leg is killed
    kill_right_after_checkpoint(command, resumed_env, tmp_path, n // 2)
    resumed_dir = Path(resumed_env["CHECKPOINT_DIR"])
    assert not (resumed_dir / f"ckpt_{n:08d}.pt").exists()
    half = load_checkpoint(resumed_dir / f"ckpt_{n // 2:08d}.pt")
    resume = run(command, resumed_env, tmp_path, "resume")
    assert resume.proc.returncode == 0, resume.stdout + resume.stderr
    assert f"ckpt_{n // 2:08d}.pt at iteration {n // 2}" in resume.stdout
    assert straight.wait() == 0, straight.stdout + straight.stderr
    a = load_checkpoint(Path(straight_env["CHECKPOINT_DIR"]) / f"ckpt_{n:08d}.pt")
    b = load_checkpoint(resumed_dir / f"ckpt_{n:08d}.pt")
    assert a["iteration"] == b["iteration"] == n
    assert any(not torch.equal(half["model"][k], b["model"][k]) for k in half["model"]), "the second half trains"
    compared = compare_runs(a, b)
    logged_a = [r for r in metric_records(Path(straight_env["CHECKPOINT_DIR"])) if r["iter"] > n // 2]
    logged_b = [r for r in metric_records(resumed_dir) if r["iter"] > n // 2]
    for ra, rb in zip(logged_a, logged_b, strict=True):  # the metrics of the second half agree too
        ra.pop("chars_per_s", None), rb.pop("chars_per_s", None)
        assert ra == rb
    return compared


def test_sigkill_and_resume_is_bit_identical_single_process(tmp_path, corpus_path):
    compared = check_equivalence(TRAIN, tmp_path, corpus_path)
    print(f"\n[reliability] single process: {compared} tensor bytes compared, all bit-identical")
    assert compared > 100_000


def test_sigkill_and_resume_is_bit_identical_torchrun_two_ranks(tmp_path, corpus_path):
    compared = check_equivalence([*TORCHRUN, "-m", "avatarl", "train"], tmp_path, corpus_path)
    print(f"\n[reliability] torchrun 2 ranks (gloo): {compared} tensor bytes compared, all bit-identical")
    assert compared > 100_000
