"""GRPO with teacher-forced rollouts (ROLLOUTS=teacher_forced): the group is K actions sampled at one
position of a real text window, all positions from the same forward pass.

Per micro-batch of B windows of C + 1 tokens (C = CONTEXT_LEN), with N = B x C positions:

1. one forward pass gives the student's logits at every position, pi(. | x_<=i)   [B, C, V];
2. K actions per position are drawn from pi_T = softmax(logits / T)                [B, C, K];
3. each earns r = exact_match * 1[a == x_{i+1}] + partial_credit * p_ref(a | x_<=i);
4. advantages normalise r within the K actions of one position (GRPO's group_advantages);
5. loss = -mean(A * log pi_T(a)) - entropy_coef * mean H(pi) + kl_coef * mean KL(pi || ref).

The actions come from the policy being trained, so the importance ratio is 1 and PPO's clip never
binds: this is on-policy REINFORCE with a group baseline. A rollout costs one forward pass instead of
HORIZON decode steps, so K can be large. The true token enters only through the scalar reward of the
actions that happen to hit it; the student never sees a cross-entropy gradient or a soft target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatarl.algorithms.entropy import entropy_of_log_probs
from avatarl.algorithms.grpo import KLReference, group_advantages, kl_to_reference, reward_metrics
from avatarl.config_sections import GRPOSettings


def sample_actions(logp_tempered: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """K draws with replacement from each row's distribution: logp_tempered [N, V] -> actions [N, K]."""
    return torch.multinomial(logp_tempered.detach().exp(), k, replacement=True, generator=generator)


def position_rewards(actions: Tensor, truth: Tensor, ref_prob: Tensor | None, settings: GRPOSettings) -> Tensor:
    """r[n, k] = exact_match * 1[actions[n, k] == truth[n]] + partial_credit * ref_prob[n, k].

    actions [N, K], truth [N], ref_prob [N, K] (p_ref of each action; None when partial_credit is 0).
    """
    rewards = settings.exact_match_reward * (actions == truth[:, None]).float()
    if ref_prob is not None and settings.partial_credit:
        rewards = rewards + settings.partial_credit * ref_prob.float()
    return rewards


def teacher_forced_micro_step(policy: nn.Module, reference: KLReference | None, window: Tensor,
                              settings: GRPOSettings, kl_coef: float | Tensor,
                              generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch of windows [B, C + 1]: returns (loss, detached metrics) as grpo_micro_step does.

    `reference` (the n-gram) gives the partial credit and the KL; None when neither is used, and then no
    KL is logged. Metrics: grpo.reward_metrics (the group is the K draws at one position).
    """
    inputs, truth = window[:, :-1], window[:, 1:].flatten()  # [B, C], [N]
    K, T = settings.k_samples, settings.temperature
    logits = policy(inputs).float().flatten(0, 1)  # [N, V]
    logp_tempered = F.log_softmax(logits / T, dim=-1)
    actions = sample_actions(logp_tempered, K, generator)  # [N, K]
    with torch.no_grad():
        ref_logp = reference.log_probs(inputs).flatten(0, 1).float() if reference is not None else None  # [N, V]
        ref_prob = ref_logp.gather(-1, actions).exp() if ref_logp is not None else None
        rewards = position_rewards(actions, truth, ref_prob, settings)
        advantages = group_advantages(rewards[..., None], settings.min_variance)[..., 0]  # group: dim 1 (K)
    policy_loss = -(advantages * logp_tempered.gather(-1, actions)).mean()
    logp = logp_tempered if T == 1 else F.log_softmax(logits, dim=-1)  # the same tensor at T = 1
    p = logp.exp()
    ent = entropy_of_log_probs(logp, p).mean()
    kl = kl_to_reference(logp, ref_logp, p).mean() if ref_logp is not None else None
    loss = policy_loss - settings.entropy_coef * ent + (kl_coef * kl if kl is not None else 0.0)
    hits = (actions == truth[:, None]).float()
    return loss, reward_metrics(rewards, hits, policy_loss, ent, kl)
