"""SIGTERM / SIGINT with real processes: the avatarl launcher around torchrun, and a second Ctrl-C."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from avatarl.checkpoint import TEMP_PATTERN, load_checkpoint, verify
from avatarl.launchers.modal import run_finished
from tests.helpers import (
    FAULTY_TRAIN,
    LONG,
    TORCHRUN,
    newest_state,
    run,
    settings,
    start,
    stopped_at,
    training,
    wait_for,
)

pytestmark = pytest.mark.slow  # real trainer processes: see `make test-fast`

# The real CLI: every argument after `launch` goes to torchrun.
LAUNCH = [sys.executable, "-m", "avatarl", "launch", "--standalone", "--nproc-per-node=2"]


def test_sigterm_to_the_launcher_exits_0_and_resume_continues(tmp_path, corpus_path):
    env = settings(tmp_path, corpus_path, **LONG)
    run_dir = Path(env["CHECKPOINT_DIR"])
    job = start([*LAUNCH, "-m", "avatarl", "train"], env, tmp_path)
    wait_for(training(run_dir), job, what="training")
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait() == 0, job.stdout + job.stderr
    iteration = stopped_at(job.stdout, run_dir)
    assert job.stderr.count("Received SIGTERM: finishing the current step") == 2  # each worker, once
    assert not run_finished(run_dir), "a stopped run is not finished: Modal must run it again"

    resumed = run([*TORCHRUN, "-m", "avatarl", "train"], {**env, "TOTAL_ITERS": str(iteration + 2)}, tmp_path)
    assert resumed.proc.returncode == 0, resumed.stdout + resumed.stderr
    assert f"at iteration {iteration} " in resumed.stdout
    assert newest_state(run_dir)["iteration"] == iteration + 2
    assert run_finished(run_dir)


def test_second_sigint_aborts_without_waiting_for_the_save(tmp_path, corpus_path):
    slow = 1.5  # seconds per checkpoint write: the second save is where the Ctrl-Cs land
    env = settings(tmp_path, corpus_path, **{**LONG, "CHECKPOINT_INTERVAL": 1},
                   AVATARL_TEST_SLOW_WRITE=slow)
    run_dir = Path(env["CHECKPOINT_DIR"])
    job = start(FAULTY_TRAIN, env, tmp_path)
    wait_for(lambda: (run_dir / "ckpt_00000001.pt").is_file() and any(
        p.name.startswith(".ckpt_00000002.pt.") for p in run_dir.iterdir()), job, what="the second save")
    job.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    job.proc.send_signal(signal.SIGINT)
    assert job.wait() == 130, job.stdout + job.stderr
    assert "error: aborted by a second interrupt" in job.stderr and "Traceback" not in job.stderr
    assert not (run_dir / "ckpt_00000002.pt").exists(), "the abort must not wait for the checkpoint write"
    torn = [p for p in run_dir.iterdir() if TEMP_PATTERN.match(p.name)]
    assert not torn, "the torn temporary file is removed"
    assert verify(run_dir / "ckpt_00000001.pt") is None
    assert load_checkpoint(run_dir / "ckpt_00000001.pt")["iteration"] == 1
