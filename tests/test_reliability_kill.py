"""SIGKILL at random moments during checkpoint writes: every time, a loadable checkpoint remains and
RESUME=auto continues. The victims' writes are slowed down by AVATARL_TEST_SLOW_WRITE of tests/fault_entry.py
(the file is written in chunks with sleeps in between, and so is the `latest` pointer), so a kill lands
inside a write."""

from __future__ import annotations

import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from avatarl.checkpoint import TEMP_PATTERN, list_checkpoints, verify
from tests.helpers import FAULTY_TRAIN, TRAIN, newest_state, run, settings, start, wait_for

pytestmark = pytest.mark.slow  # real trainer processes: see `make test-fast`

SLOW = 0.6  # seconds to write one checkpoint, and again the `latest` pointer after it
KILLS_PER_DIR, DIRS = 10, 2  # two run directories killed in parallel: 20 kills
TOTAL = 40


@dataclass
class Tally:
    kills: int = 0
    resumed: int = 0         # starts after a kill that printed "resumed from" (next victim, final run)
    mid_checkpoint: int = 0  # the checkpoint's temporary file was being written when the kill landed
    mid_pointer: int = 0     # the checkpoint was complete, its `latest` pointer was being written
    iterations: list[int] = field(default_factory=list)


def temp_files(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir() if TEMP_PATTERN.match(p.name)}


def kill_rounds(env: dict[str, str], cwd: Path, seed: int) -> Tally:
    rng, tally, run_dir = random.Random(seed), Tally(), Path(env["CHECKPOINT_DIR"])
    seeded = run(TRAIN, {**env, "TOTAL_ITERS": 1, "CHECKPOINT_INTERVAL": 1}, cwd, "seed")
    assert seeded.proc.returncode == 0, seeded.stderr
    for round_ in range(KILLS_PER_DIR):
        before = temp_files(run_dir)
        job = start(FAULTY_TRAIN, {**env, "AVATARL_TEST_SLOW_WRITE": str(SLOW)}, cwd, "victim")
        wait_for(lambda: temp_files(run_dir) - before, job, what="a checkpoint write")  # noqa: B023
        time.sleep(rng.uniform(0.0, 1.5 * SLOW))  # 2/3 inside the checkpoint file, 1/3 inside the pointer
        writing = {name.split(".")[1] for name in temp_files(run_dir) - before}
        job.proc.send_signal(signal.SIGKILL)
        assert job.wait() == -signal.SIGKILL, "the kill must land while the trainer runs"
        tally.kills += 1
        tally.mid_checkpoint += any(name.startswith("ckpt_") for name in writing)
        tally.mid_pointer += "latest" in writing
        assert "resumed from" in job.stdout, job.stdout + job.stderr
        tally.resumed += round_ > 0
        for path in list_checkpoints(run_dir):  # never a torn checkpoint, not only a valid newest one
            assert verify(path) is None, verify(path)
        tally.iterations.append(newest_state(run_dir)["iteration"])
    final = run(TRAIN, env, cwd, "final")
    assert final.proc.returncode == 0, final.stdout + final.stderr
    tally.resumed += "resumed from" in final.stdout
    assert newest_state(run_dir)["iteration"] == TOTAL
    assert not temp_files(run_dir), "temporary files of killed writers are cleaned up by the next save"
    return tally


def test_sigkill_during_checkpoint_writes_always_leaves_a_resumable_run(tmp_path, corpus_path):
    envs = [settings(tmp_path, corpus_path, f"run{i}", TOTAL_ITERS=TOTAL, CHECKPOINT_INTERVAL=1,
                     LOG_INTERVAL=1, EVAL_INTERVAL=100) for i in range(DIRS)]
    with ThreadPoolExecutor(DIRS) as pool:
        tallies = list(pool.map(kill_rounds, envs, [tmp_path] * DIRS, range(DIRS)))
    kills = sum(t.kills for t in tallies)
    resumed = sum(t.resumed for t in tallies)
    mid_checkpoint = sum(t.mid_checkpoint for t in tallies)
    mid_pointer = sum(t.mid_pointer for t in tallies)
    print(f"\n[reliability] SIGKILLs during checkpoint writes: {kills} tried ({mid_checkpoint} inside a "
          f"checkpoint file, {mid_pointer} inside the latest pointer); resumes that succeeded: "
          f"{resumed}/{kills}; "
          f"iterations after each kill: {[t.iterations for t in tallies]}")
    assert kills >= 20 and resumed == kills  # each victim but the first resumed, then the final run did
    assert mid_checkpoint >= 5, "most kills must land inside a checkpoint file write"
    for tally in tallies:
        assert tally.iterations == sorted(tally.iterations), "a kill never loses a complete checkpoint"
