"""Bad checkpoints and bad settings, with real processes: corrupt and malicious files, a changed model,
RESUME=never on an existing run, a full disk."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from avatarl.checkpoint import MAGIC, CheckpointError, load_checkpoint
from tests.helpers import (
    TRAIN,
    assert_identical,
    metric_records,
    newest_state,
    run,
    run_cli,
    settings,
)

pytestmark = pytest.mark.slow  # real trainer processes: see `make test-fast`


def ckpt(run_dir: Path, iteration: int) -> Path:
    return run_dir / f"ckpt_{iteration:08d}.pt"


BASE = dict(TOTAL_ITERS=4, CHECKPOINT_INTERVAL=1)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus_path) -> Path:
    """One TINY run of 4 iterations with checkpoints 2, 3 and 4, trained once for the tests to copy."""
    where = tmp_path_factory.mktemp("finished")
    done = run(TRAIN, settings(where, corpus_path, **BASE), where)
    assert done.proc.returncode == 0, done.stdout + done.stderr
    return where / "run"


def copy_of(finished_run: Path, tmp_path: Path, corpus_path: Path) -> tuple[dict[str, str], Path]:
    env = settings(tmp_path, corpus_path, **BASE)
    shutil.copytree(finished_run, env["CHECKPOINT_DIR"])
    return env, Path(env["CHECKPOINT_DIR"])


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(finished_run, tmp_path, corpus_path):
    env, run_dir = copy_of(finished_run, tmp_path, corpus_path)
    original = load_checkpoint(ckpt(run_dir, 4))

    raw = ckpt(run_dir, 4).read_bytes()
    ckpt(run_dir, 4).write_bytes(raw[: len(raw) // 2])  # truncated, as by a full disk without atomic writes
    resumed = run(TRAIN, env, tmp_path)
    assert resumed.proc.returncode == 0, resumed.stdout + resumed.stderr
    assert "Skipping checkpoint ckpt_00000004.pt" in resumed.stderr
    assert "corrupted or truncated" in resumed.stderr
    assert "ckpt_00000003.pt at iteration 3" in resumed.stdout
    assert (run_dir / "ckpt_00000004.pt.abandoned").is_file(), "the bad file is set aside, not deleted"
    redone = load_checkpoint(ckpt(run_dir, 4))
    assert_identical(original["model"], redone["model"])  # iteration 4 redone exactly

    raw = bytearray(ckpt(run_dir, 4).read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit in the payload
    ckpt(run_dir, 4).write_bytes(bytes(raw))
    resumed = run(TRAIN, {**env, "TOTAL_ITERS": "5"}, tmp_path)
    assert resumed.proc.returncode == 0, resumed.stdout + resumed.stderr
    assert "Skipping checkpoint ckpt_00000004.pt" in resumed.stderr
    assert "ckpt_00000003.pt at iteration 3" in resumed.stdout
    assert "Setting changed since the checkpoint: TOTAL_ITERS: 4 -> 5" in resumed.stderr, "allowed and logged"
    assert newest_state(run_dir)["iteration"] == 5


def test_resume_from_an_older_path_sets_the_newer_checkpoints_aside(finished_run, tmp_path, corpus_path):
    env, run_dir = copy_of(finished_run, tmp_path, corpus_path)
    original = load_checkpoint(ckpt(run_dir, 4))
    resumed = run(TRAIN, {**env, "RESUME": str(ckpt(run_dir, 2))}, tmp_path)
    assert resumed.proc.returncode == 0, resumed.stdout + resumed.stderr
    assert "ckpt_00000002.pt at iteration 2" in resumed.stdout
    assert "Set aside ckpt_00000004.pt.abandoned" in resumed.stderr
    assert sorted(p.name for p in run_dir.glob("ckpt_*")) == [
        "ckpt_00000002.pt", "ckpt_00000003.pt", "ckpt_00000003.pt.abandoned", "ckpt_00000004.pt",
        "ckpt_00000004.pt.abandoned"]
    assert_identical(original["model"], load_checkpoint(ckpt(run_dir, 4))["model"])


def test_changed_model_shape_is_refused_listing_the_differences(finished_run, tmp_path, corpus_path):
    env, run_dir = copy_of(finished_run, tmp_path, corpus_path)
    other_text = tmp_path / "other.txt"  # one more symbol: a different vocabulary
    other_text.write_text(corpus_path.read_text(encoding="utf-8") + "\u00e9", encoding="utf-8")
    changed = {"N_EMB": "64", "N_LAYER": "2", "TOTAL_ITERS": "6", "DATA_PATH": str(other_text)}
    refused = run(TRAIN, {**env, **changed}, tmp_path)
    assert refused.proc.returncode == 2
    assert "N_EMB: checkpoint 32, now 64" in refused.stderr
    assert "N_LAYER: checkpoint 1, now 2" in refused.stderr
    assert "vocabulary: checkpoint and now differ, 65 vs 66 symbols (DATA_PATH, TOKENIZER)" in refused.stderr
    differences = refused.stderr.split("the settings differ")[1]
    assert "TOTAL_ITERS" not in differences, "harmless settings are not listed"
    assert "Traceback" not in refused.stderr
    assert newest_state(run_dir)["iteration"] == 4


class Exploit:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, payload: bytes) -> None:
    """A file with a valid avatarl header and checksum around an arbitrary payload."""
    path.write_bytes(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def test_malicious_pickle_is_refused_and_never_executed(finished_run, tmp_path, corpus_path):
    env, run_dir = copy_of(finished_run, tmp_path, corpus_path)
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"model": Exploit(marker), "iteration": 9}, buffer)
    plant(ckpt(run_dir, 9), buffer.getvalue())
    plant(tmp_path / "raw.pt", pickle.dumps(Exploit(marker), protocol=2))

    for path in (ckpt(run_dir, 9), tmp_path / "raw.pt"):
        with pytest.raises(CheckpointError, match="Refusing to load .*posix.system"):
            load_checkpoint(path)
    refused = run(TRAIN, {**env, "TOTAL_ITERS": "6"}, tmp_path)  # RESUME=auto picks the planted file
    assert refused.proc.returncode == 2
    assert f"Refusing to load {ckpt(run_dir, 9)}" in refused.stderr and "resumed from" not in refused.stdout
    sample = run_cli(["sample", "--checkpoint", str(ckpt(run_dir, 9))], tmp_path, timeout=120,
                     CHECKPOINT_DIR=str(run_dir))
    assert sample.returncode == 2 and "Refusing to load" in sample.stderr
    assert not marker.exists(), "the planted code ran"


def test_resume_never_refuses_an_existing_run_unless_overwrite(finished_run, tmp_path, corpus_path):
    env, run_dir = copy_of(finished_run, tmp_path, corpus_path)
    refused = run(TRAIN, {**env, "RESUME": "never"}, tmp_path)
    assert refused.proc.returncode == 2
    assert "RESUME=never but" in refused.stderr and "OVERWRITE=true" in refused.stderr
    fresh = run(TRAIN, {**env, "RESUME": "never", "OVERWRITE": "true", "TOTAL_ITERS": "1"}, tmp_path)
    assert fresh.proc.returncode == 0 and "resumed from" not in fresh.stdout
    assert sorted(p.name for p in run_dir.glob("ckpt_*")) == ["ckpt_00000001.pt"]
    # validation at 0; training metrics, validation and the final samples' health at 1
    assert [r["iter"] for r in metric_records(run_dir)] == [0, 1, 1, 1], "metrics.jsonl starts over too"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 400 KiB tmpfs: room for one TINY checkpoint (~270 KB), not two. Needs root (mount)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'not root'})")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_out_of_disk_while_saving_is_reported_and_the_previous_checkpoint_survives(tmp_path, corpus_path,
                                                                                   tiny_disk):
    env = {**settings(tmp_path, corpus_path, TOTAL_ITERS=4), "CHECKPOINT_DIR": str(tiny_disk)}
    full = run(TRAIN, env, tmp_path)
    assert full.proc.returncode == 2, full.stdout + full.stderr
    assert f"error: Out of disk space writing {tiny_disk}/ckpt_00000004.pt" in full.stderr
    assert "The newest valid checkpoint, ckpt_00000002.pt, is intact" in full.stderr
    assert "Traceback" not in full.stderr
    assert load_checkpoint(ckpt(tiny_disk, 2))["iteration"] == 2
    assert sorted(p.name for p in tiny_disk.iterdir() if p.name.endswith(".tmp")) == []
