"""`avatarl bench learning`: equal budgets, computed reference lines, JSON schema and plot, on a tiny budget."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter

import pytest
import torch

from avatarl.bench.learning import (
    METHODS,
    chars_to_beat,
    corpus_baselines,
    learning_bench,
    run_learning_bench,
    write_outputs,
)
from avatarl.checkpoint import load_checkpoint
from avatarl.config import Config
from avatarl.data.corpus import TRAIN_FRACTION

pytestmark = pytest.mark.slow  # real trainer processes: see `make test-fast`

TINY_BENCH = {"n_layer": 1, "n_head": 2, "n_emb": 32, "context_len": 16, "horizon": 4, "k_samples": 2, "batch": 16,
              "micro_batch": 16, "warmup_iters": 2, "log_interval": 2, "eval_windows": 32, "device": "cpu"}
BUDGET_ITERS, REFEREE_ITERS = 6, 2


def test_corpus_baselines_by_hand():
    # V = 2 (a=0, b=1); train "aab", val "ab"; add-one smoothing.
    # unigram: N(a)=2, N(b)=1, N=3 -> p(a) = 3/5, p(b) = 2/5; CE = -(ln 3/5 + ln 2/5) / 2
    # bigram: train pairs aa, ab -> N(a.)=2, p(b|a) = (1+1)/(2+2) = 1/2; the one val pair ab -> CE = ln 2
    got = corpus_baselines(torch.tensor([0, 0, 1]), torch.tensor([0, 1]), vocab_size=2)
    assert got["uniform"] == math.log(2)
    assert got["unigram"] == pytest.approx(-(math.log(3 / 5) + math.log(2 / 5)) / 2, abs=1e-12)
    assert got["bigram"] == pytest.approx(math.log(2), abs=1e-12)


def test_chars_to_beat_is_the_first_measurement_strictly_below():
    curve = [(0, 4.2), (100, 3.0), (200, 2.5), (300, 2.4)]
    assert chars_to_beat(curve, 3.0) == 200
    assert chars_to_beat(curve, 2.45) == 300
    assert chars_to_beat(curve, 2.4) is None
    assert chars_to_beat([], 3.0) is None


def recount(text: str) -> tuple[float, float]:
    """Unigram and bigram CE by plain counting, independent of the tensor code under test."""
    chars = sorted(set(text))
    split = int(len(text) * TRAIN_FRACTION)
    train, val = text[:split], text[split:]
    V = len(chars)
    uni = Counter(train)
    unigram = -sum(math.log((uni[c] + 1) / (len(train) + V)) for c in val) / len(val)
    pairs, starts = Counter(zip(train, train[1:], strict=False)), Counter(train[:-1])
    bigram = -sum(math.log((pairs[a, b] + 1) / (starts[a] + V)) for a, b in zip(val, val[1:], strict=False))
    return unigram, bigram / (len(val) - 1)


@pytest.fixture(scope="module")
def bench(tmp_path_factory, corpus_path):
    """One tiny benchmark run on the first 200k chars of Tiny Shakespeare (the end-of-run text samples are
    stubbed out: they cost seconds per run and are the trainer's business, tested with the trainer)."""
    root = tmp_path_factory.mktemp("bench")
    data = root / "shakespeare-200k.txt"
    data.write_text(corpus_path.read_text()[:200_000])
    base = Config(**TINY_BENCH, data_path=str(data))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("avatarl.periodic.training_samples", lambda *args: "")
        patch.chdir(root)
        code, report = learning_bench(base, root / "out", BUDGET_ITERS, REFEREE_ITERS, eval_points=2)
    assert code == 0
    write_outputs(report, root / "out", root / "copy" / "learning.json")
    return root, data, report


def test_every_method_trains_at_the_same_budget(bench):
    root, _, report = bench
    budget = BUDGET_ITERS * 16 * (16 + 1)
    assert report["budget_chars"] == budget
    assert list(report["methods"]) == [m.name for m in METHODS]
    for name, result in report["methods"].items():
        window = 16 + (4 if name.startswith("grpo") else 1)
        assert result["exit_code"] == 0
        assert abs(result["chars_seen"] - budget) <= 16 * window / 2, (name, result["chars_seen"])
        assert result["iters"] * 16 * window == result["chars_seen"]
        chars = [c for c, _ in result["curve"]]
        assert chars[0] == 0 and chars == sorted(chars) and len(chars) >= 3
        assert result["final_val_ce"] == result["curve"][-1][1]
        # Tiny Shakespeare is ASCII: one byte per char, so bits per byte = nats per char / ln 2.
        assert result["final_val_bpb"] == pytest.approx(result["final_val_ce"] / math.log(2))
        for baseline in ("unigram", "bigram"):
            assert result[f"chars_to_beat_{baseline}"] == chars_to_beat(result["curve"],
                                                                        report["baselines"][baseline])
    assert report["methods"]["supervised"]["chars_seen"] == report["methods"]["avatarl"]["chars_seen"] == budget
    assert report["gap_avatarl_minus_supervised"] == pytest.approx(
        report["methods"]["avatarl"]["final_val_ce"] - report["methods"]["supervised"]["final_val_ce"])
    referee = report["referee"]
    assert referee["iters"] == REFEREE_ITERS and referee["chars_seen"] == REFEREE_ITERS * 16 * 17
    saved = load_checkpoint(root / "out" / "runs" / "referee" / "referee.pt")
    assert saved["val_ce"] == pytest.approx(referee["final_val_ce"])


def test_the_reward_off_control_gets_no_reward(bench):
    root, _, report = bench
    assert report["methods"]["grpo_reward_off"]["settings"] == {
        "ALGORITHM": "grpo", "PARTIAL_CREDIT": 0.0, "EXACT_MATCH_REWARD": 0.0}
    logged = [json.loads(line) for line in (root / "out/runs/grpo_reward_off/metrics.jsonl").read_text().splitlines()]
    rewards = [record["reward_mean"] for record in logged if "reward_mean" in record]
    assert rewards and all(r == 0.0 for r in rewards)
    on = [json.loads(line) for line in (root / "out/runs/grpo/metrics.jsonl").read_text().splitlines()]
    assert any(record.get("reward_mean", 0.0) > 0 for record in on)


def test_reference_lines_are_computed_from_the_corpus(bench):
    _, data, report = bench
    text = data.read_text()
    unigram, bigram = recount(text)
    lines = report["baselines"]
    assert report["vocab_size"] == len(set(text))
    assert lines["uniform"] == math.log(len(set(text)))
    assert lines["unigram"] == pytest.approx(unigram, rel=1e-9)
    assert lines["bigram"] == pytest.approx(bigram, rel=1e-9)
    assert lines["uniform"] > lines["unigram"] > lines["bigram"]
    assert report["kl_reference"]["order"] == Config().ngram_order
    assert 0 < report["kl_reference"]["val_ce"] < lines["unigram"]


def test_outputs_are_written(bench):
    root, _, report = bench
    out = root / "out"
    assert json.loads((out / "learning.json").read_text()) == json.loads(json.dumps(report))
    assert (root / "copy" / "learning.json").read_text() == (out / "learning.json").read_text()
    png = (out / "learning.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_missing_matplotlib_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    args = argparse.Namespace(quick=True, out=str(tmp_path / "out"), json_path=None)
    assert run_learning_bench(Config(device="cpu"), args) == 2
    assert "pip install 'avatarl[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
