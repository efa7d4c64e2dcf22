"""Group Relative Policy Optimisation (GRPO) with autoregressive rollouts, as in the seed.

Per micro-batch of B contexts of C tokens with their true continuations of H tokens:

1. the frozen old policy samples K continuations of H tokens per context at temperature T;
2. each generated token earns r = 1[token == true token] + partial_credit * p_ref(token | preceding tokens);
   with CREDIT=prefix only while the tokens sampled before it are the true ones (after a miss the true
   continuation is no longer the right target), else 0;
3. advantages normalise r within each group of K samples, separately at every horizon position (with
   CREDIT=prefix the group is the samples whose prefix is still the true one): by the group's std
   (ADVANTAGE=group_std, GRPO's) or its mean (log_reward: r / mean - 1, the estimate of grad log E[r],
   which for exact match is the likelihood gradient where a sample hit the truth);
4. the student's tempered log-probs of the sampled tokens enter PPO's clipped surrogate;
5. the loss adds -entropy_coef * entropy and +kl_coef * KL(student || reference) (`grpo_loss`).

No cross-entropy against the data ever reaches the student: the true text only enters through
the exact-match reward. Shapes: B contexts, K samples each, C context tokens, H horizon tokens, V vocab.
The rewards, advantages, loss and metrics here are shared with teacher-forced GRPO (teacher_forced.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatarl.algorithms.entropy import entropy_and_kl
from avatarl.algorithms.log_reward import mean_normalised_advantages
from avatarl.config_schema import Advantage, Credit
from avatarl.config_sections import GRPOSettings
from avatarl.cuda_graphs import GraphedDecoding
from avatarl.model import KVCache


class CreditReference(Protocol):
    def token_probs(self, ctx: Tensor, samples: Tensor) -> Tensor: ...


class KLReference(CreditReference, Protocol):
    def log_probs_from(self, history: Tensor, first: int) -> Tensor: ...


@dataclass
class Rollout:
    samples: Tensor   # [B, K, H] int64, sampled tokens
    old_logp: Tensor  # [B, K, H] float32, log-prob of each under the tempered old policy


def repeat_cache_rows(cache: KVCache, repeats: int) -> None:
    """Row b of the cache becomes rows b*repeats .. b*repeats + repeats - 1 (keys/values are
    [L, B, T, H, D])."""
    cache.k = cache.k.repeat_interleave(repeats, dim=1)
    cache.v = cache.v.repeat_interleave(repeats, dim=1)
    cache.batch_size *= repeats


def draw_tempered(logits: Tensor, temperature: float, generator: torch.Generator | None = None
                  ) -> tuple[Tensor, Tensor]:
    """One token per row from pi_T = softmax(logits / T): (token [N, 1], log pi_T(token) [N, 1]).

    An exponential race, argmax_v pi_T(v) / E_v with E_v ~ Exp(1), draws exactly from pi_T without
    host syncs. logits [N, V]; `generator` must live on their device.
    """
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # [N, V]
    race = torch.empty_like(logp).exponential_(1.0, generator=generator)
    token = (logp - race.log()).argmax(dim=-1, keepdim=True)
    return token, logp.gather(-1, token)


@torch.no_grad()
def rollout(old_policy: nn.Module, ctx: Tensor, k: int, horizon: int, temperature: float,
            generator: torch.Generator | None = None, graphs: GraphedDecoding | None = None) -> Rollout:
    """Sample K continuations of `horizon` tokens per context in one batched, KV-cached pass.

    Each context is prefilled once (the K samples share it), then its cache and last logits are
    repeated to [B*K] rows (row b*K + j is sample j of context b) and decoded one token per step.
    Each token x_h is drawn from pi_T = softmax(logits / T) by `draw_tempered`, and old_logp scores it:
    old_logp_h = log pi_T(x_h | ctx, x_<h). `generator` must live on ctx's device. With `graphs`
    (USE_CUDA_GRAPHS), the decode steps replay a captured CUDA graph of old_policy's decode step; the
    draws are the same, the logits equal up to float rounding.
    """
    B, C = ctx.shape
    cache = old_policy.new_cache(B, max_len=C + horizon - 1)
    logits = old_policy(ctx, cache=cache)[:, -1].repeat_interleave(k, dim=0)  # [B*K, V]
    if graphs is not None:
        decoder = graphs.prepare(cache, k)
    elif cache is not None:  # None from a policy that needs no cache (e.g. a bigram table)
        repeat_cache_rows(cache, k)
    samples, logps = [], []
    for h in range(horizon):
        token, logp = draw_tempered(logits, temperature, generator)  # [B*K, 1] each
        samples.append(token)
        logps.append(logp)
        if h + 1 < horizon:
            logits = old_policy(token, cache=cache)[:, -1] if graphs is None else decoder.step(token, C + h)
    return Rollout(torch.cat(samples, 1).view(B, k, horizon), torch.cat(logps, 1).view(B, k, horizon))


def match_rewards(hits: Tensor, ref_prob: Tensor | None, exact_match: float, partial_credit: float) -> Tensor:
    """r = exact_match * hit + partial_credit * p_ref(action), elementwise, for both rollout kinds.

    hits: 1.0 where the sampled token is the true one, else 0.0 (float, any shape); ref_prob: the reference's
    probability of each sampled token, of the same shape, or None when partial_credit is 0. exact_match =
    partial_credit = 0 switches the reward off (the ablation that isolates what the KL and entropy terms
    alone teach).
    """
    rewards = exact_match * hits
    if ref_prob is not None and partial_credit:
        rewards = rewards + partial_credit * ref_prob.float()
    return rewards


def group_advantages(rewards: Tensor, min_std: float, mask: Tensor | None = None) -> Tensor:
    """A[b,k,h] = (r[b,k,h] - mean_k r[b,:,h]) / max(std_k r[b,:,h], min_std).

    std is the population standard deviation over the K samples (divide by K, not K - 1), so a
    group of identical rewards has std 0 and advantages 0; the floor keeps near-ties from being
    blown up into +-1 advantages. With `mask` (1.0 / 0.0, the shape of rewards) the group at (b, h) is
    only the samples where mask is 1: mean and std are theirs, and the other samples get advantage 0
    (so does a group of one, which has nothing to be compared with).
    """
    if mask is None:
        mean = rewards.mean(dim=1, keepdim=True)
        std = rewards.std(dim=1, keepdim=True, correction=0)
        return (rewards - mean) / std.clamp_min(min_std)
    count = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (rewards * mask).sum(dim=1, keepdim=True) / count
    std = (((rewards - mean) * mask).square().sum(dim=1, keepdim=True) / count).sqrt()
    return mask * (rewards - mean) / std.clamp_min(min_std)


def prefix_credit(hits: Tensor) -> Tensor:
    """1.0 at position h of a sample while every token it sampled before h is the true one, else 0.0.

    hits [B, K, H] (1.0 where a sample is the true token). Position 0 always counts. After a sample's
    first miss its prefix is no longer the true one, so the true continuation stops being the right
    target for it: the tokens after the miss earn nothing (CREDIT=prefix).
    """
    return torch.cat((torch.ones_like(hits[..., :1]), hits[..., :-1].cumprod(dim=-1)), dim=-1)


def ppo_clip_loss(new_logp: Tensor, old_logp: Tensor, adv: Tensor, clip_ratio: float
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, averaged over every sampled token.

    rho = exp(new_logp - old_logp); s = min(rho A, clip(rho, 1 - eps, 1 + eps) A); loss = -mean(s).
    stats (detached tensors): ratio_mean, ratio_max, and clip_frac = the fraction of tokens where the
    clipped term binds (rho > 1 + eps with A > 0, or rho < 1 - eps with A < 0), i.e. the tokens that
    get no gradient from the surrogate.
    """
    ratio = torch.exp(new_logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio) * adv
    loss = -torch.minimum(unclipped, clipped).mean()
    binds = ((ratio > 1.0 + clip_ratio) & (adv > 0)) | ((ratio < 1.0 - clip_ratio) & (adv < 0))
    ratio = ratio.detach()
    stats = {"ratio_mean": ratio.mean(), "ratio_max": ratio.max(), "clip_frac": binds.float().mean()}
    return loss, stats


def grpo_loss(policy_loss: Tensor, entropy: Tensor, kl: Tensor | None, entropy_coef: float,
              kl_coef: float | Tensor) -> Tensor:
    """policy_loss - entropy_coef * H(pi) + kl_coef * KL(pi || ref): both GRPO losses (no KL term without a
    reference)."""
    loss = policy_loss - entropy_coef * entropy
    return loss + kl_coef * kl if kl is not None else loss


class AdaptiveKLController:
    """The PPO-style proportional controller of the KL weight (Ziegler et al., 2019).

    After n_tokens sampled tokens with measured KL: e = clip(kl / target - 1, -0.2, 0.2) and
    coef <- min(coef * (1 + e * min(n_tokens / horizon_tokens, 1)), max_coef). The inner min keeps one
    update inside [0.8, 1.2] x coef, so the weight stays positive however long the interval. The cap
    matters when the student cannot reach the target yet (a trigram reference early on): uncapped,
    the weight grew by 1.2x per update to ~1e15 in 1000 iterations of the defaults study. It takes a
    host float: the caller decides how often to pay the device sync that reads the KL (objectives/
    grpo_base.py: every KL_UPDATE_INTERVAL steps, whatever LOG_INTERVAL).
    """

    def __init__(self, init_coef: float, target: float, horizon_tokens: float, max_coef: float = 100.0):
        if target <= 0 or horizon_tokens <= 0 or max_coef <= 0:
            raise ValueError(f"target={target}, horizon_tokens={horizon_tokens} and max_coef={max_coef} "
                             "must be positive")
        self.coef, self.target, self.horizon_tokens = float(init_coef), float(target), float(horizon_tokens)
        self.max_coef = float(max_coef)

    @property
    def value(self) -> float:
        return self.coef

    def update(self, kl: float, n_tokens: int) -> float:
        """Move coef toward the weight that holds KL at target; a non-finite kl leaves it unchanged."""
        if kl == kl and abs(kl) != float("inf"):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            share = min(n_tokens / self.horizon_tokens, 1.0)
            self.coef = min(self.coef * (1.0 + error * share), self.max_coef)
        return self.coef

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state["coef"])


def kl_warmup(coef: float, tokens_seen: int, kl_warm: int) -> float:
    """coef * min(1, tokens_seen / kl_warm): a linear ramp from 0 over the first kl_warm tokens (0 = none)."""
    if kl_warm <= 0:
        return coef
    return coef * min(1.0, tokens_seen / kl_warm)


@dataclass
class Scored:
    inputs: Tensor      # [B*K, C+H-1] context + samples: position C-1+h predicts sample h
    ref_logp: Tensor    # [B*K, H, V] the KL reference's next-token log-distribution, generated positions
    hits: Tensor        # [B, K, H] 1.0 where the sample is the true token
    rewards: Tensor     # [B, K, H]
    advantages: Tensor  # [B, K, H]
    credited: Tensor | None = None  # [B, K, H] CREDIT=prefix: 1.0 where a token earns reward (prefix_credit)


@torch.no_grad()
def score_rollout(ro: Rollout, ctx: Tensor, truth: Tensor, reference: KLReference, settings: GRPOSettings,
                  credit_reference: CreditReference | None = None) -> Scored:
    """Reference log-probs, per-token rewards (`match_rewards`) and group advantages of a rollout (no
    gradient).

    The partial credit is p_ref(sampled token) from `reference` itself unless `credit_reference` (e.g. a
    Hugging Face LM) is given; PARTIAL_CREDIT=0 skips it. With CREDIT=prefix a token is paid only while
    its sample's earlier tokens are the true ones (`prefix_credit`), and its group is those samples.
    """
    B, K, H = ro.samples.shape
    C = ctx.shape[1]
    flat = ro.samples.view(B * K, H)
    ctx_rep = ctx.repeat_interleave(K, dim=0)
    inputs = torch.cat((ctx_rep, flat), dim=1)[:, :-1]
    ref_logp = reference.log_probs_from(inputs, C - 1).float()  # [B*K, H, V]: only the generated positions
    if settings.partial_credit == 0:
        ref_prob = None
    elif credit_reference is None or credit_reference is reference:
        ref_prob = ref_logp.gather(-1, flat[..., None]).squeeze(-1).exp().view(B, K, H)
    else:
        ref_prob = credit_reference.token_probs(ctx_rep, flat).view(B, K, H)
    hits = (ro.samples == truth[:, None, :]).float()
    rewards = match_rewards(hits, ref_prob, settings.exact_match_reward, settings.partial_credit)
    credited = prefix_credit(hits) if settings.credit == Credit.PREFIX else None
    if credited is not None:
        rewards = rewards * credited
    if settings.advantage == Advantage.LOG_REWARD:
        advantages = mean_normalised_advantages(rewards, credited)
    else:
        advantages = group_advantages(rewards, settings.min_variance, credited)
    return Scored(inputs, ref_logp, hits, rewards, advantages, credited)


def grpo_micro_step(policy: nn.Module, old_policy: nn.Module, reference: KLReference, ctx: Tensor,
                    truth: Tensor, settings: GRPOSettings, kl_coef: float | Tensor,
                    generator: torch.Generator | None = None, credit_reference: CreditReference | None = None,
                    graphs: GraphedDecoding | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """One GRPO micro-batch: returns (loss, metrics); the caller runs backward and the optimizer.

    loss = -mean_{b,k,h} min(rho A, clip(rho) A) - entropy_coef * mean H(pi) + kl_coef * mean KL(pi || ref)
    where rho compares the student's and old policy's tempered probabilities of the sampled tokens,
    and H and KL use the student's untempered next-token distribution pi at the H generated positions.
    `reference` gives the KL target and, unless `credit_reference` is given (e.g. an HFReference),
    the partial credit too. Old policy and references run without gradient. Metrics are detached
    device tensors: reward_mean, reward_std (within-group population std, averaged), exact_match,
    reward_true_share (share of the reward mass paid to true tokens), policy_loss, kl, entropy,
    ratio_mean, ratio_max, clip_frac, and with CREDIT=prefix credited (the share of sampled tokens that
    earn reward).
    """
    B = ctx.size(0)
    K, H, T = settings.k_samples, settings.horizon, settings.temperature
    ro = rollout(old_policy, ctx, K, H, T, generator, graphs)
    scored = score_rollout(ro, ctx, truth, reference, settings, credit_reference)
    flat = ro.samples.view(B * K, H)
    # The K samples of a context share it: run each context once and only the samples per row.
    # [B*K, H, V], the same as policy(scored.inputs)[:, C-1:]
    logits = policy(flat[:, :-1], prefix=ctx).float()
    new_logp = F.log_softmax(logits / T, dim=-1).gather(-1, flat[..., None]).view(B, K, H)
    policy_loss, stats = ppo_clip_loss(new_logp, ro.old_logp, scored.advantages, settings.clip_ratio)
    ent, kl = entropy_and_kl(F.log_softmax(logits, dim=-1), scored.ref_logp)  # untempered, [B*K, H, V]
    loss = grpo_loss(policy_loss, ent, kl, settings.entropy_coef, kl_coef)
    if scored.credited is not None:
        stats["credited"] = scored.credited.mean()
    return loss, {**reward_metrics(scored.rewards, scored.hits, policy_loss, ent, kl), **stats}


def reward_metrics(rewards: Tensor, hits: Tensor, policy_loss: Tensor, entropy: Tensor, kl: Tensor | None
                   ) -> dict[str, Tensor]:
    """The detached metrics of both rollout kinds; rewards and hits (1 where an action is the true token) have
    the group on dim 1. reward_std is the within-group population std, averaged; reward_true_share the share
    of the reward mass paid to true tokens; kl is left out when no reference was scored."""
    metrics = {
        "reward_mean": rewards.mean(),
        "reward_std": rewards.std(dim=1, correction=0).mean(),
        "exact_match": hits.mean(),
        "reward_true_share": (rewards * hits).sum() / rewards.sum().clamp_min(1e-12),
        "policy_loss": policy_loss.detach(),
        "entropy": entropy.detach(),
    }
    if kl is not None:
        metrics["kl"] = kl.detach()
    return metrics
