"""SIGTERM to a plain `torchrun --nproc-per-node=2` job: to its launcher, and to one worker only."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.helpers import LONG, TORCHRUN, settings, start, stopped_at, training, wait_for, worker_with_rank

pytestmark = pytest.mark.slow  # real trainer processes: see `make test-fast`


def test_sigterm_to_plain_torchrun_still_checkpoints_at_the_step_reached(tmp_path, corpus_path):
    """torchrun forwards the signal: the workers save and exit 0, but torchrun itself reports the signal
    as a failure (exit 1 in torch 2.x), which is why `launch_torchrun` sends signals to the workers."""
    env = settings(tmp_path, corpus_path, **LONG)
    run_dir = Path(env["CHECKPOINT_DIR"])
    job = start([*TORCHRUN, "-m", "avatarl", "train"], env, tmp_path)
    wait_for(training(run_dir), job, what="training")
    job.proc.send_signal(signal.SIGTERM)
    code = job.wait()
    stopped_at(job.stdout, run_dir)
    assert job.stderr.count("Received SIGTERM: finishing the current step") == 2
    print(f"\n[reliability] plain torchrun after SIGTERM exits {code}; its workers saved and stopped")


def test_sigterm_to_one_worker_stops_every_rank_at_one_step(tmp_path, corpus_path):
    env = settings(tmp_path, corpus_path, **LONG)
    run_dir = Path(env["CHECKPOINT_DIR"])
    job = start([*TORCHRUN, "-m", "avatarl", "train"], env, tmp_path)
    wait_for(training(run_dir), job, what="training")
    os.kill(worker_with_rank(job.proc.pid, 1), signal.SIGTERM)
    assert job.wait() == 0, job.stdout + job.stderr
    stopped_at(job.stdout, run_dir)
    assert job.stderr.count("Received SIGTERM") == 1, "rank 1 alone got it; rank 0 followed the all-reduce"
