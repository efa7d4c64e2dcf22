"""Sample degeneracy (avatarl/health.py) on constructed strings, and the warning a run logs with it."""

from __future__ import annotations

import pytest

from avatarl.health import degeneracy_warning, distinct_n, longest_run, sample_health


def test_distinct_n_counts_unique_over_all_ngrams():
    assert distinct_n(["abcd"], 1) == 1.0
    assert distinct_n(["abab"], 1) == 2 / 4                      # a, b of a b a b
    assert distinct_n(["abab"], 2) == 2 / 3                      # ab, ba, ab
    assert distinct_n(["abab"], 3) == 2 / 2                      # aba, bab
    assert distinct_n(["aaaaa"], 2) == 1 / 4


def test_distinct_n_pools_sequences_without_spanning_them():
    assert distinct_n(["ab", "ab"], 2) == 1 / 2                  # the same continuation twice repeats
    assert distinct_n(["ab", "cd"], 2) == 1.0                    # "bc" would span the boundary
    assert distinct_n(["ab", "cd"], 3) == 1.0                    # no trigram at all: nothing repeats
    assert distinct_n([[1, 2, 1, 2]], 2) == 2 / 3                # token ids work like chars


def test_distinct_n_refuses_n_below_one():
    with pytest.raises(ValueError, match="n=0"):
        distinct_n(["abc"], 0)


def test_longest_run_of_one_token():
    assert longest_run(["abc"]) == 1
    assert longest_run(["abbbcc", "xyyyyz"]) == 4
    assert longest_run(["eeeeeeeeee"]) == 10
    assert longest_run(["ab", ""]) == 1 and longest_run([""]) == 0 and longest_run([]) == 0
    assert longest_run([[7, 7, 3, 7]]) == 2


def test_sample_health_tells_text_from_a_loop():
    text = sample_health(["First Citizen:\nBefore we proceed any further, hear me speak."])
    loop = sample_health(["the the the the the the the the the the the the"])
    stuck = sample_health(["Before we eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"])
    assert set(text) == {"sample_distinct_1", "sample_distinct_2", "sample_distinct_3", "sample_longest_run"}
    assert text["sample_distinct_2"] > 0.7 and loop["sample_distinct_2"] < 0.15
    assert stuck["sample_longest_run"] == 40 and text["sample_longest_run"] == 2
    assert degeneracy_warning(text, 0.2) is None
    warning = degeneracy_warning(loop, 0.2)
    assert warning is not None and "DEGENERACY_WARN=0.2" in warning
    assert degeneracy_warning(loop, 0.0) is None                 # 0 switches the warning off
    assert degeneracy_warning({"val_ce": 3.0}, 0.2) is None      # a log line without samples


def test_avatarl_logs_the_reward_true_share_and_kl_to_its_referee():
    import torch

    from avatarl.algorithms.avatarl import _metrics, kl_and_entropy

    student = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    referee = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    p, q = student.softmax(-1), referee.softmax(-1)
    by_hand = (p * (p.log() - q.log())).sum(-1).mean()
    kl, student_entropy = kl_and_entropy(student, referee)
    assert torch.allclose(kl, by_hand)
    assert torch.allclose(student_entropy, -(p * p.log()).sum(-1).mean())
    assert float(kl_and_entropy(referee, referee)[0]) == 0.0

    actions = torch.tensor([[0, 1, 2], [0, 1, 2]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    targets = torch.tensor([1, 0])
    rewards = torch.tensor([[0.0, 3.0, 1.0], [1.0, 0.0, 5.0]])  # the 5.0 sits on a masked slot: not paid
    logged = _metrics(actions, mask, targets, rewards)
    assert torch.isclose(logged["reward_true_share"], torch.tensor((3.0 + 1.0) / (3.0 + 1.0 + 1.0)))


class RecordingLogger:
    def __init__(self):
        self.metrics, self.texts = [], []

    def log(self, metrics, step):
        self.metrics.append((step, metrics))

    def log_text(self, name, text, step):
        self.texts.append((name, text, step))


def fake_run(threshold: float):
    from types import SimpleNamespace

    settings = SimpleNamespace(run=SimpleNamespace(seed=0, sample_interval=10, degeneracy_warn=threshold))
    return SimpleNamespace(raw_model=None, corpus=SimpleNamespace(tokenizer=None), cfg=settings,
                           info=SimpleNamespace(device="cpu", is_main=True),
                           state=SimpleNamespace(iteration=10, tokens_seen=3200))


@pytest.mark.parametrize("continuation, warns", [("eeeeeeeeeeeeeeeeeeee", True), ("Before we go", False)])
def test_text_samples_log_their_degeneracy_and_warn(monkeypatch, caplog, continuation, warns):
    from avatarl import periodic
    from avatarl.generate import Sample

    ids = [ord(char) for char in continuation]
    monkeypatch.setattr(periodic, "training_samples", lambda *args: [Sample("ROMEO:", ids, continuation)])
    logger = RecordingLogger()
    with caplog.at_level("WARNING", logger="avatarl"):
        periodic.TextSamples(logger).after_step(fake_run(0.2), good=True)
    assert logger.texts == [("samples", repr("ROMEO:" + continuation), 10)]
    [(step, logged)] = logger.metrics
    assert step == 10 and logged["tokens_seen"] == 3200
    assert logged["sample_longest_run"] == (20 if warns else 1)
    assert ("DEGENERACY_WARN=0.2" in caplog.text) == warns
