"""Validation metrics on hand-made examples: accuracy, the temperature fitted on one half and reported on
the other, and the count-model yardsticks."""

import math

import pytest
import torch
from torch import nn

from avatarl.baselines import count_model_baselines
from avatarl.evaluation import CALIBRATION_TEMPERATURES, validation_chunks, validation_metrics


class BigramLogits(nn.Module):
    """A 'model' whose logits for the next token are a fixed row per current token: [B, T] -> [B, T, V]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


WINDOWS = torch.tensor([[0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 0]])
BYTES = torch.ones(2, dtype=torch.long)


def ce_by_hand(table: torch.Tensor, windows: torch.Tensor, temperature: float) -> float:
    nats, count = 0.0, 0
    for window in windows.tolist():
        for current, nxt in zip(window[:-1], window[1:], strict=True):
            row = [value / temperature for value in table[current].tolist()]
            nats += math.log(sum(math.exp(v) for v in row)) - row[nxt]
            count += 1
    return nats / count


def test_accuracy_and_ce_by_hand():
    table = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # argmax: 0 after 0, 1 after 1
    got = validation_metrics(BigramLogits(table), WINDOWS, BYTES)
    pairs = [(a, b) for w in WINDOWS.tolist() for a, b in zip(w[:-1], w[1:], strict=True)]
    assert got["val_acc"] == pytest.approx(sum(a == b for a, b in pairs) / len(pairs))  # 4 of 8
    assert got["val_ce"] == pytest.approx(ce_by_hand(table, WINDOWS, 1.0), rel=1e-6)
    assert got["val_bpb"] == pytest.approx(got["val_ce"] / math.log(2), rel=1e-6)


def test_temperature_fitted_on_first_half_reported_on_second():
    table = torch.tensor([[6.0, 0.0], [0.0, 4.0]])  # far too confident for data that follows it half the time
    got = validation_metrics(BigramLogits(table), WINDOWS, BYTES)
    fit = [ce_by_hand(table, WINDOWS[:2], t) for t in CALIBRATION_TEMPERATURES.tolist()]
    best = CALIBRATION_TEMPERATURES[fit.index(min(fit))].item()
    assert got["val_temperature"] == pytest.approx(best)
    assert got["val_ce_calibrated"] == pytest.approx(ce_by_hand(table, WINDOWS[2:], best), rel=1e-6)
    assert best > 1 and got["val_ce_calibrated"] < got["val_ce_second_half"]
    assert got["val_ce_second_half"] == pytest.approx(ce_by_hand(table, WINDOWS[2:], 1.0), rel=1e-6)


def test_a_calibrated_model_keeps_temperature_one():
    """Logits that are the data's own conditional frequencies (after 0: 0 three times in four) on both halves:
    the fitted temperature is 1 and the calibrated CE is the second half's CE."""
    windows = torch.tensor([[0, 0, 0, 0, 1], [0, 1, 0, 0, 0]])
    table = torch.log(torch.tensor([[0.75, 0.25], [0.5, 0.5]]))
    got = validation_metrics(BigramLogits(table), windows, BYTES)
    assert got["val_temperature"] == 1.0
    assert got["val_ce_calibrated"] == pytest.approx(got["val_ce_second_half"], rel=1e-9)
    assert got["val_ce_second_half"] == pytest.approx(ce_by_hand(table, windows[1:], 1.0), rel=1e-6)


def test_a_flat_curve_picks_temperature_one():
    got = validation_metrics(BigramLogits(torch.zeros(2, 2)), WINDOWS, BYTES)
    assert got["val_temperature"] == 1.0
    assert got["val_ce_calibrated"] == pytest.approx(math.log(2)) == pytest.approx(got["val_ce"])


def test_chunks_never_straddle_the_halves_and_sum_to_the_whole(monkeypatch):
    assert validation_chunks(5, 2) == [("fit", 0, 2), ("report", 2, 4), ("report", 4, 5)]
    assert validation_chunks(1, 8) == [("both", 0, 1)]
    table = torch.tensor([[6.0, 0.0], [0.0, 4.0]])
    whole = validation_metrics(BigramLogits(table), WINDOWS, BYTES)
    monkeypatch.setattr("avatarl.evaluation.LOGIT_ELEMENTS", 2)  # one window of 2 positions x 2 ids per chunk
    assert validation_metrics(BigramLogits(table), WINDOWS, BYTES) == pytest.approx(whole, rel=1e-9)


def test_count_model_baselines_by_hand():
    alternating = torch.tensor([0, 1] * 50)
    windows = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]])
    got = count_model_baselines(alternating, windows, vocab_size=2, orders=(1, 2))
    assert got["uniform"] == {"acc": 0.5, "ce": pytest.approx(math.log(2))}
    assert got["bigram"]["acc"] == 1.0 and got["bigram"]["ce"] < 0.01  # the bigram knows what follows
    assert got["unigram"]["acc"] == 0.5 and got["unigram"]["ce"] == pytest.approx(math.log(2))
    skewed = count_model_baselines(torch.tensor([0, 0, 1]), torch.tensor([[0, 1, 1]]), vocab_size=2,
                                   orders=(1,))
    p1 = (1 + 0.1) / (3 + 0.2)  # add-alpha (0.1) unigram of the one 1 among three training tokens
    assert skewed["unigram"] == {"acc": 0.0, "ce": pytest.approx(-math.log(p1))}


def test_every_count_model_runs_at_50000_ids():
    got = count_model_baselines(torch.tensor([0, 1, 2]), torch.tensor([[0, 1, 2]]), vocab_size=50_000)
    assert list(got) == ["uniform", "unigram", "bigram", "trigram", "4-gram"]  # sparse counts: no V^n table
    assert got["unigram"]["acc"] == 0.0  # three ids seen once each: the argmax is id 0, never the truth
    assert got["bigram"]["acc"] == 1.0 and got["4-gram"]["acc"] == 1.0  # 0 -> 1 and 1 -> 2 were seen
