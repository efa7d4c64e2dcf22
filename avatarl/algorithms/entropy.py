"""Policy entropy, the collapse signal both algorithms report (and GRPO rewards)."""

from __future__ import annotations

from torch import Tensor


def entropy_of_log_probs(logp: Tensor, p: Tensor | None = None) -> Tensor:
    """H = -sum_v p_v log p_v in nats, per position: [..., V] -> [...], from log-probabilities already at
    hand (and p = exp(logp) when that is too), so no second [..., V] log_softmax or exp is made."""
    return -((logp.exp() if p is None else p) * logp).sum(dim=-1)
