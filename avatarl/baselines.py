"""Count models as yardsticks: what a unigram ... 4-gram of the training split scores on the very
validation windows the student is measured on, in the same units (accuracy and cross-entropy).

An RL student rewarded for exact matches is judged fairly by its next-token accuracy; these lines
say what "good" means there: a policy that beats the trigram's accuracy has learnt more than three
tokens of context, whatever its raw cross-entropy says.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from avatarl.algorithms.reference import ROW_CHUNK_ELEMENTS, NgramReference
from avatarl.data.corpus import Corpus, reference_ids
from avatarl.data.sampler import eval_windows

ORDER_NAMES = {1: "unigram", 2: "bigram", 3: "trigram", 4: "4-gram"}


@torch.no_grad()
def count_model_baselines(train_ids: Tensor, val_windows: Tensor, vocab_size: int,
                          orders: tuple[int, ...] = (1, 2, 3, 4)) -> dict[str, dict[str, float]]:
    """{"uniform": {"acc", "ce"}, "unigram": {...}, "bigram": ..., } on val_windows [N, T + 1].

    Each n-gram is NgramReference (interpolated add-alpha counts of train_ids, sparse, so every order runs
    at every vocabulary) predicting token i + 1 of a window from tokens <= i of the same window, as the
    student does; near a window's start it backs off to the orders its history allows. acc = share of
    predicted tokens that are the n-gram's argmax, ce = mean -ln p(true token). The uniform model has no
    argmax: its acc is the chance accuracy 1 / V of a uniform guess, its ce ln V. Windows are scored a few
    at a time, so that their [windows, T, V] rows stay within ROW_CHUNK_ELEMENTS.
    """
    windows = val_windows.detach().cpu().long()
    targets = windows[:, 1:]
    chunk = max(1, ROW_CHUNK_ELEMENTS // max(1, targets.size(1) * vocab_size))
    result = {"uniform": {"acc": 1.0 / vocab_size, "ce": math.log(vocab_size)}}
    for order in orders:
        model = NgramReference(order, vocab_size, train_ids, "cpu")
        hits, nats = 0, 0.0
        for start in range(0, len(windows), chunk):
            logp = model.log_probs(windows[start:start + chunk, :-1])  # [n, T, V]
            truth = targets[start:start + chunk]
            hits += int((logp.argmax(-1) == truth).sum())
            nats += float(-logp.gather(-1, truth[..., None]).sum())
        result[ORDER_NAMES[order]] = {"acc": hits / targets.numel(), "ce": nats / targets.numel()}
    return result


def corpus_baselines(corpus: Corpus, context_len: int, windows: int) -> dict[str, dict[str, float]]:
    """count_model_baselines of a run's corpus on the validation windows its Validation duty scores
    (eval_windows with CONTEXT_LEN and EVAL_WINDOWS), over the tokenizer's ids: padded ids never occur."""
    val_windows = eval_windows(corpus.val, context_len, windows)
    return count_model_baselines(reference_ids(corpus.train), val_windows, corpus.tokenizer.size)
