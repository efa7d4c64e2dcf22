"""GRPO with teacher-forced rollouts (ROLLOUTS=teacher_forced): the group is K actions sampled at one
position of a real text window, all positions from the same forward pass.

Per micro-batch of B windows of C + 1 tokens (C = CONTEXT_LEN), with N = B x C positions:

1. one forward pass gives the student's logits at every position, pi(. | x_<=i)   [B, C, V];
2. K actions per position are drawn from pi_T = softmax(logits / T)                [B, C, K];
3. each earns r = exact_match * 1[a == x_{i+1}] + partial_credit * p_ref(a | x_<=i) (grpo.match_rewards);
4. advantages compare r within the K actions of one position: by default GRPO's group_advantages,
   (r - mean) / max(std, MIN_VARIANCE); another `Advantages` function can be passed in;
5. loss = -mean(A * log pi_T(a)) - entropy_coef * mean H(pi) + kl_coef * mean KL(pi || ref) (grpo.grpo_loss).

The actions come from the policy being trained, so the importance ratio is 1 and PPO's clip never
binds: this is on-policy REINFORCE with a group baseline. A rollout costs one forward pass instead of
HORIZON decode steps, so K can be large. The true token enters only through the scalar reward of the
actions that happen to hit it; the student never sees a cross-entropy gradient or a soft target.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatarl.algorithms.entropy import entropy_and_kl
from avatarl.algorithms.grpo import KLReference, group_advantages, grpo_loss, match_rewards, reward_metrics
from avatarl.config_sections import GRPOSettings

# rewards [N, K] (the group: the K draws at one of N positions) -> advantages [N, K], without gradient.
Advantages = Callable[[Tensor, GRPOSettings], Tensor]


def std_advantages(rewards: Tensor, settings: GRPOSettings) -> Tensor:
    """GRPO's advantages: (r - group mean) / max(group std, MIN_VARIANCE), the group on dim 1."""
    return group_advantages(rewards[..., None], settings.min_variance)[..., 0]


def sample_actions(logp_tempered: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """K draws with replacement from each row's distribution: logp_tempered [N, V] -> actions [N, K]."""
    return torch.multinomial(logp_tempered.detach().exp(), k, replacement=True, generator=generator)


def teacher_forced_micro_step(policy: nn.Module, reference: KLReference | None, window: Tensor,
                              settings: GRPOSettings, kl_coef: float | Tensor,
                              generator: torch.Generator | None = None,
                              advantages: Advantages = std_advantages) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch of windows [B, C + 1]: returns (loss, detached metrics) as grpo_micro_step does.

    `reference` (the n-gram) gives the partial credit and the KL; None when neither is used, and then no
    KL is logged. `advantages` turns the rewards of each position's K draws into their advantages. Metrics:
    grpo.reward_metrics (the group is the K draws at one position).
    """
    inputs, truth = window[:, :-1], window[:, 1:].flatten()  # [B, C], [N]
    K, T = settings.k_samples, settings.temperature
    logits = policy(inputs).float().flatten(0, 1)  # [N, V]
    logp_tempered = F.log_softmax(logits / T, dim=-1)
    actions = sample_actions(logp_tempered, K, generator)  # [N, K]
    with torch.no_grad():
        ref_logp = reference.log_probs(inputs).flatten(0, 1).float() if reference is not None else None
        ref_prob = ref_logp.gather(-1, actions).exp() if ref_logp is not None else None
        hits = (actions == truth[:, None]).float()
        rewards = match_rewards(hits, ref_prob, settings.exact_match_reward, settings.partial_credit)
        advantage = advantages(rewards, settings)
    policy_loss = -(advantage * logp_tempered.gather(-1, actions)).mean()
    logp = logp_tempered if T == 1 else F.log_softmax(logits, dim=-1)  # the same tensor at T = 1
    ent, kl = entropy_and_kl(logp, ref_logp)
    loss = grpo_loss(policy_loss, ent, kl, settings.entropy_coef, kl_coef)
    return loss, reward_metrics(rewards, hits, policy_loss, ent, kl)
