"""Policy entropy, the collapse signal both algorithms report (and GRPO rewards)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def entropy(logits: Tensor) -> Tensor:
    """H = -sum_v p_v log p_v with p = softmax(logits), in nats, per position: [..., V] -> [...]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)
