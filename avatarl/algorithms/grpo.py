"""Group Relative Policy Optimisation (GRPO) for a char-level student, as in the seed.

Per micro-batch of B contexts of C chars with their true continuations of H chars:

1. the frozen old policy samples K continuations of H chars per context at temperature T;
2. each generated char earns r = 1[char == true char] + partial_credit * p_ref(char | preceding chars);
3. advantages normalise r within each group of K samples, separately at every horizon position;
4. the student's tempered log-probs of the sampled chars enter PPO's clipped surrogate;
5. the loss adds -entropy_coef * entropy and +kl_coef * KL(student || reference).

No cross-entropy against the data ever reaches the student: the true text only enters through
the exact-match reward. Shapes: B contexts, K samples each, C context chars, H horizon chars, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatarl.algorithms.entropy import entropy_of_log_probs
from avatarl.config_sections import GRPOSettings
from avatarl.cuda_graphs import GraphedDecoding
from avatarl.model import KVCache


class CreditReference(Protocol):
    def token_probs(self, ctx: Tensor, samples: Tensor) -> Tensor: ...


class KLReference(CreditReference, Protocol):
    def log_probs_from(self, history: Tensor, first: int) -> Tensor: ...


@dataclass
class Rollout:
    samples: Tensor   # [B, K, H] int64, sampled chars
    old_logp: Tensor  # [B, K, H] float32, log-prob of each under the tempered old policy


def repeat_cache_rows(cache: KVCache, repeats: int) -> None:
    """Row b of the cache becomes rows b*repeats .. b*repeats + repeats - 1 (keys/values are [L, B, T, H, D])."""
    cache.k = cache.k.repeat_interleave(repeats, dim=1)
    cache.v = cache.v.repeat_interleave(repeats, dim=1)
    cache.batch_size *= repeats


def draw_tempered(logits: Tensor, temperature: float, generator: torch.Generator | None = None
                  ) -> tuple[Tensor, Tensor]:
    """One char per row from pi_T = softmax(logits / T): (token [N, 1], log pi_T(token) [N, 1]).

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
    """Sample K continuations of `horizon` chars per context in one batched, KV-cached pass.

    Each context is prefilled once (the K samples share it), then its cache and last logits are
    repeated to [B*K] rows (row b*K + j is sample j of context b) and decoded one char per step.
    Each char x_h is drawn from pi_T = softmax(logits / T) by `draw_tempered`, and old_logp scores it:
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


def token_rewards(samples: Tensor, truth: Tensor, ref_prob: Tensor, partial_credit: float,
                  exact_match: float = 1.0) -> Tensor:
    """r[b,k,h] = exact_match * 1[samples[b,k,h] == truth[b,h]] + partial_credit * ref_prob[b,k,h].

    exact_match = partial_credit = 0 switches the reward off (the ablation that isolates what the KL
    term alone teaches).

    samples [B, K, H], truth [B, H], ref_prob [B, K, H] = p_ref(sampled char | context and sampled prefix).
    """
    return exact_match * (samples == truth[:, None, :]).float() + partial_credit * ref_prob.float()


def group_advantages(rewards: Tensor, min_std: float) -> Tensor:
    """A[b,k,h] = (r[b,k,h] - mean_k r[b,:,h]) / max(std_k r[b,:,h], min_std).

    std is the population standard deviation over the K samples (divide by K, not K - 1), so a
    group of identical rewards has std 0 and advantages 0; the floor keeps near-ties from being
    blown up into +-1 advantages.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, correction=0)
    return (rewards - mean) / std.clamp_min(min_std)


def ppo_clip_loss(new_logp: Tensor, old_logp: Tensor, adv: Tensor, clip_ratio: float
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, averaged over every sampled char.

    rho = exp(new_logp - old_logp); s = min(rho A, clip(rho, 1 - eps, 1 + eps) A); loss = -mean(s).
    stats (detached tensors): ratio_mean, ratio_max, and clip_frac = the fraction of chars where the
    clipped term binds (rho > 1 + eps with A > 0, or rho < 1 - eps with A < 0), i.e. the chars that
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


def kl_to_reference(student_logp: Tensor, ref_logp: Tensor, p: Tensor | None = None) -> Tensor:
    """KL(student || reference) = sum_v p_v (log p_v - log q_v), in nats, per position: [..., V] -> [...].

    Both arguments are full log-distributions over the next char; p = exp(student_logp) when the caller
    already holds it. Terms with p_v = 0 contribute 0.
    """
    p = student_logp.exp() if p is None else p
    return torch.where(p > 0, p * (student_logp - ref_logp), 0.0).sum(dim=-1)


class AdaptiveKLController:
    """The PPO-style proportional controller of the KL weight (Ziegler et al., 2019).

    After n_chars generated chars with measured KL: e = clip(kl / target - 1, -0.2, 0.2) and
    coef <- min(coef * (1 + e * min(n_chars / horizon_chars, 1)), max_coef). The inner min keeps one
    update inside [0.8, 1.2] x coef, so the weight stays positive however long the interval. The cap
    matters when the student cannot reach the target yet (a trigram reference early on): uncapped,
    the weight grew by 1.2x per update to ~1e15 in 1000 iterations of the defaults study. Call it
    once per log interval with a host float, so the training step never waits on the device for it.
    """

    def __init__(self, init_coef: float, target: float, horizon_chars: float, max_coef: float = 100.0):
        if target <= 0 or horizon_chars <= 0 or max_coef <= 0:
            raise ValueError(f"target={target}, horizon_chars={horizon_chars} and max_coef={max_coef} "
                             "must be positive")
        self.coef, self.target, self.horizon_chars = float(init_coef), float(target), float(horizon_chars)
        self.max_coef = float(max_coef)

    @property
    def value(self) -> float:
        return self.coef

    def update(self, kl: float, n_chars: int) -> float:
        """Move coef toward the weight that holds KL at target; a non-finite kl leaves it unchanged."""
        if kl == kl and abs(kl) != float("inf"):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef = min(self.coef * (1.0 + error * min(n_chars / self.horizon_chars, 1.0)), self.max_coef)
        return self.coef

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state["coef"])


def kl_warmup(coef: float, chars_seen: int, kl_warm: int) -> float:
    """coef * min(1, chars_seen / kl_warm): a linear ramp from 0 over the first kl_warm chars (0 = none)."""
    if kl_warm <= 0:
        return coef
    return coef * min(1.0, chars_seen / kl_warm)


@dataclass
class Scored:
    inputs: Tensor      # [B*K, C+H-1] context + samples: position C-1+h predicts sample h
    ref_logp: Tensor    # [B*K, H, V] the KL reference's next-char log-distribution at the generated positions
    rewards: Tensor     # [B, K, H]
    advantages: Tensor  # [B, K, H]


@torch.no_grad()
def score_rollout(ro: Rollout, ctx: Tensor, truth: Tensor, reference: KLReference, settings: GRPOSettings,
                  credit_reference: CreditReference | None = None) -> Scored:
    """Reference log-probs, per-char rewards and group advantages of a rollout (no gradient).

    The partial credit is p_ref(sampled char) from `reference` itself unless `credit_reference` (e.g. a
    Hugging Face LM) is given; PARTIAL_CREDIT=0 skips it.
    """
    B, K, H = ro.samples.shape
    C = ctx.shape[1]
    flat = ro.samples.view(B * K, H)
    ctx_rep = ctx.repeat_interleave(K, dim=0)
    inputs = torch.cat((ctx_rep, flat), dim=1)[:, :-1]
    ref_logp = reference.log_probs_from(inputs, C - 1).float()  # [B*K, H, V]: only the generated positions
    if settings.partial_credit == 0:
        ref_prob = torch.zeros_like(flat, dtype=torch.float32)
    elif credit_reference is None or credit_reference is reference:
        ref_prob = ref_logp.gather(-1, flat[..., None]).squeeze(-1).exp()
    else:
        ref_prob = credit_reference.token_probs(ctx_rep, flat)
    rewards = token_rewards(ro.samples, truth, ref_prob.view(B, K, H), settings.partial_credit,
                            settings.exact_match_reward)
    return Scored(inputs, ref_logp, rewards, group_advantages(rewards, settings.min_variance))


def grpo_micro_step(policy: nn.Module, old_policy: nn.Module, reference: KLReference, ctx: Tensor,
                    truth: Tensor, settings: GRPOSettings, kl_coef: float | Tensor,
                    generator: torch.Generator | None = None, credit_reference: CreditReference | None = None,
                    graphs: GraphedDecoding | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """One GRPO micro-batch: returns (loss, metrics); the caller runs backward and the optimizer.

    loss = -mean_{b,k,h} min(rho A, clip(rho) A) - entropy_coef * mean H(pi) + kl_coef * mean KL(pi || ref)
    where rho compares the student's and old policy's tempered probabilities of the sampled chars,
    and H and KL use the student's untempered next-char distribution pi at the H generated positions.
    `reference` gives the KL target and, unless `credit_reference` is given (e.g. an HFReference),
    the partial credit too. Old policy and references run without gradient. Metrics are detached
    device tensors: reward_mean, reward_std (within-group population std, averaged), exact_match,
    reward_true_share (share of the reward mass paid to true chars), policy_loss, kl, entropy,
    ratio_mean, ratio_max, clip_frac.
    """
    B = ctx.size(0)
    K, H, T = settings.k_samples, settings.horizon, settings.temperature
    ro = rollout(old_policy, ctx, K, H, T, generator, graphs)
    scored = score_rollout(ro, ctx, truth, reference, settings, credit_reference)
    rewards = scored.rewards

    flat = ro.samples.view(B * K, H)
    # The K samples of a context share it: run each context once and only the samples per row.
    logits = policy(flat[:, :-1], prefix=ctx).float()  # [B*K, H, V], the same as policy(scored.inputs)[:, C-1:]
    new_logp = F.log_softmax(logits / T, dim=-1).gather(-1, flat[..., None]).view(B, K, H)
    policy_loss, stats = ppo_clip_loss(new_logp, ro.old_logp, scored.advantages, settings.clip_ratio)
    logp = F.log_softmax(logits, dim=-1)  # [B*K, H, V] and its exp: one copy each for the entropy and the KL
    p = logp.exp()
    ent = entropy_of_log_probs(logp, p).mean()
    kl = kl_to_reference(logp, scored.ref_logp, p).mean()
    loss = policy_loss - settings.entropy_coef * ent + kl_coef * kl

    hits = (ro.samples == truth[:, None, :]).float()
    return loss, {**reward_metrics(rewards, hits, policy_loss, ent, kl), **stats}


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
