"""The sparse n-gram reference: the dense formula's probabilities (its tables and its rows built from counts
agree with a dense oracle to 1e-6), memory that grows with the training ids and not with V^n (8,192 ids), and
GRPO's shipped defaults training end to end on BPE tokenizers with only DATA_PATH and TOKENIZER set."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from avatarl.algorithms.reference import NgramReference
from avatarl.cli import main as avatarl_main
from avatarl.config import config_fields
from tests.helpers import metric_records

ALPHA = 0.1


def dense_oracle(order: int, V: int, ids: list[int]) -> list[torch.Tensor]:
    """Table k = [V^(k-1), V] float64 probabilities of the interpolated add-alpha formula, dense counts."""
    tables, prob = [], torch.full((1, V), 1.0 / V, dtype=torch.float64)
    for k in range(1, order + 1):
        counts = torch.zeros(V ** k, dtype=torch.float64)
        for start in range(len(ids) - k + 1):
            index = 0
            for token in ids[start:start + k]:
                index = index * V + token
            counts[index] += 1
        counts = counts.view(V ** (k - 1), V)
        prior = prob.repeat(V, 1) if k > 1 else prob  # row h backs off to row h mod V^(k-2): oldest dropped
        prob = (counts + ALPHA * V * prior) / (counts.sum(1, keepdim=True) + ALPHA * V)
        tables.append(prob)
    return tables


def oracle_log_probs(tables: list[torch.Tensor], V: int, history: list[int]) -> torch.Tensor:
    """[L, V]: row i from the order min(n, i + 2) table and the tokens of history up to i."""
    rows = []
    for i in range(len(history)):
        k = min(len(tables), i + 2)
        index = 0
        for token in history[i + 2 - k:i + 1]:
            index = index * V + token
        rows.append(tables[k - 1][index])
    return torch.stack(rows).log().float()


@pytest.mark.parametrize("dense_limit", [0, 1 << 24], ids=["rows from counts", "tables"])
@pytest.mark.parametrize(("V", "order", "length"), [(3, 3, 6), (5, 4, 300), (7, 3, 40), (11, 2, 500),
                                                    (5, 1, 30), (4, 4, 2), (4, 3, 1), (4, 3, 0)])
def test_the_sparse_counts_give_the_dense_formula(V, order, length, dense_limit):
    gen = torch.Generator().manual_seed(V * 100 + order)
    train = torch.randint(0, V, (length,), generator=gen)
    ref = NgramReference(order, V, train, "cpu", alpha=ALPHA, dense_limit=dense_limit)
    assert (ref.tables is None) == (dense_limit == 0)
    tables = dense_oracle(order, V, train.tolist())
    histories = torch.randint(0, V, (4, 12), generator=gen)
    histories[0, :min(12, length)] = train[:12]  # contexts that were seen, not only unseen ones
    got = ref.log_probs(histories)
    want = torch.stack([oracle_log_probs(tables, V, row) for row in histories.tolist()])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for first in (0, 1, 5, 11):
        torch.testing.assert_close(ref.log_probs_from(histories, first), want[:, first:], atol=1e-6, rtol=0)
    assert ref.log_probs(histories[:, :0]).shape == (4, 0, V)


def counter_row(ids: list[int], V: int, history: list[int], order: int) -> torch.Tensor:
    """p_n(. | history) from Counters of the k-grams: the formula again, with nothing of the V^n table."""
    counts = Counter(ids)
    prob = torch.tensor([(counts[c] + ALPHA) / (len(ids) + ALPHA * V) for c in range(V)], dtype=torch.float64)
    for k in range(2, order + 1):
        context = tuple(history[len(history) - k + 1:])
        grams = Counter(tuple(ids[i:i + k]) for i in range(len(ids) - k + 1)
                        if tuple(ids[i:i + k - 1]) == context)
        seen = torch.zeros(V, dtype=torch.float64)
        for gram, n in grams.items():
            seen[gram[-1]] = n
        prob = (seen + ALPHA * V * prob) / (seen.sum() + ALPHA * V)
    return prob


@pytest.fixture(scope="module")
def bpe8192_ids(corpus_path: Path, tmp_path_factory) -> list[int]:
    """The first 300k chars of the corpus through an 8,192-id byte-level BPE trained on them."""
    from tokenizers import Tokenizer

    from avatarl.data.tokenizers import train_bpe

    text = corpus_path.read_text()[:300_000]
    path = train_bpe([text], 8192, tmp_path_factory.mktemp("bpe8192"))
    tokenizer = Tokenizer.from_file(str(path))
    assert tokenizer.get_vocab_size() == 8192
    return tokenizer.encode(text).ids


def test_an_8192_id_trigram_holds_bytes_for_its_contexts_not_for_v_cubed(bpe8192_ids):
    V, ids = 8192, bpe8192_ids
    ref = NgramReference(3, V, torch.tensor(ids), "cpu")
    assert ref.tables is None
    print(f"\n[reference] 8,192-id trigram on {len(ids):,} tokens: {ref.memory_bytes:,} bytes "
          f"({ref.memory_bytes / len(ids):.1f} per token; a table would hold {4 * V ** 3:,})")
    assert ref.memory_bytes < 32 * len(ids) + 4 * V  # measured: about 17 bytes a token
    history = ids[1000:1012]
    got = ref.log_probs(torch.tensor(history)).exp()
    torch.testing.assert_close(got.sum(-1), torch.ones(12))
    for i in (0, 5, 11):  # position 0 has one token before it: the bigram
        want = counter_row(ids, V, history[:i + 1], min(3, i + 2)).float()
        torch.testing.assert_close(got[i], want, atol=1e-6, rtol=1e-5)


# --- GRPO's defaults on BPE tokens, as a user runs them: only DATA_PATH (and TOKENIZER) set, the tiny sizes


def train_with_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **settings: str) -> Path:
    """`avatarl train --preset tiny` in tmp_path with only `settings` and CHECKPOINT_DIR set: its run dir."""
    for name in config_fields():
        monkeypatch.delenv(name.upper(), raising=False)
    run_dir = tmp_path / "run"
    for name, value in {**settings, "CHECKPOINT_DIR": str(run_dir)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no .env of the repository
    assert avatarl_main(["train", "--preset", "tiny"]) == 0
    return run_dir


def assert_grpo_with_its_trigram_trained(run_dir: Path) -> None:
    steps = [r for r in metric_records(run_dir) if "kl" in r]
    assert steps and all(0 < r["kl"] < float("inf") for r in steps)  # the default trigram anchored every step


def test_a_512_id_prepared_directory_trains_with_the_defaults(monkeypatch, tmp_path, prepared_shakespeare):
    run_dir = train_with_only(monkeypatch, tmp_path, DATA_PATH=str(prepared_shakespeare))
    assert_grpo_with_its_trigram_trained(run_dir)


def test_a_2048_id_tokenizer_trains_with_the_defaults(monkeypatch, tmp_path, corpus_path):
    slice_path = tmp_path / "slice.txt"
    slice_path.write_text(corpus_path.read_text()[:200_000])
    assert avatarl_main(["tokenizer", "train", "--vocab-size", "2048", "--output", str(tmp_path / "tok"),
                         str(slice_path)]) == 0
    run_dir = train_with_only(monkeypatch, tmp_path, DATA_PATH=str(slice_path),
                              TOKENIZER=str(tmp_path / "tok"))
    assert_grpo_with_its_trigram_trained(run_dir)
