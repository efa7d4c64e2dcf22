"""BPE tokens end to end, with the real trainer: GRPO and AvataRL lower val_bpb on prepared data, a resume
from a prepared directory is bit-identical (1 process and 2 gloo ranks), a SIGKILLed prepare leaves no
train.bin and its rerun writes the same bytes, and training on 4 GB of tokens needs no more memory than
4 MB."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from avatarl.checkpoint import load_checkpoint
from avatarl.config_sources import load_config
from avatarl.data.prepared import META, TRAIN_BIN, VAL_BIN
from avatarl.generate import sample_from_checkpoint
from avatarl.periodic import COMPLETED
from avatarl.referee import export_referee
from avatarl.trainer import train
from tests.helpers import (
    FAULTY,
    FAULTY_TRAIN,
    TINY,
    TORCHRUN,
    TRAIN,
    check_equivalence,
    clean_env,
    metric_records,
    start,
    wait_for,
)

pytestmark = pytest.mark.slow  # real trainer processes: see `make test-fast`

BPE_RUN = {**TINY, "NGRAM_ORDER": "2", "TOTAL_ITERS": "40", "EVAL_INTERVAL": "20", "LOG_INTERVAL": "10",
           "LR": "3e-3", "WARMUP_ITERS": "2", "CHECKPOINT_INTERVAL": "40"}


def bpb_curve(run_dir: Path) -> list[float]:
    return [r["val_bpb"] for r in metric_records(run_dir) if "val_bpb" in r]


def run_in_process(settings: dict[str, str], role: str = "student") -> str:
    cfg, _ = load_config(settings, environ={})
    return train(cfg, role=role)


def test_grpo_on_bpe_tokens_lowers_bits_per_byte(tmp_path: Path, prepared_shakespeare: Path):
    run_dir = tmp_path / "grpo"
    settings = {**BPE_RUN, "DATA_PATH": str(prepared_shakespeare), "CHECKPOINT_DIR": str(run_dir)}
    assert run_in_process(settings) == COMPLETED
    curve = bpb_curve(run_dir)
    print(f"\n[tokens] GRPO on a 512-id BPE: val_bpb {curve}")
    assert len(curve) == 3 and curve[-1] < curve[0] - 0.3
    saved = load_checkpoint(run_dir / "ckpt_00000040.pt")
    assert saved["tokenizer"]["kind"] == "huggingface" and saved["model_config"]["vocab_size"] == 512
    texts = sample_from_checkpoint("latest", run_dir, "ROMEO:", 20, 0.8, None, 2, 0, "cpu")
    assert len(texts) == 2 and all(text.startswith("ROMEO:") and len(text) > 20 for text in texts)


def test_avatarl_on_bpe_tokens_lowers_bits_per_byte(tmp_path: Path, prepared_shakespeare: Path):
    base = {**BPE_RUN, "DATA_PATH": str(prepared_shakespeare), "CHECKPOINT_DIR": str(tmp_path / "run"),
            "TOTAL_ITERS": "40", "REFEREE_ITERS": "40"}
    cfg, _ = load_config({**base, "TOTAL_ITERS": base["REFEREE_ITERS"]}, environ={})
    assert train(cfg, role="referee") == COMPLETED
    referee = export_referee(cfg)
    assert load_checkpoint(referee)["tokenizer"]["kind"] == "huggingface"
    assert run_in_process({**base, "ALGORITHM": "avatarl"}) == COMPLETED
    curve = bpb_curve(tmp_path / "run")
    print(f"\n[tokens] AvataRL on a 512-id BPE: val_bpb {curve}")
    assert len(curve) == 3 and curve[-1] < curve[0] - 0.3


def test_a_1024_token_context_runs_grpo_rollouts_and_avatarl(tmp_path: Path, prepared_shakespeare: Path):
    long = {**BPE_RUN, "DATA_PATH": str(prepared_shakespeare), "CONTEXT_LEN": "1024", "BATCH": "4",
            "MICRO_BATCH": "2", "TOTAL_ITERS": "2", "EVAL_INTERVAL": "2", "EVAL_WINDOWS": "4",
            "LOG_INTERVAL": "1"}
    assert run_in_process({**long, "CHECKPOINT_DIR": str(tmp_path / "grpo")}) == COMPLETED
    grpo = [r for r in metric_records(tmp_path / "grpo") if "exact_match" in r]
    assert len(grpo) == 2 and all(np.isfinite(r["loss"]) for r in grpo)
    cfg, _ = load_config({**long, "CHECKPOINT_DIR": str(tmp_path / "av")}, environ={})
    assert train(cfg, role="referee") == COMPLETED and export_referee(cfg).is_file()
    student = {**long, "CHECKPOINT_DIR": str(tmp_path / "av"), "ALGORITHM": "avatarl"}
    assert run_in_process(student) == COMPLETED
    saved = load_checkpoint(tmp_path / "av" / "ckpt_00000002.pt")
    assert saved["model_config"]["block_size"] == 1024 + 4 and saved["config"]["context_len"] == 1024


def test_resume_from_a_prepared_directory_is_bit_identical(tmp_path: Path, prepared_shakespeare: Path):
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    single = check_equivalence(FAULTY_TRAIN, tmp_path / "one", prepared_shakespeare, NGRAM_ORDER=2)
    ranks = check_equivalence([*TORCHRUN, *FAULTY], tmp_path / "two", prepared_shakespeare,
                              NGRAM_ORDER=2)
    print(f"\n[tokens] memmap resume: {single} (1 process) and {ranks} (2 ranks) tensor bytes, bit-identical")
    assert single > 100_000 and ranks > 100_000


@pytest.fixture
def big_corpus(tmp_path: Path, corpus_path: Path) -> Path:
    text = corpus_path.read_text()
    path = tmp_path / "big.txt"
    path.write_text(text * 3)
    return path


def prepare_command(source: Path, out: Path, bpe_dir: Path) -> list[str]:
    return [sys.executable, "-m", "avatarl", "prepare", str(source), "--output", str(out), "--tokenizer",
            str(bpe_dir), "--num-proc", "1"]


def test_a_killed_prepare_leaves_no_train_bin_and_the_rerun_writes_the_same_bytes(
        tmp_path: Path, big_corpus: Path, bpe_dir: Path):
    clean = subprocess.run(prepare_command(big_corpus, tmp_path / "clean", bpe_dir), env=clean_env(),
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "killed"
    job = start(prepare_command(big_corpus, out, bpe_dir), {}, tmp_path, "prepare")
    wait_for(lambda: (out / "all.bin.tmp").is_file() and (out / "all.bin.tmp").stat().st_size > 100_000, job,
             what="the prepare writing its tokens")
    job.proc.send_signal(signal.SIGKILL)
    job.proc.wait(timeout=60)
    assert not (out / TRAIN_BIN).exists() and not (out / META).exists()
    rerun = subprocess.run(prepare_command(big_corpus, out, bpe_dir), env=clean_env(), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    for name in (TRAIN_BIN, VAL_BIN):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert not list(out.glob("*.tmp"))


def synthetic_prepared(directory: Path, train_tokens: int, vocab: int, seed: int) -> Path:
    """A nanoGPT-layout directory (uint16, no meta.json) of `train_tokens` ids. The file is sparse: random
    ids in its first and last 8 MiB, holes (id 0) between, so 4 GB cost no disk; each window reads its own
    pages whatever they hold, so memory behaves as with real ids."""
    directory.mkdir()
    rng = np.random.default_rng(seed)
    piece = min(train_tokens, 4 << 20)
    with open(directory / TRAIN_BIN, "wb") as handle:
        handle.truncate(train_tokens * 2)
        rng.integers(0, vocab, piece, dtype=np.uint16).tofile(handle)
        handle.seek((train_tokens - piece) * 2)
        rng.integers(0, vocab, piece, dtype=np.uint16).tofile(handle)
    rng.integers(0, vocab, 1 << 16, dtype=np.uint16).tofile(directory / VAL_BIN)
    return directory


def measured_run(tmp_path: Path, name: str, data: Path, bpe_dir: Path) -> tuple[float, float]:
    """(peak RSS MiB logged by the trainer, seconds from launch to the first logged step) of a short run."""
    run_dir = tmp_path / f"{name}-run"
    settings = {**TINY, "DATA_PATH": str(data), "TOKENIZER": str(bpe_dir), "CHECKPOINT_DIR": str(run_dir),
                "NGRAM_ORDER": "2", "TOTAL_ITERS": "6", "LOG_INTERVAL": "2", "CHECKPOINT_INTERVAL": "6"}
    started = time.monotonic()
    job = start(TRAIN, settings, tmp_path, name)
    wait_for(lambda: any("loss" in r for r in metric_records(run_dir)), job, what="the first logged step")
    first_step = time.monotonic() - started
    assert job.wait() == 0, job.stdout + job.stderr
    return max(r["peak_rss_mib"] for r in metric_records(run_dir) if "peak_rss_mib" in r), first_step


def test_training_on_4_gb_of_tokens_needs_no_more_memory_than_4_mb(tmp_path: Path, bpe_dir: Path):
    small = synthetic_prepared(tmp_path / "small", 2 << 20, 512, seed=0)    # 4 MiB of uint16 ids
    large = synthetic_prepared(tmp_path / "large", 2 << 30, 512, seed=0)    # 4 GiB
    assert (large / TRAIN_BIN).stat().st_size == 4 << 30
    small_rss, small_start = measured_run(tmp_path, "small", small, bpe_dir)
    large_rss, large_start = measured_run(tmp_path, "large", large, bpe_dir)
    report = {"small_peak_rss_mib": small_rss, "large_peak_rss_mib": large_rss,
              "small_first_step_s": round(small_start, 2), "large_first_step_s": round(large_start, 2)}
    print(f"\n[tokens] constant memory: {json.dumps(report)}")
    assert large_rss - small_rss < 300
    assert large_start < small_start + 10


def test_resuming_or_sampling_with_another_tokenizer_is_refused(tmp_path: Path, corpus_path: Path,
                                                                bpe_dir: Path):
    import shutil

    from tests.helpers import run_cli, write_rank_file

    tok = tmp_path / "tok"
    shutil.copytree(bpe_dir, tok)
    text = tmp_path / "corpus.txt"
    text.write_text(corpus_path.read_text()[:100_000])
    run = {**TINY, "DATA_PATH": str(text), "TOKENIZER": str(tok), "CHECKPOINT_DIR": str(tmp_path / "run"),
           "NGRAM_ORDER": "2", "TOTAL_ITERS": "2"}
    first = run_cli(["train"], tmp_path, **run)  # a text file, BPE-tokenized in memory
    assert first.returncode == 0, first.stdout + first.stderr
    other = write_rank_file(tmp_path / "other.tiktoken")
    resumed = run_cli(["train"], tmp_path, **{**run, "TOKENIZER": str(other), "TOTAL_ITERS": "4"})
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
    assert "tokenizer huggingface" in resumed.stderr and "vs tiktoken" in resumed.stderr
    changed = (bpe_dir / "tokenizer.json").read_text().replace('"<|endoftext|>"', '"<|end|>"')
    (tok / "tokenizer.json").write_text(changed)  # the file the checkpoint names now holds another tokenizer
    sampled = run_cli(["sample", "--checkpoint", "latest", "--prompt", "ROMEO:"], tmp_path,
                      CHECKPOINT_DIR=str(tmp_path / "run"))
    assert sampled.returncode == 2 and "Traceback" not in sampled.stderr
    assert "tokenizer mismatch: the checkpoint was made with huggingface" in sampled.stderr
