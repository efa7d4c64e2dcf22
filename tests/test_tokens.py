"""Tokens beyond characters: tokenizers (char, tiktoken, Hugging Face), `avatarl prepare` from every kind of
source, the prepared directory as DATA_PATH, the memmap sampler, bits per byte, the packaged corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from avatarl.cli import main as avatarl_main
from avatarl.config import Config, ConfigError
from avatarl.data import corpus as corpus_module
from avatarl.data.corpus import TINY_SHAKESPEARE_SHA256, load_corpus, packaged_tiny_shakespeare
from avatarl.data.prepare import chunks, prepare
from avatarl.data.prepared import META, TRAIN_BIN, VAL_BIN, open_prepared
from avatarl.data.sampler import MemmapSampler, eval_windows, make_sampler
from avatarl.data.tokenizers import END_OF_TEXT, CharTokenizer, HFTokenizer, TiktokenTokenizer, load_tokenizer
from avatarl.evaluation import validation_metrics
from tests.helpers import TINY_RANKS, run_cli, write_rank_file


def decoded(directory: Path, tokenizer) -> str:
    meta = json.loads((directory / META).read_text())
    ids = [np.fromfile(directory / name, dtype=meta["dtype"]) for name in (TRAIN_BIN, VAL_BIN)]
    return tokenizer.decode(np.concatenate(ids).tolist())


def test_trained_bpe_round_trips_and_counts_bytes(bpe_dir: Path):
    tokenizer = load_tokenizer(str(bpe_dir))
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.size == 512 and tokenizer.eot_id is not None
    text = "ROMEO:\nWhat, ho! Ça va? — 'tis naught\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and len(ids) < len(text)
    sizes = tokenizer.token_bytes()
    assert int(sizes[ids].sum()) == len(text.encode("utf-8"))  # exact, multi-byte chars included
    assert sizes[tokenizer.eot_id] == 0
    assert (bpe_dir / "tokenizer_config.json").is_file()  # loadable by transformers' AutoTokenizer too


def test_tiktoken_rank_file_and_gpt2_by_name_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import tiktoken

    ranks = write_rank_file(tmp_path / "tiny.tiktoken")
    tokenizer = load_tokenizer(str(ranks))
    assert isinstance(tokenizer, TiktokenTokenizer) and tokenizer.size == len(TINY_RANKS) + 1
    assert tokenizer.eot_id == len(TINY_RANKS)
    text = "the other thing, in Verona"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and TINY_RANKS.index(b"the") in ids
    assert int(tokenizer.token_bytes()[ids].sum()) == len(text.encode())

    local = tokenizer.encoding  # TOKENIZER=gpt2 goes through tiktoken.get_encoding("gpt2"): no download here
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: local if name == "gpt2" else None)
    gpt2 = load_tokenizer("gpt2")
    assert gpt2.identity.source == "gpt2" and gpt2.identity.sha256 == tokenizer.identity.sha256
    assert gpt2.encode(text) == ids


def test_unknown_tokenizer_is_one_clear_line(tmp_path: Path):
    with pytest.raises(ConfigError, match="TOKENIZER='nope'.*char, gpt2, a .tiktoken rank file"):
        load_tokenizer("nope")


def test_chunks_cut_only_between_visible_chars_and_keep_every_char():
    doc = ("word " * 30).strip() + "\n"
    doc = doc * 50 + "end"
    pieces = list(chunks(iter([doc, "second doc"]), limit=200))
    assert "".join(text for text, _ in pieces) == doc + "second doc"
    assert [last for _, last in pieces].count(True) == 2 and len(pieces) > 5
    for text, last in pieces:
        if not last:
            assert text.endswith("\n") and not text.endswith(" \n")


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "hf_dataset"])
def test_prepare_from_every_source_decodes_back_to_the_documents(tmp_path: Path, corpus_path: Path,
                                                                 bpe_dir: Path, kind: str):
    text = corpus_path.read_text()
    docs = [text[i:i + 20_000] for i in range(0, 200_000, 20_000)]
    source, hf = tmp_path / "src", None
    source.mkdir()
    if kind == "txt":
        for i, doc in enumerate(docs):
            (source / f"{i:02d}.txt").write_text(doc)
        sources = [str(source)]
    elif kind == "jsonl":
        lines = (json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs))
        (source / "docs.jsonl").write_text("".join(lines))
        sources = [str(source / "*.jsonl")]
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": docs}), source / "docs.parquet")
        sources = [str(source / "docs.parquet")]
        if kind == "hf_dataset":
            import datasets

            datasets.Dataset.from_parquet(sources[0]).save_to_disk(str(tmp_path / "dataset"))
            sources, hf = [], corpus_module_hf(tmp_path / "dataset")
    out = tmp_path / "out"
    meta = prepare(sources, out, str(bpe_dir), hf, text_column="body", num_proc=2, val_fraction=0.1)
    tokenizer = load_tokenizer(str(bpe_dir))
    assert decoded(out, tokenizer) == "".join(doc + END_OF_TEXT for doc in docs)
    assert meta["documents"] == len(docs) and meta["dtype"] == "uint16" and meta["vocab_size"] == 512
    assert meta["tokenizer"] == tokenizer.identity.to_dict()
    assert meta["train_tokens"] == len(np.fromfile(out / TRAIN_BIN, dtype=np.uint16))
    assert 0.08 < meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"]) < 0.3
    import hashlib

    assert meta["sha256"][VAL_BIN] == hashlib.sha256((out / VAL_BIN).read_bytes()).hexdigest()
    assert not list(out.glob("*.tmp"))


def corpus_module_hf(path: Path):
    from avatarl.data.sources import HFSource

    return HFSource(str(path))


@pytest.mark.parametrize("problem,match", [
    ("missing", "no such file"),
    ("empty", "the sources hold no text"),
    ("binary", "is not UTF-8 text"),
    ("column", "no text column 'text'"),
])
def test_bad_prepare_input_is_one_line_and_exit_2(tmp_path: Path, bpe_dir: Path, problem: str, match: str):
    source = tmp_path / {"missing": "nothing.txt", "empty": "empty.txt", "binary": "bad.txt",
                         "column": "docs.jsonl"}[problem]
    if problem == "empty":
        source.write_text("")
    elif problem == "binary":
        source.write_bytes(b"ok \xff\xfe")
    elif problem == "column":
        source.write_text(json.dumps({"body": "hello"}) + "\n")
    result = run_cli(["prepare", str(source), "--output", str(tmp_path / "out"), "--tokenizer", str(bpe_dir),
                      "--num-proc", "1"], tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / TRAIN_BIN).exists()


def test_prepare_refuses_char_and_a_vocabulary_too_large_for_uint16(tmp_path: Path, bpe_dir: Path):
    (tmp_path / "a.txt").write_text("hello world\n" * 100)
    with pytest.raises(ConfigError, match="needs a BPE"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "out", "char")
    big = tmp_path / "big.json"
    definition = json.loads((bpe_dir / "tokenizer.json").read_text())
    definition["model"]["vocab"].update({f"extra{i}": 512 + i for i in range(70_000)})
    big.write_text(json.dumps(definition))
    with pytest.raises(ConfigError, match="does not fit; use --dtype uint32"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "out", str(big), dtype_name="uint16")


def test_prepared_directory_is_data_path_and_a_mismatched_tokenizer_is_refused(
        tmp_path: Path, prepared_shakespeare: Path, bpe_dir: Path):
    data, tokenizer = open_prepared(prepared_shakespeare, "char")  # char = the data's own tokenizer
    assert isinstance(data.train, np.memmap) and tokenizer.identity.source == str(bpe_dir.resolve())
    corpus = load_corpus(Config.of(data_path=str(prepared_shakespeare)), torch.device("cpu"))
    assert corpus.model_vocab_size == 512 and len(corpus.train) == data.meta["train_tokens"]
    other = tmp_path / "other.tiktoken"
    write_rank_file(other)
    with pytest.raises(ConfigError,
                       match="tokenizer mismatch: the data in .* huggingface .* TOKENIZER is tiktoken"):
        open_prepared(prepared_shakespeare, str(other))


def test_nanogpt_directory_without_meta_needs_tokenizer(tmp_path: Path, prepared_shakespeare: Path,
                                                        bpe_dir: Path):
    plain = tmp_path / "nanogpt"
    plain.mkdir()
    for name in (TRAIN_BIN, VAL_BIN):
        (plain / name).write_bytes((prepared_shakespeare / name).read_bytes())
    with pytest.raises(ConfigError, match="no meta.json: set TOKENIZER"):
        open_prepared(plain, "char")
    data, tokenizer = open_prepared(plain, str(bpe_dir))
    assert len(data.val) == json.loads((prepared_shakespeare / META).read_text())["val_tokens"]


def test_memmap_sampler_is_deterministic_per_seed_and_rank_and_resumes(prepared_shakespeare: Path):
    data, _ = open_prepared(prepared_shakespeare, "char")
    a, b = (MemmapSampler(data.train, 9, seed=1, rank=0, device=torch.device("cpu")) for _ in range(2))
    other_rank = MemmapSampler(data.train, 9, seed=1, rank=1, device=torch.device("cpu"))
    first = a.sample(4)
    assert first.dtype == torch.long and first.shape == (4, 9)
    assert torch.equal(first, b.sample(4)) and not torch.equal(first, other_rank.sample(4))
    state = a.state_dict()
    expected = a.sample(4)
    fresh = make_sampler(data.train, 9, seed=5, rank=0, device=torch.device("cpu"))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.sample(4), expected)
    start = int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(
        np.asarray(data.train), 9) == expected[0].numpy(), axis=1))[0])  # a real window of train.bin
    found = torch.from_numpy(np.asarray(data.train[start:start + 9]).astype(np.int64))
    assert torch.equal(found, expected[0])
    windows = eval_windows(data.val, 8, 16, torch.device("cpu"))
    first = torch.from_numpy(data.val[:9].astype(np.int64))
    assert windows.shape == (16, 9) and torch.equal(windows[0], first)


class FixedLogits(nn.Module):
    """A 'model' whose next-token distribution is the same everywhere: softmax(logits)."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*idx.shape, -1)


def test_bits_per_byte_by_hand_for_chars_and_tokens():
    windows = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])  # targets: 1 2 3 and 2 1 0
    uniform = validation_metrics(FixedLogits([0.0] * 4), windows, torch.tensor([1, 1, 1, 1]))
    assert uniform["val_ce"] == pytest.approx(math.log(4))
    assert uniform["val_bpb"] == pytest.approx(2.0)  # ln 4 nats per 1-byte char = 2 bits per byte
    skewed = [2.0, 0.0, 0.0, 1.0]
    logp = torch.log_softmax(torch.tensor(skewed), -1)
    sizes = torch.tensor([3, 1, 2, 4])  # bytes of each token: a BPE's tokens span several bytes
    nats = -sum(float(logp[t]) for t in (1, 2, 3, 2, 1, 0))
    measured = validation_metrics(FixedLogits(skewed), windows, sizes)
    assert measured["val_ce"] == pytest.approx(nats / 6)
    assert measured["val_bpb"] == pytest.approx(nats / (math.log(2) * (1 + 2 + 4 + 2 + 1 + 3)))


def test_packaged_corpus_is_the_default_and_needs_no_network(monkeypatch: pytest.MonkeyPatch,
                                                             corpus_path: Path):
    text = packaged_tiny_shakespeare()
    assert text == corpus_path.read_text() and len(text) == 1_115_394
    import hashlib

    assert hashlib.sha256(text.encode()).hexdigest() == TINY_SHAKESPEARE_SHA256

    def no_network(*args, **kwargs):
        raise OSError("no network here")

    monkeypatch.setattr(corpus_module.urllib.request, "urlopen", no_network)
    corpus = load_corpus(Config(), torch.device("cpu"))
    assert isinstance(corpus.tokenizer, CharTokenizer) and corpus.tokenizer.size == 65
    monkeypatch.setattr(corpus_module, "PACKAGED_CORPUS", Path("/nonexistent.xz"))
    with pytest.raises(ConfigError, match="could not be downloaded .*no network here"):
        load_corpus(Config.of(data_cache_dir="/nonexistent-cache"), torch.device("cpu"))


def test_bpe_vocabulary_is_padded_and_the_padding_masked(corpus_path: Path, tmp_path: Path):
    from avatarl.model import GPT, PAD_LOGIT, GPTConfig

    (tmp_path / "slice.txt").write_text(corpus_path.read_text()[:50_000])
    assert avatarl_main(["tokenizer", "train", "--vocab-size", "300", "--output", str(tmp_path / "odd"),
                         str(tmp_path / "slice.txt")]) == 0
    tokenizer = load_tokenizer(str(tmp_path / "odd"))
    ids = torch.tensor(tokenizer.encode(corpus_path.read_text()[:20_000]))
    built = corpus_module.make_corpus(tokenizer, ids, ids, torch.device("cpu"))
    assert tokenizer.size == 300 and built.model_vocab_size == 320 and int(built.token_bytes[300:].sum()) == 0
    model = GPT(GPTConfig(320, 16, 1, 2, 16, use_flash_attn=False, valid_vocab_size=300))
    logits = model(ids[:16][None])
    assert torch.all(logits[..., 300:] == PAD_LOGIT) and torch.isfinite(logits).all()
    out = model.generate(ids[:4][None], 64, temperature=1.5)
    assert int(out.max()) < 300


def test_prepare_tokenizer_flag_wins_over_a_char_tokenizer_setting(tmp_path: Path, corpus_path: Path,
                                                                   bpe_dir: Path):
    (tmp_path / "a.txt").write_text(corpus_path.read_text()[:30_000])
    (tmp_path / ".env").write_text("TOKENIZER=char\n")  # what a .env made from .env.example holds
    done = run_cli(["prepare", "a.txt", "--output", "out", "--tokenizer", str(bpe_dir), "--num-proc", "1"],
                   tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / META).read_text())["tokenizer"]["kind"] == "huggingface"
    refused = run_cli(["prepare", "a.txt", "--output", "out2", "--num-proc", "1"], tmp_path)
    assert refused.returncode == 2 and "needs a BPE" in refused.stderr and "Traceback" not in refused.stderr


def test_a_prepared_directory_whose_tokenizer_moved_says_so(tmp_path: Path, corpus_path: Path, bpe_dir: Path):
    import shutil

    moved = tmp_path / "tok"
    shutil.copytree(bpe_dir, moved)
    (tmp_path / "a.txt").write_text(corpus_path.read_text()[:30_000])
    prepare([str(tmp_path / "a.txt")], tmp_path / "out", str(moved), num_proc=1)
    shutil.rmtree(moved)
    with pytest.raises(ConfigError,
                       match="the data in .* cannot be loaded from there any more: set TOKENIZER"):
        open_prepared(tmp_path / "out", "char")
    data, _ = open_prepared(tmp_path / "out", str(bpe_dir))  # the same tokenizer, found elsewhere
    assert len(data.train) > 0
