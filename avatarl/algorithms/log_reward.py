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
    top = keys.topk(min(k + 1, logp.size(-1)), dim=-1)
    actions = top.indices[:, :k]
    if top.values.size(-1) > k:
        kappa = top.values[:, k:k + 1]
    else:
        kappa = torch.full_like(top.values[:, :1], float("-inf"))
    return actions, kappa


def inclusion_probability(logp_actions: Tensor, kappa: Tensor) -> Tensor:
    """q(a) = P(a is among the K largest keys | kappa) = 1 - exp(-exp(logp(a) - kappa)); [N, K]."""
    return -torch.expm1(-torch.exp(logp_actions - kappa))


def log_reward_advantages(logp_actions: Tensor, rewards: Tensor, kappa: Tensor | None) -> Tensor:
    """A [N, K] of the module docstring from the draws' log-probs [N, K] and rewards [N, K] (>= 0).

    kappa [N, 1] for draws without replacement (gumbel_top_k), None for independent draws.
    """
    logp_actions, rewards = logp_actions.detach().float(), rewards.float()
    rewarded = rewards.sum(dim=1, keepdim=True) > 0
    if kappa is None:
        mean = rewards.mean(dim=1, keepdim=True)
        return torch.where(rewarded, rewards / mean.clamp_min(1e-30) - 1.0, torch.zeros_like(rewards))
    p = logp_actions.exp()
    weights = p / inclusion_probability(logp_actions, kappa).clamp_min(1e-30)
    paid = weights * rewards
    hit = paid / paid.sum(dim=1, keepdim=True).clamp_min(1e-30)
    outside = 1.0 - p.sum(dim=1, keepdim=True)
    miss = -p / outside.clamp_min(1e-6)
    return torch.where(rewarded, hit, miss)


def draws_for(vocab: int, k_samples: int, k_fraction: float) -> int:
    """K per position: ceil(K_FRACTION x the valid vocabulary) when K_FRACTION is set, else K_SAMPLES."""
    if k_fraction > 0:
        return max(1, min(vocab, math.ceil(k_fraction * vocab - 1e-9)))
    return k_samples
