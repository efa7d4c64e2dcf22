"""Policy entropy, the collapse signal both algorithms report (and GRPO rewards)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def entropy(logits: Tensor) -> Tensor:
    """H = -sum_v p_v log p_v with p = softmax(logits), in nats, per position: [..., V] -> [...]."""
    return entropy_of_log_probs(F.log_softmax(logits.float(), dim=-1))


def entropy_of_log_probs(logp: Tensor, p: Tensor | None = None) -> Tensor:
    """The same H from log-probabilities already at hand (and p = exp(logp) when that is too), so no second
    [..., V] log_softmax or exp is made."""
    return -((logp.exp() if p is None else p) * logp).sum(dim=-1)
