"""GRPO with teacher-forced rollouts (ROLLOUTS=teacher_forced): the group is K actions sampled at one
position of a real text window, all positions from the same forward pass.

Per micro-batch of B windows of C + 1 tokens (C = CONTEXT_LEN), with N = B x C positions:

1. one forward pass gives the student's logits at every position, pi(. | x_<=i)   [B, C, V];
2. K actions per position are drawn from pi_T = softmax(logits / T)                [B, C, K]
   (SAMPLING: K independent draws, or K distinct ids by Gumbel top-K);
3. each earns r = exact_match * 1[a == x_{i+1}] + partial_credit * p_ref(a | x_<=i) (grpo.match_rewards);
4. advantages compare r within the K actions of one position (ADVANTAGE): GRPO's group_advantages,
   (r - mean) / max(std, MIN_VARIANCE), log_reward's estimate of grad log E[r], or importance's of
   grad Σ_a r(a) log pi(a) (log_reward.py);
5. loss = -mean_n(policy term) - entropy_coef * mean H(pi) + kl_coef * mean KL(pi || ref) (grpo.grpo_loss),
   the policy term mean_k(A * log pi_T(a)) for group_std and sum_k(A * log pi_T(a)) for log_reward and
   importance (estimates of one position's gradient, not of the K draws' mean).

The actions come from the policy being trained, so the importance ratio is 1 and PPO's clip never
binds: this is on-policy REINFORCE with a group baseline. A rollout costs one forward pass instead of
HORIZON decode steps, so K can be large. The true token enters only through the scalar reward of the
actions that happen to hit it; the student never sees a cross-entropy gradient or a soft target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatarl.algorithms.entropy import entropy_and_kl
from avatarl.algorithms.grpo import KLReference, group_advantages, grpo_loss, match_rewards, reward_metrics
from avatarl.algorithms.log_reward import gumbel_top_k, importance_advantages, log_reward_advantages
from avatarl.config_schema import Advantage, Sampling
from avatarl.config_sections import GRPOSettings


def std_advantages(rewards: Tensor, settings: GRPOSettings) -> Tensor:
    """GRPO's advantages: (r - group mean) / max(group std, MIN_VARIANCE), the group on dim 1."""
    return group_advantages(rewards[..., None], settings.min_variance)[..., 0]


def sample_actions(logp_tempered: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """K draws with replacement from each row's distribution: logp_tempered [N, V] -> actions [N, K]."""
    return torch.multinomial(logp_tempered.detach().exp(), k, replacement=True, generator=generator)


def draw(logp_tempered: Tensor, k: int, sampling: Sampling, generator: torch.Generator | None = None
         ) -> tuple[Tensor, Tensor | None]:
    """(actions [N, K], the Gumbel threshold kappa [N, 1] for draws without replacement, else None)."""
    if sampling == Sampling.WITHOUT_REPLACEMENT:
        return gumbel_top_k(logp_tempered, k, generator)
    return sample_actions(logp_tempered, k, generator), None


def policy_term(rewards: Tensor, logp_actions: Tensor, kappa: Tensor | None,
                settings: GRPOSettings) -> Tensor:
    """The policy-gradient loss of N positions' K draws (rewards, log pi_T(a) [N, K]); step 5 above."""
    estimates = {Advantage.LOG_REWARD: log_reward_advantages, Advantage.IMPORTANCE: importance_advantages}
    if settings.advantage in estimates:
        advantage = estimates[settings.advantage](logp_actions, rewards, kappa)
        return -(advantage * logp_actions).sum(dim=1).mean()
    return -(std_advantages(rewards, settings) * logp_actions).mean()


def teacher_forced_micro_step(policy: nn.Module, reference: KLReference | None, window: Tensor,
                              settings: GRPOSettings, kl_coef: float | Tensor,
                              generator: torch.Generator | None = None, k: int | None = None
                              ) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch of windows [B, C + 1]: returns (loss, detached metrics) as grpo_micro_step does.

    `reference` (the n-gram) gives the partial credit and the KL; None when neither is used, and then no
    KL is logged. k: draws per position (None = K_SAMPLES). Metrics: grpo.reward_metrics (the group is the
    K draws at one position) and truth_drawn, the share of positions whose draws include the true token.
    """
    inputs, truth = window[:, :-1], window[:, 1:].flatten()  # [B, C], [N]
    K, T = k or settings.k_samples, settings.temperature
    logits = policy(inputs).float().flatten(0, 1)  # [N, V]
    logp_tempered = F.log_softmax(logits / T, dim=-1)
    actions, kappa = draw(logp_tempered, K, settings.sampling, generator)  # [N, K]
    with torch.no_grad():
        ref_logp = reference.log_probs(inputs).flatten(0, 1).float() if reference is not None else None
        ref_prob = ref_logp.gather(-1, actions).exp() if ref_logp is not None else None
        hits = (actions == truth[:, None]).float()
        rewards = match_rewards(hits, ref_prob, settings.exact_match_reward, settings.partial_credit)
    policy_loss = policy_term(rewards, logp_tempered.gather(-1, actions), kappa, settings)
    logp = logp_tempered if T == 1 else F.log_softmax(logits, dim=-1)  # the same tensor at T = 1
    ent, kl = entropy_and_kl(logp, ref_logp)
    loss = grpo_loss(policy_loss, ent, kl, settings.entropy_coef, kl_coef)
    metrics = reward_metrics(rewards, hits, policy_loss, ent, kl)
    metrics["truth_drawn"] = hits.amax(dim=1).mean()
    return loss, metrics
