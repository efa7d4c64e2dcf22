"""Policy entropy and the KL divergence to a reference, written once for every method: GRPO's loss weighs
both (entropy bonus, KL penalty), and every method reports them as its collapse and drift signals."""

from __future__ import annotations

import torch
from torch import Tensor


def entropy_of_log_probs(logp: Tensor, p: Tensor | None = None) -> Tensor:
    """H = -sum_v p_v log p_v in nats, per position: [..., V] -> [...], from log-probabilities already at
    hand (and p = exp(logp) when that is too), so no second [..., V] log_softmax or exp is made."""
    return -((logp.exp() if p is None else p) * logp).sum(dim=-1)


def kl_divergence(logp: Tensor, ref_logp: Tensor, p: Tensor | None = None, in_place: bool = False) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), in nats, per position: [..., V] -> [...].

    Both arguments are full log-distributions over the next token; p = exp(logp) when the caller already
    holds it. Terms with p_v = 0 contribute 0. `in_place` uses logp and p as scratch (both are overwritten)
    so that no [..., V] temporary is made: for metrics under no_grad only.
    """
    p = logp.exp() if p is None else p
    if in_place:
        return p.mul_(logp.sub_(ref_logp).masked_fill_(p == 0, 0.0)).sum(dim=-1)
    return torch.where(p > 0, p * (logp - ref_logp), 0.0).sum(dim=-1)


def entropy_and_kl(logp: Tensor, ref_logp: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(mean entropy of the policy exp(logp), mean KL(policy || reference)) over the positions of [..., V]
    log-probabilities, with gradient; exp(logp) is made once for both. The KL is None without a reference."""
    p = logp.exp()
    entropy = entropy_of_log_probs(logp, p).mean()
    return entropy, kl_divergence(logp, ref_logp, p).mean() if ref_logp is not None else None
