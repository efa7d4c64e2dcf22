"""AvataRL's referee from Hugging Face: a causal LM saved with save_pretrained (tiny GPT2Config, local BPE, no
network) as REFEREE_PATH teaches a student on BPE tokens; a referee of another tokenizer is refused; padded
vocabularies of different sizes line up; ACTION_SET=full equals top-k when TOP_K covers the vocabulary;
REFEREE_QUANTIZE without CUDA is one line before any model is built; REFEREE_PATH names one kind of referee;
the referee's dtype follows one rule; the referee's memory is computed; and the BPE section of
scripts/gpu_check.sh runs end to end on a CPU (--cpu-dry-run)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import avatarl.model
import avatarl.referee.hugging_face
from avatarl.algorithms.avatarl import avatarl_loss
from avatarl.checkpoint import load_checkpoint
from avatarl.cli import main as avatarl_main
from avatarl.config import Config, ConfigError, config_fields
from avatarl.config_sections import AvatarlSettings, RefereeSettings
from avatarl.config_sources import load_config
from avatarl.data.prepared import TRAIN_BIN, token_dtype
from avatarl.data.tokenizers import (
    HFTokenizer,
    TiktokenTokenizer,
    byte_level_alphabet,
    tiktoken_from_rank_file,
    tokenizer_difference,
)
from avatarl.model import GPT, PAD_LOGIT, GPTConfig
from avatarl.periodic import COMPLETED
from avatarl.referee import align_vocabulary, find_referee, module_bytes, referee_dtype
from avatarl.referee.hugging_face import HuggingFaceHubLM, HuggingFaceLM
from avatarl.referee.own import RefereeFile
from avatarl.trainer import train
from tests.helpers import REPO, TINY, TINY_RANKS, clean_env, metric_records, write_rank_file

transformers = pytest.importorskip("transformers")

BPE_RUN = {**TINY, "ALGORITHM": "avatarl", "TOTAL_ITERS": "30", "EVAL_INTERVAL": "15", "LOG_INTERVAL": "10",
           "LR": "3e-3", "WARMUP_ITERS": "2", "CHECKPOINT_INTERVAL": "30"}


def run_in_process(settings: dict[str, str]) -> str:
    """A training run in this process: how its loop ended (COMPLETED), or the AvatarlError it raised."""
    cfg, _ = load_config(settings, environ={})
    return train(cfg)


def trained_hf_referee(directory: Path, tokenizer_dir: Path, prepared: Path, vocab_size: int,
                       steps: int) -> Path:
    """A 1-layer GPT2LMHeadModel scoring `vocab_size` ids (its own padding above the tokenizer's), trained
    `steps` AdamW steps of next-token cross-entropy on prepared train.bin, saved with the tokenizer's
    files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    shutil.copytree(tokenizer_dir, directory, dirs_exist_ok=True)
    meta_vocab = HFTokenizer(tokenizer_dir / "tokenizer.json", str(tokenizer_dir)).size
    ids = np.memmap(prepared / TRAIN_BIN, dtype=token_dtype(meta_vocab), mode="r")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab_size,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = np.random.default_rng(0)
    for _ in range(steps):
        starts = generator.integers(0, len(ids) - 17, size=32)
        batch = torch.from_numpy(np.stack([ids[s:s + 17] for s in starts]).astype(np.int64))
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_referee(tmp_path_factory, bpe_dir: Path, prepared_shakespeare: Path) -> Path:
    """The prepared data's 512-id BPE beside a GPT-2 of 520 ids trained for a few seconds."""
    return trained_hf_referee(tmp_path_factory.mktemp("hf-referee"), bpe_dir, prepared_shakespeare, 520, 150)


@pytest.mark.slow
def test_avatarl_with_a_hugging_face_referee_lowers_val_bpb(tmp_path: Path, prepared_shakespeare: Path,
                                                            hf_referee: Path):
    run_dir = tmp_path / "run"
    # REALITY_WEIGHT=0: the reward is the referee's opinion alone, so only a working referee can teach.
    settings = {**BPE_RUN, "DATA_PATH": str(prepared_shakespeare), "CHECKPOINT_DIR": str(run_dir),
                "REFEREE_PATH": str(hf_referee), "REALITY_WEIGHT": "0", "MENTOR_WEIGHT": "1"}
    assert run_in_process(settings) == COMPLETED
    curve = [r["val_bpb"] for r in metric_records(run_dir) if "val_bpb" in r]
    print(f"\n[referee] AvataRL, referee-only reward from a Hugging Face GPT-2: val_bpb {curve}")
    assert len(curve) == 3 and curve[-1] < curve[0] - 0.3
    memory = [r["referee_memory_mib"] for r in metric_records(run_dir) if "referee_memory_mib" in r]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(hf_referee)
    assert memory and memory[0] * 2**20 == module_bytes(loaded)
    saved = load_checkpoint(run_dir / "ckpt_00000030.pt")["objective"]["referee"]
    assert saved["kind"] == "huggingface" and saved["source"] == str(hf_referee.resolve())
    assert saved["sha256"] == avatarl.referee.hugging_face.directory_sha256(hf_referee)
    assert saved["quantize"] == "none"


def test_a_referee_with_another_tokenizer_is_refused_naming_both(tmp_path: Path, prepared_shakespeare: Path,
                                                                  bpe_dir: Path, tiny_hf_dir: Path,
                                                                  monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("the referee's weights were loaded before its tokenizer was checked")

    monkeypatch.setattr(avatarl.referee.hugging_face, "load_frozen_causal_lm", no_weights)
    settings = {**BPE_RUN, "DATA_PATH": str(prepared_shakespeare), "CHECKPOINT_DIR": str(tmp_path / "run"),
                "REFEREE_PATH": str(tiny_hf_dir)}
    with pytest.raises(ConfigError) as refused:
        run_in_process(settings)
    assert refused.value.exit_code == 2 and len(refused.value.problems) == 1, refused.value.problems
    problem = refused.value.problems[0]
    assert "tokenizer mismatch" in problem, problem
    assert str(tiny_hf_dir) in problem and str(bpe_dir) in problem, problem
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_different_padded_vocabularies_line_up_and_padding_gets_nothing():
    valid, student_vocab, referee_vocab = 5, 8, 6  # the tokenizer's 5 ids; each model pads to its own size
    torch.manual_seed(0)
    referee = torch.randn(4, referee_vocab)
    aligned = align_vocabulary(referee, valid, student_vocab)
    assert aligned.shape == (4, student_vocab)
    assert torch.equal(aligned[:, :valid], referee[:, :valid])
    assert bool((aligned[:, valid:] == PAD_LOGIT).all())
    student = GPT(GPTConfig(vocab_size=student_vocab, block_size=4, n_layer=1, n_head=2, n_emb=8,
                            valid_vocab_size=valid))
    logits = student(torch.tensor([[0, 1, 2, 3]]))[0].detach()
    assert float(torch.softmax(logits, -1)[:, valid:].sum()) == 0.0  # no probability on padding
    targets = torch.tensor([0, 4, 2, 1])
    for action_set in ("topk", "full"):
        # top-k asks for every id, padding included
        cfg = Config.of(top_k=student_vocab, action_set=action_set)
        loss, actions, mask, rewards = avatarl_loss(logits, aligned, targets, cfg.avatarl,
                                                    cfg.grpo.entropy_coef, valid)
        assert bool((actions[mask] < valid).all()) and int(mask.sum(-1).max()) == valid  # padding: no action
        assert float(rewards[actions >= valid].abs().sum()) == 0.0 and float(rewards.sum()) > 0  # nor reward
        assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="fewer than the tokenizer's"):
        align_vocabulary(referee[:, :4], valid, student_vocab)


@pytest.mark.parametrize("vocab,valid", [(7, 7), (8, 6)])
def test_full_action_set_equals_top_k_when_top_k_covers_the_vocabulary(vocab, valid):
    torch.manual_seed(1)
    student = torch.randn(6, vocab).masked_fill(torch.arange(vocab) >= valid, PAD_LOGIT).requires_grad_(True)
    referee = torch.randn(6, vocab).masked_fill(torch.arange(vocab) >= valid, PAD_LOGIT)
    targets = torch.randint(0, valid, (6,))
    results = {}
    for action_set, top_k in (("topk", vocab), ("full", 1), ("topk", 1)):
        loss, _, _, rewards = avatarl_loss(student, referee, targets,
                                           AvatarlSettings(top_k=top_k, action_set=action_set), 0.01, valid)
        (grad,) = torch.autograd.grad(loss, student)
        results[action_set, top_k] = loss.detach(), grad, rewards.sum()
    full, covered, narrow = results["full", 1], results["topk", vocab], results["topk", 1]
    assert torch.allclose(full[0], covered[0], rtol=1e-6) and torch.allclose(full[1], covered[1], atol=1e-7)
    assert torch.allclose(full[2], covered[2])
    # with TOP_K=1 the action sets differ; divided by the action count (REWARD_NORM=actions), so do the losses
    per_action = {}
    for action_set in ("full", "topk"):
        settings = AvatarlSettings(top_k=1, action_set=action_set, reward_norm="actions")
        per_action[action_set] = avatarl_loss(student, referee, targets, settings, 0.01, valid)[0]
    assert narrow[0].isfinite() and not torch.allclose(per_action["full"], per_action["topk"], rtol=1e-3)


def test_nf4_without_cuda_is_one_line_before_any_model_is_built(tmp_path: Path, tiny_hf_dir: Path,
                                                                 corpus_path, capsys, monkeypatch):
    def built(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.chdir(tmp_path)  # no ./.env of the developer
    for name in config_fields():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(avatarl.model.GPT, "__init__", built)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", built)
    code = avatarl_main(["train", "--preset", "tiny", "--algorithm", "avatarl", "--referee-quantize", "nf4",
                         "--referee-path", str(tiny_hf_dir), "--tokenizer", str(tiny_hf_dir),
                         "--data-path", str(corpus_path), "--checkpoint-dir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "REFEREE_QUANTIZE=nf4 needs CUDA" in lines[0], captured
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_student_and_referee_of_other_padded_sizes_train_and_the_checkpoint_names_the_referee(
        tmp_path: Path, tiny_hf_dir: Path, corpus_path: Path, capsys, monkeypatch):
    # The tiny BPE (361 ids): the student pads them to 384, the referee scores exactly 361.
    valid = HFTokenizer(tiny_hf_dir / "tokenizer.json", str(tiny_hf_dir)).size
    assert transformers.AutoConfig.from_pretrained(tiny_hf_dir).vocab_size == valid and valid % 64
    run_dir = tmp_path / "run"
    settings = {**TINY, "ALGORITHM": "avatarl", "DATA_PATH": str(corpus_path), "TOKENIZER": str(tiny_hf_dir),
                "REFEREE_PATH": str(tiny_hf_dir), "CHECKPOINT_DIR": str(run_dir), "ACTION_SET": "full"}
    assert run_in_process(settings) == COMPLETED
    saved = load_checkpoint(run_dir / "ckpt_00000004.pt")
    shape = saved["model_config"]
    assert shape["vocab_size"] == -(-valid // 64) * 64 and shape["valid_vocab_size"] == valid
    identity = saved["objective"]["referee"]
    assert identity["kind"] == "huggingface" and len(identity["sha256"]) == 64
    logged = [r for r in metric_records(run_dir) if "action_set_size" in r]
    assert logged and all(r["action_set_size"] == valid for r in logged)  # every valid id, no padding
    monkeypatch.chdir(tmp_path)  # no ./.env of the developer
    assert avatarl_main(["config", "--algorithm", "avatarl", "--referee-path", str(tiny_hf_dir)]) == 0
    assert f"referee: huggingface {str(tiny_hf_dir.resolve())!r} sha256 {identity['sha256'][:12]}" \
        in capsys.readouterr().out


def test_tiktoken_and_a_byte_level_hf_tokenizer_with_one_table_are_one_tokenizer(tmp_path: Path,
                                                                                 tiny_hf_dir: Path):
    """GPT-2 as tiktoken (TOKENIZER=gpt2) and as the hub's tokenizer.json: the same ids, so the same
    tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = tiktoken_from_rank_file(write_rank_file(tmp_path / "tiny.tiktoken"))
    tiktoken_tok = TiktokenTokenizer(ranks, "tiny")
    char_of = bytes_to_unicode()
    vocab = {"".join(char_of[b] for b in token): rank for rank, token in enumerate(TINY_RANKS)}
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])
    (tmp_path / "hub").mkdir()
    hf.save(str(tmp_path / "hub" / "tokenizer.json"))
    hf_tok = HFTokenizer(tmp_path / "hub" / "tokenizer.json", str(tmp_path / "hub"))
    assert hf_tok.size == tiktoken_tok.size == len(TINY_RANKS) + 1
    assert hf_tok.table_sha256() == tiktoken_tok.table_sha256() == tiktoken_tok.identity.sha256
    assert hf_tok.identity != tiktoken_tok.identity and tokenizer_difference(hf_tok, tiktoken_tok) is None
    assert tokenizer_difference(hf_tok.identity, tiktoken_tok) is not None  # an identity alone has no table
    other = HFTokenizer(tiny_hf_dir / "tokenizer.json", str(tiny_hf_dir))
    assert other.table_sha256() != tiktoken_tok.table_sha256()
    assert "tokenizer huggingface" in tokenizer_difference(other, tiktoken_tok)
    # one table, both libraries
    assert {char: byte for byte, char in char_of.items()} == byte_level_alphabet()
    assert hf_tok.byte_pieces[:len(TINY_RANKS)] == list(TINY_RANKS) and hf_tok.byte_pieces[-1] is None


def test_referee_path_names_one_kind_of_referee(tmp_path: Path, tiny_hf_dir: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "referee.pt").write_bytes(b"")
    settings = RefereeSettings(referee_revision="main")
    assert isinstance(find_referee(settings, empty / "referee.pt"), RefereeFile)
    local = find_referee(settings, tiny_hf_dir)
    assert type(local) is HuggingFaceLM and local.source == str(tiny_hf_dir.resolve()) and local.quantizable
    hub = find_referee(RefereeSettings(referee_path="openai-community/gpt2"), Path("openai-community/gpt2"))
    assert isinstance(hub, HuggingFaceHubLM) and hub.identity()["kind"] == "huggingface-hub"
    assert hub.identity()["sha256"] == "" and hub.identity()["quantize"] == "none"
    with pytest.raises(ConfigError, match="directory without config.json"):
        find_referee(RefereeSettings(referee_path=str(empty)), empty)
    with pytest.raises(ConfigError, match="no referee there"):
        find_referee(RefereeSettings(referee_path=str(empty / "gone.pt")), empty / "gone.pt")


def test_the_referee_dtype_is_bf16_only_under_bf16_autocast():
    assert referee_dtype(torch.bfloat16) == torch.bfloat16
    assert referee_dtype(torch.float16) == referee_dtype(None) == torch.float32


def test_referee_memory_is_its_parameters_and_buffers_once(tiny_hf_dir: Path):
    lm = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir)
    assert lm.lm_head.weight is lm.transformer.wte.weight  # tied: counted once
    fp32 = module_bytes(lm)
    assert fp32 == lm.get_memory_footprint(return_buffers=True)
    lm.to(torch.bfloat16)
    assert module_bytes(lm) == lm.get_memory_footprint(return_buffers=True) < fp32


@pytest.mark.slow
def test_gpu_check_bpe_section_runs_on_a_cpu_and_writes_its_schema(tmp_path: Path, corpus_path: Path):
    """scripts/gpu_check.sh --cpu-dry-run, BPE section only: the code the GPU machine will run, at tiny
    size."""
    env = clean_env(OUT=str(tmp_path / "out"), GPU_CHECK_STEPS="bpe", PYTHON=sys.executable,
                    DATA_PATH=str(corpus_path), TMPDIR=str(tmp_path))
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-dry-run"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["steps"]["bpe_setup"]["status"] == report["steps"]["bpe_avatarl"]["status"] == "pass"
    assert report["steps"]["train_grpo"]["status"] == "skipped"
    bpe = report["bpe_avatarl"]
    assert bpe["schema"] == "avatarl.gpu_check.bpe/1" and bpe["setup"]["tokenizer_ids"] == 512
    rows = bpe["rows"]
    assert rows["referee_nf4"]["status"] == "skipped" and "needs CUDA" in rows["referee_nf4"]["reason"]
    for name in ("referee_none", "action_set_full"):
        assert rows[name]["status"] == "pass" and rows[name]["tokens_per_s"] > 0 and rows[name]["mfu"] is None
        # float32, no buffers
        assert rows[name]["referee_memory_bytes"] == 4 * rows[name]["referee_parameters"]
    assert set(bpe["ratios"]) == {"nf4_over_none_step_time", "nf4_over_none_referee_memory",
                                  "none_minus_nf4_peak_memory_mib"}
