"""The log E[reward] policy gradient over K sampled actions per position (ADVANTAGE=log_reward).

GRPO normalises a group's rewards by their standard deviation. For an exact-match reward
r(a) = 1[a == truth] that throws the scale away: the objective worth climbing is log E_pi[r] = log
pi(truth), whose gradient is the likelihood's. Its policy-gradient estimator needs only the scalar rewards
of the sampled actions and their log-probabilities:

- SAMPLING=without_replacement: K distinct actions per position, the K largest of logp + Gumbel noise
  (an exact sample without replacement from pi). With kappa the (K+1)-th largest perturbed key, an
  action's inclusion probability is q(a) = 1 - exp(-exp(logp(a) - kappa)), and w = pi / q. The
  Horvitz-Thompson estimate of grad log E[r] = grad E[r] / E[r] is
      sum_k A_k grad log pi(a_k),  A_k = w_k r_k / sum_j w_j r_j
  when some action earned a reward. For exact match that is grad log pi(truth) at each position whose
  draws hit the truth: the likelihood gradient, earned only by sampling the right token.
  When every draw earned 0 the estimate is undefined; what the rewards then say is that the truth lies
  outside the drawn set S, and A_k = -pi(a_k) / (1 - pi(S)) is the policy's own expectation of the
  likelihood gradient given that (it lowers the drawn ids, and raises the others in proportion to pi).
- SAMPLING=with_replacement: K independent draws, A_k = r_k / mean(r) - 1 (the group mean replaces the
  std), and 0 for a group without reward.

No soft target and no reference model enter: the truth reaches the student only through r.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gumbel_top_k(logp: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """K distinct draws per row without replacement: logp [N, V] -> (actions [N, K], kappa [N, 1]).

    kappa is the (K+1)-th largest perturbed key (+inf rows have none: K = V gives kappa = -inf).
    """
    uniform = torch.rand(logp.shape, generator=generator, device=logp.device).clamp_min(1e-20)
    keys = logp.detach() - torch.log(-torch.log(uniform))  # logp + Gumbel(0, 1)
    if k >= logp.size(-1):
        actions = keys.topk(logp.size(-1), dim=-1).indices
        return actions, torch.full_like(keys[:, :1], float("-inf"))
    # Unsorted: at K = V/4 of 50,257 ids sorting the K + 1 largest keys took half the draw's time on a CPU.
    values, indices = keys.topk(k + 1, dim=-1, sorted=False)
    smallest = values.argmin(dim=-1, keepdim=True)  # the (K+1)-th largest: kappa, not drawn
    kappa = values.gather(-1, smallest)
    actions = indices.scatter(-1, smallest, indices[:, k:])[:, :k]  # the last slot's id takes its place
    return actions, kappa


def inclusion_probability(logp_actions: Tensor, kappa: Tensor) -> Tensor:
    """q(a) = P(a is among the K largest keys | kappa) = 1 - exp(-exp(logp(a) - kappa)); [N, K]."""
    return -torch.expm1(-torch.exp(logp_actions - kappa))


def log_reward_advantages(logp_actions: Tensor, rewards: Tensor, kappa: Tensor | None) -> Tensor:
    """A [N, K] of the module docstring from the draws' log-probs [N, K] and rewards [N, K] (>= 0).

    kappa [N, 1] for draws without replacement (gumbel_top_k), None for independent draws.
    """
    logp_actions, rewards = logp_actions.detach().float(), rewards.float()
    if kappa is None:
        return mean_normalised_advantages(rewards)
    rewarded = rewards.sum(dim=1, keepdim=True) > 0
    p = logp_actions.exp()
    weights = p / inclusion_probability(logp_actions, kappa).clamp_min(1e-30)
    paid = weights * rewards
    hit = paid / paid.sum(dim=1, keepdim=True).clamp_min(1e-30)
    outside = 1.0 - p.sum(dim=1, keepdim=True)
    miss = -p / outside.clamp_min(1e-6)
    return torch.where(rewarded, hit, miss)


def importance_advantages(logp_actions: Tensor, rewards: Tensor, kappa: Tensor | None) -> Tensor:
    """A [N, K] = r / P(a drawn): Σ_k A_k grad log pi(a_k) is an unbiased (Horvitz-Thompson) estimate of
    Σ_a r(a) grad log pi(a) over every id, which for exact match is grad log pi(truth) at every position,
    hit or not. P(a drawn) is the inclusion probability q(a) for draws without replacement (kappa
    [N, 1]), K pi(a) (the expected count) for K independent draws (kappa None). No baseline: the estimate
    of a position that drew nothing rewarded is 0, and its variance is that of 1 / q on the hits."""
    logp_actions, rewards = logp_actions.detach().float(), rewards.float()
    if kappa is None:
        drawn = rewards.size(1) * logp_actions.exp()
    else:
        drawn = inclusion_probability(logp_actions, kappa)
    return rewards / drawn.clamp_min(1e-30)


def mean_normalised_advantages(rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """A = r / mean(r) - 1 over the group on dim 1, for independent draws: Σ_k A_k grad log pi(a_k) / K
    estimates grad log E[r]; 0 for a group that earned nothing (it says nothing about where the reward is).

    With `mask` (1.0 / 0.0, the shape of rewards) the group is only the draws where it is 1 (their mean,
    advantage 0 elsewhere): autoregressive GRPO's CREDIT=prefix groups.
    """
    rewards = rewards.float()
    if mask is None:
        mask = torch.ones_like(rewards)
    count = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (rewards * mask).sum(dim=1, keepdim=True) / count
    return torch.where(mean > 0, mask * (rewards / mean.clamp_min(1e-30) - 1.0), torch.zeros_like(rewards))


def draws_for(vocab: int, k_samples: int, k_fraction: float) -> int:
    """K per position: ceil(K_FRACTION x the valid vocabulary) when K_FRACTION is set, else K_SAMPLES."""
    if k_fraction > 0:
        return max(1, min(vocab, math.ceil(k_fraction * vocab - 1e-9)))
    return k_samples
