"""Reference models: n-gram probabilities against hand counts, credit alignment, the HF path offline."""

import math
import sys

import pytest
import torch

from avatarl.algorithms.reference import HFReference, NgramReference, build_reference
from tests.helpers import HF_LINES

A, B, C = 0, 1, 2
CORPUS = torch.tensor([A, B, A, B, B, C])  # "ababbc", V = 3, alpha = 0.5 so alpha V = 1.5

# unigram counts a:2 b:3 c:1 of N=6 -> (n + 0.5) / 7.5
P1 = [2.5 / 7.5, 3.5 / 7.5, 1.5 / 7.5]
# bigram: after a -> b,b (N(a)=2); after b -> a,b,c (N(b)=3); after c -> nothing
P2 = {
    A: [(0 + 1.5 * P1[0]) / 3.5, (2 + 1.5 * P1[1]) / 3.5, (0 + 1.5 * P1[2]) / 3.5],  # 1/7, 27/35, 3/35
    B: [(1 + 1.5 * P1[i]) / 4.5 for i in range(3)],
    C: P1,
}
# trigram: aba, bab, abb, bbc -> after "ab": a, b; after "bb": c; after "ba": b
P3_AB = [(1 + 1.5 * P2[B][0]) / 3.5, (1 + 1.5 * P2[B][1]) / 3.5, (0 + 1.5 * P2[B][2]) / 3.5]
P3_BB = [(0 + 1.5 * P2[B][0]) / 2.5, (0 + 1.5 * P2[B][1]) / 2.5, (1 + 1.5 * P2[B][2]) / 2.5]


def probs(ref, history):
    return ref.log_probs(torch.tensor(history)).exp()


def test_bigram_matches_hand_counts():
    ref = NgramReference(2, 3, CORPUS, "cpu", alpha=0.5)
    assert P2[A] == pytest.approx([1 / 7, 27 / 35, 3 / 35])
    got = probs(ref, [A, B, C])
    torch.testing.assert_close(got, torch.tensor([P2[A], P2[B], P2[C]]))
    torch.testing.assert_close(got.sum(-1), torch.ones(3))


def test_trigram_backs_off_at_the_start_and_for_unseen_histories():
    ref = NgramReference(3, 3, CORPUS, "cpu", alpha=0.5)
    got = probs(ref, [A, B, B])  # position 0 has one predecessor: order-2 table
    torch.testing.assert_close(got, torch.tensor([P2[A], P3_AB, P3_BB]))
    unseen = probs(ref, [C, A])[1]  # "ca" never occurs: exactly p2(. | a)
    torch.testing.assert_close(unseen, torch.tensor(P2[A]))


def test_unigram_and_batched_shapes():
    uni = NgramReference(1, 3, CORPUS, "cpu", alpha=0.5)
    torch.testing.assert_close(probs(uni, [C, C]), torch.tensor([P1, P1]))
    tri = NgramReference(3, 3, CORPUS, "cpu", alpha=0.5)
    hist = torch.randint(0, 3, (2, 4, 7))
    out = tri.log_probs(hist)
    assert out.shape == (2, 4, 7, 3)
    torch.testing.assert_close(out[1, 2], tri.log_probs(hist[1, 2]))


def test_token_probs_align_with_generated_positions():
    bi = NgramReference(2, 3, CORPUS, "cpu", alpha=0.5)
    got = bi.token_probs(torch.tensor([[C, A, B]]), torch.tensor([[B, C]]))
    torch.testing.assert_close(got, torch.tensor([[P2[B][B], P2[B][C]]]))
    tri = NgramReference(3, 3, CORPUS, "cpu", alpha=0.5)
    got = tri.token_probs(torch.tensor([[C, A, B], [A, A, A]]), torch.tensor([[B, C], [B, B]]))
    expected_row1 = probs(tri, [A, A, A, B])[[2, 3], [B, B]]
    torch.testing.assert_close(got, torch.stack((torch.tensor([P3_AB[B], P3_BB[C]]), expected_row1)))
    short = tri.token_probs(torch.tensor([[A]]), torch.tensor([[B, B]]))  # one context char: backs off
    torch.testing.assert_close(short, torch.tensor([[P2[A][B], P3_AB[B]]]))


def test_token_probs_match_full_log_probs_on_random_data():
    gen = torch.Generator().manual_seed(0)
    ref = NgramReference(3, 5, torch.randint(0, 5, (400,), generator=gen), "cpu")
    ctx, samples = torch.randint(0, 5, (6, 9), generator=gen), torch.randint(0, 5, (6, 4), generator=gen)
    seq = torch.cat((ctx, samples), 1)
    full = ref.log_probs(seq[:, :-1])[:, 8:].gather(-1, samples[..., None]).squeeze(-1).exp()
    torch.testing.assert_close(ref.token_probs(ctx, samples), full)


def test_an_order_whose_table_would_not_fit_is_counted_sparsely():
    train = torch.randint(0, 65, (2000,), generator=torch.Generator().manual_seed(3))
    ref = NgramReference(5, 65, train, "cpu")  # 65^5 = 1.2 billion entries as a table
    assert ref.tables is None and ref.memory_bytes < 400 * len(train)
    seen = train[:12][None]
    probs = ref.log_probs(seen).exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 12))
    # each 5-gram occurs once, and its one count outweighs what alpha V = 6.5 spreads over the rest
    assert bool((probs[0, 3:-1].argmax(-1) == train[4:12]).all())


# --- Hugging Face reference, offline

CHARS = list("\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
LINES = HF_LINES


def encode(text):
    return [CHARS.index(ch) for ch in text]


def test_hf_reference_credit_is_the_per_char_share_of_token_logprobs(tiny_hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = HFReference(str(tiny_hf_dir), CHARS, "cpu")
    texts = [("Before we proceed", " any f"), ("You are all resol", "ved ra")]  # 2nd: a token straddles
    ctx = torch.tensor([encode(c) for c, _ in texts])
    samples = torch.tensor([encode(s) for _, s in texts])
    credit = ref.token_probs(ctx, samples)
    assert credit.shape == (2, 6) and bool(((credit > 0) & (credit <= 1)).all())

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    for row, (c, s) in enumerate(texts):
        enc = tokenizer(c + s, add_special_tokens=False, return_offsets_mapping=True)
        ids = [tokenizer.bos_token_id] + enc["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        # sum over continuation chars of log credit = sum_t l_t * (chars of t in the continuation) / n_t
        expected = 0.0
        for t, (start, end) in enumerate(enc["offset_mapping"]):
            inside = max(0, end - max(start, len(c)))
            expected += float(logp[t, ids[t + 1]]) * inside / (end - start)
        assert float(credit[row].log().sum()) == pytest.approx(expected, abs=1e-4)


def test_hf_reference_fills_uncovered_chars():
    owner = HFReference._char_tokens([(0, 2), (3, 5)], 6)  # char 2 is a gap, char 5 trails
    assert owner == [0, 0, 1, 1, 1, 1]


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'avatarl\[gpt2\]'"):
        HFReference("gpt2", CHARS, "cpu")


def test_build_reference_pairs(tiny_hf_dir):
    train = torch.tensor(encode("".join(LINES)))
    credit, kl = build_reference("ngram", 2, str(tiny_hf_dir), len(CHARS), CHARS, train, "cpu")
    assert credit is kl and isinstance(kl, NgramReference) and kl.order == 2
    credit, kl = build_reference("gpt2", 2, str(tiny_hf_dir), len(CHARS), CHARS, train, "cpu")
    with pytest.raises(ValueError, match="REFERENCE=gpt2 .* needs TOKENIZER=char"):
        build_reference("gpt2", 2, str(tiny_hf_dir), 512, [], train, "cpu")
    assert isinstance(credit, HFReference) and isinstance(kl, NgramReference)
    assert math.isfinite(float(credit.token_probs(torch.tensor([encode("We know")]),
                                                  torch.tensor([encode("'t")])).sum()))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_log_probs_from_reads_only_the_chars_that_reach_the_rows(order):
    gen = torch.Generator().manual_seed(order)
    train = torch.randint(0, 5, (400,), generator=gen)
    ref = NgramReference(order, 5, train, "cpu")
    history = torch.randint(0, 5, (3, 40), generator=gen)
    for first in (0, 1, 2, 30, 39):
        torch.testing.assert_close(ref.log_probs_from(history, first), ref.log_probs(history)[:, first:])
