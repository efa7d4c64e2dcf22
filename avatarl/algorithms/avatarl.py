"""AvataRL: the student learns by policy gradient from rewards set by a frozen referee and the truth.

Notation per position: V vocabulary, y the true next token, eps = LABEL_SMOOTHING, c = ENTROPY_COEF and
pi = softmax(z / (1 + c)) the student's policy over the whole vocabulary (z its logits).

    actions  = top-k(student) ∪ top-k(referee) ∪ {y}                  (ACTION_SET=topk: de-duplicated, masked)
             = every valid id of the vocabulary                        (ACTION_SET=full)
    reality  = 1 - eps on y, eps spread evenly over the other actions
    mentor   = softmax(referee logits) restricted to the actions, renormalised
    ideal    ∝ reality^REALITY_WEIGHT · mentor^MENTOR_WEIGHT           (over the actions)
    reward   = REWARD_SCALE · ideal on above-mean actions, else 0; clamped per position
    loss     = -Σ_a log pi(a) · reward(a) / D,   D = Σ_a reward(a) (REWARD_NORM=rewards) or |A| (actions)

The rewards are constants (no gradient reaches the referee), so with R = Σ_a reward(a) and q = reward / R
a position's gradient in the logits is (R / D) · (pi - q) / (1 + c): the gradient of the soft-label
cross-entropy -Σ_a q(a) log pi(a), weighted R / D. This exhaustive form is soft-target training whose
target holds the truth (reality puts 1 - eps on y; REALITY_WEIGHT=0 makes it referee-only). With
REWARD_NORM=rewards every position weighs 1, and REWARD_SCALE and MAX_REWARD_CLAMP cancel (each rescales
a position's rewards by one factor): q is the ideal on the above-mean actions, renormalised.
REWARD_NORM=actions, upstream avataRL's 1 / |A|, weighs a position R / |A|: less where the student's and
the referee's top-k differ, the positions still to learn: 0.089 bits/byte behind supervised training on a
2,048-id BPE, against 0.006 with REWARD_NORM=rewards (3 seeds each, docs/learning.md).

ACTION_SET=sampled is the on-policy form: K = ceil(SAMPLE_FRACTION x valid ids) distinct actions per
position drawn from pi (log_reward.gumbel_top_k), each rewarded r(a) = ideal(a) if a is above the mean
of the ideal taken over the whole vocabulary, else 0 (`drawn_rewards`), advantages from the group
of K (`sampled_advantages`) and loss = -Σ_k A_k log pi(a_k). Only the drawn actions' rewards reach the
loss; REWARD_SCALE, MAX_REWARD_CLAMP and REWARD_NORM do not apply. Its default advantage (importance)
makes the expected gradient the exhaustive form's over every id (BPE 2,048: 0.066 bits/byte behind
supervised); the mean baseline climbs E_pi[ideal], whose maximum puts all the policy's mass on the
ideal's mode, and collapses (docs/learning.md).

Every action set takes the student's log-softmax over the whole vocabulary and then gathers the actions
(upstream avataRL's PR #43, which fixed a softmax taken over the actions alone); ACTION_SET=full and
sampled cost [positions, vocab] tensors instead of [positions, 2k+1]. Ids at or above the tokenizer's
size (the padding of a BPE vocabulary to a multiple of 64, whose logits are PAD_LOGIT) are never
actions: they get no reward and no probability. `referee_loss` below is the one supervised loss of the
product: it trains the referee, never the student.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatarl.algorithms.entropy import entropy_of_log_probs, kl_divergence
from avatarl.algorithms.log_reward import (
    draws_for,
    gumbel_top_k,
    importance_advantages,
    log_reward_advantages,
)
from avatarl.config_schema import ActionSet, RewardNorm, SampledAdvantage
from avatarl.config_sections import AvatarlSettings

# Ties with the mean (e.g. a uniform ideal) must not count as "above" because of rounding.
_ABOVE_MEAN_RTOL = 1e-6
# Logits per chunk of the `kl` and `entropy` metrics: 2**25 fp32 values are 128 MiB and a few such
# temporaries are alive at once, whatever N, where whole [16·1024, 50k] fp32 tensors are 3.3 GB each.
KL_CHUNK_ELEMENTS = 2**25


def action_set(student_logits: Tensor, referee_logits: Tensor, targets: Tensor,
               top_k: int, valid_vocab: int = 0) -> tuple[Tensor, Tensor]:
    """Candidate actions per position: student top-k ∪ referee top-k ∪ {true token}.

    Args: student_logits, referee_logits [N, V]; targets [N] (long, below valid_vocab); top_k (clipped
    to the valid ids); valid_vocab: ids 0 .. valid_vocab - 1 are the tokenizer's (0 = all V).
    Returns (actions [N, A] long, mask [N, A] bool), A = 2·min(top_k, valid) + 1. Each row holds its
    distinct valid tokens first, in ascending token order, with mask True; the remaining slots repeat
    tokens of the row (so they are valid indices to gather with) and have mask False. The true
    token appears exactly once among the valid slots; a padding id is never valid.

    Method: concatenate the 2k+1 candidates, sort each row, mark a slot valid when it differs
    from its left neighbour, then sort again by (invalid, token) to move the valid slots first.
    """
    vocab = student_logits.size(-1)
    valid = valid_vocab or vocab
    k = min(top_k, valid)
    candidates = torch.cat([
        student_logits.detach().topk(k, dim=-1).indices,
        referee_logits.detach().topk(k, dim=-1).indices,
        targets.long().unsqueeze(-1),
    ], dim=-1)
    ordered = candidates.sort(dim=-1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first &= ordered < valid  # a padding id (logit PAD_LOGIT) could only enter through a tie at the bottom
    key = torch.where(first, ordered, ordered + vocab).sort(dim=-1).values
    return key % vocab, key < vocab


def full_action_set(positions: int, vocab: int, valid_vocab: int = 0,
                    device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """ACTION_SET=full: every id at every position, (actions [N, V], mask [N, V]) with mask True on the
    valid ids 0 .. valid_vocab - 1 (0 = all). Both are broadcast views of one row: no [N, V] memory."""
    ids = torch.arange(vocab, device=device)
    return ids.expand(positions, vocab), (ids < (valid_vocab or vocab)).expand(positions, vocab)


def reality_distribution(actions: Tensor, mask: Tensor, targets: Tensor, label_smoothing: float) -> Tensor:
    """Smoothed ground truth over the action set, [N, A].

    reality(a) = 1 - eps if a = y;  eps / (|A| - 1) for the other valid actions;  0 on padding.
    A set that holds only y gives it 1.
    """
    is_true = (actions == targets.unsqueeze(-1)) & mask
    n_other = mask.sum(-1, keepdim=True) - 1
    other = label_smoothing / n_other.clamp(min=1).to(torch.float32)
    true = torch.where(n_other > 0, 1.0 - label_smoothing, 1.0).to(torch.float32)
    return torch.where(is_true, true, torch.where(mask, other, 0.0))


def mentor_distribution(referee_logits: Tensor, actions: Tensor, mask: Tensor) -> Tensor:
    """Referee opinion over the action set, [N, A].

    mentor(a) = p(a) / Σ_{b ∈ A} p(b) with p = softmax(referee_logits) over the full vocabulary:
    the softmax is taken first, then restricted to the valid actions and renormalised (computed
    as a log-softmax so that tiny probabilities do not underflow before renormalising).
    """
    logp = F.log_softmax(referee_logits.detach().float(), dim=-1).gather(-1, actions)
    logp = logp.masked_fill(~mask, float("-inf"))
    return torch.softmax(logp, dim=-1)


def _weighted_log(p: Tensor, weight: float) -> Tensor:
    """weight · log p with 0^0 = 1 (a zero weight ignores the factor, even where p = 0)."""
    if weight == 0:
        return torch.zeros_like(p)
    return weight * p.clamp_min(torch.finfo(p.dtype).tiny).log()


def ideal_distribution(reality: Tensor, mentor: Tensor, mask: Tensor, reality_weight: float,
                       mentor_weight: float) -> Tensor:
    """ideal(a) = reality(a)^rw · mentor(a)^mw / Σ_{b ∈ A} reality(b)^rw · mentor(b)^mw, [N, A].

    Computed in log space; 0^0 = 1, so rw = 0 gives the mentor and mw = 0 the reality. Zero
    probabilities are floored at the dtype's smallest normal number, so that a row can never be
    all zero (the result there is below any float32 resolution of the other entries).
    """
    score = _weighted_log(reality.float(), reality_weight) + _weighted_log(mentor.float(), mentor_weight)
    return torch.softmax(score.masked_fill(~mask, float("-inf")), dim=-1)


def action_rewards(ideal: Tensor, mask: Tensor, reward_scale: float, max_reward_clamp: float) -> Tensor:
    """Per-action rewards, [N, A], without gradient.

    r(a) = scale · ideal(a) if a is valid and ideal(a) > mean_{b ∈ A} ideal(b), else 0
    (a tie with the mean within float rounding is not "above"). Then per position, if
    max_a r(a) > clamp, every r(a) of the position is multiplied by clamp / max_a r(a).
    """
    ideal = ideal.detach().float()
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    mean = (ideal * mask).sum(-1, keepdim=True) / count
    above = mask & (ideal > mean * (1 + _ABOVE_MEAN_RTOL))
    rewards = torch.where(above, reward_scale * ideal, 0.0)
    top = rewards.amax(-1, keepdim=True)
    factor = torch.where(top > max_reward_clamp, max_reward_clamp / top.clamp_min(1e-30), 1.0)
    return rewards * factor


def policy_gradient_loss(student_logits: Tensor, actions: Tensor, mask: Tensor, rewards: Tensor,
                         entropy_coef: float, norm: RewardNorm = RewardNorm.REWARDS) -> Tensor:
    """loss = mean_positions [ -Σ_{a ∈ A} log softmax(z / (1 + c))[a] · r(a) / D ].

    z: student logits [N, V]; c = ENTROPY_COEF (a softer policy, which rewards entropy); r: rewards
    [N, A], treated as constants (detached); D per position: Σ_a r(a) for norm=rewards (1 where
    nothing is paid, so such a position adds 0), |A| for norm=actions.
    """
    logp = F.log_softmax(student_logits.float() / (1.0 + entropy_coef), dim=-1).gather(-1, actions)
    paid = rewards.detach() * mask
    weighted = (logp * paid).sum(-1)
    if norm == RewardNorm.REWARDS:
        total = paid.sum(-1)
        divisor = torch.where(total > 0, total, 1.0)
    else:
        divisor = mask.sum(-1).clamp(min=1)
    return -(weighted / divisor).mean()


def avatarl_loss(student_logits: Tensor, referee_logits: Tensor, targets: Tensor, settings: AvatarlSettings,
                 entropy_coef: float, valid_vocab: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The AvataRL loss of N scored positions, a pure function: (loss, actions, mask, rewards).

    student_logits [N, V] (with gradient), referee_logits [N, V], targets [N]; the actions are
    ACTION_SET's (top-k union or every valid id), then reality, mentor, ideal and rewards as in the
    module docstring, and `policy_gradient_loss`. valid_vocab: the tokenizer's ids (0 = all V).
    """
    with torch.no_grad():
        ref = referee_logits.detach().float()
        if settings.action_set == ActionSet.FULL:
            actions, mask = full_action_set(targets.numel(), student_logits.size(-1), valid_vocab,
                                            student_logits.device)
        else:
            actions, mask = action_set(student_logits, ref, targets, settings.top_k, valid_vocab)
        reality = reality_distribution(actions, mask, targets, settings.label_smoothing)
        mentor = mentor_distribution(ref, actions, mask)
        del ref
        ideal = ideal_distribution(reality, mentor, mask, settings.reality_weight, settings.mentor_weight)
        rewards = action_rewards(ideal, mask, settings.reward_scale, settings.max_reward_clamp)
    loss = policy_gradient_loss(student_logits, actions, mask, rewards, entropy_coef, settings.reward_norm)
    return loss, actions, mask, rewards


def drawn_rewards(referee_logits: Tensor, targets: Tensor, actions: Tensor, settings: AvatarlSettings,
                  valid_vocab: int = 0) -> Tensor:
    """AvataRL's reward of the drawn ids, [N, K], for sampled actions: the ideal over the whole vocabulary
    (every valid id an action: reality 1 - eps on y and eps / (valid - 1) on each other id) at each drawn
    id above its mean 1 / valid, 0 elsewhere and on padding; unscaled and unclamped. No gradient.

    The same numbers as ACTION_SET=full's ideal and above-mean test, from one [N, valid] score
    (rw log reality + mw log mentor, the mentor a log-softmax over the valid ids) and its logsumexp,
    instead of the [N, V] reality, mentor, ideal and reward tensors that the full set builds.
    """
    valid = valid_vocab or referee_logits.size(-1)
    floor = math.log(torch.finfo(torch.float32).tiny)  # _weighted_log's floor of a zero probability
    score = F.log_softmax(referee_logits[:, :valid].detach().float(), dim=-1)
    if settings.mentor_weight == 0:
        score.zero_()
    else:
        score.clamp_(min=floor).mul_(settings.mentor_weight)
    if settings.reality_weight != 0:
        eps = settings.label_smoothing if valid > 1 else 0.0
        log_true = max(math.log(1.0 - eps) if eps < 1 else floor, floor)
        log_other = max(math.log(eps / (valid - 1)) if eps > 0 else floor, floor) if valid > 1 else 0.0
        score.add_(settings.reality_weight * log_other)
        lift = torch.full_like(score[:, :1], settings.reality_weight * (log_true - log_other))
        score.scatter_add_(-1, targets.long()[:, None], lift)
    log_z = torch.logsumexp(score, dim=-1, keepdim=True)
    ideal = (score.gather(-1, actions.clamp(max=valid - 1)) - log_z).exp()
    above = (actions < valid) & (ideal > (1 + _ABOVE_MEAN_RTOL) / valid)
    return torch.where(above, ideal, 0.0)


def vocabulary_rewards(referee_logits: Tensor, targets: Tensor, settings: AvatarlSettings,
                       valid_vocab: int = 0) -> Tensor:
    """`drawn_rewards` of every id, [N, V] (padding ids 0)."""
    ids = torch.arange(referee_logits.size(-1), device=referee_logits.device)
    return drawn_rewards(referee_logits, targets, ids.expand(targets.numel(), -1), settings, valid_vocab)


def sampled_advantages(logp_actions: Tensor, rewards: Tensor, kappa: Tensor, kind: SampledAdvantage
                       ) -> Tensor:
    """Advantages [N, K] of each position's K draws without replacement, from their log-probs [N, K],
    rewards [N, K] (>= 0) and Gumbel threshold kappa [N, 1] (log_reward.gumbel_top_k). With q(a) the
    inclusion probability of a draw (log_reward.inclusion_probability):

    importance: A_k = r_k / q(a_k), the Horvitz-Thompson weight of priority sampling: Σ_k A_k grad log
        pi(a_k) is an unbiased estimate of Σ_a r(a) grad log pi(a), the exhaustive gradient over every id
        (exact when K = V). No baseline: in the logits it is Σ_k A_k e_{a_k} - (Σ_k A_k) pi, whose second
        term already centres it; a group baseline estimated from the same draws would bias it.
    log_reward: log_reward.log_reward_advantages, the Horvitz-Thompson estimate of grad log E_pi[r].
    mean: A_k = (r_k - mean_j r_j) / K, the group-mean baseline; its expectation climbs E_pi[r].
    """
    logp_actions, rewards = logp_actions.detach().float(), rewards.detach().float()
    if kind == SampledAdvantage.LOG_REWARD:
        return log_reward_advantages(logp_actions, rewards, kappa)
    if kind == SampledAdvantage.MEAN:
        return (rewards - rewards.mean(dim=1, keepdim=True)) / rewards.size(1)
    return importance_advantages(logp_actions, rewards, kappa)


def sampled_avatarl_loss(student_logits: Tensor, referee_logits: Tensor, targets: Tensor,
                         settings: AvatarlSettings, entropy_coef: float, valid_vocab: int = 0,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ACTION_SET=sampled (module docstring): (loss, actions [N, K], mask [N, K] all True, rewards [N, K]).

    K = ceil(SAMPLE_FRACTION x valid ids) distinct draws per position from pi = softmax(z / (1 + c)), each
    rewarded with `drawn_rewards`; loss = -mean_positions Σ_k A_k log pi(a_k) with
    A from `sampled_advantages`.
    """
    valid = valid_vocab or student_logits.size(-1)
    logp = F.log_softmax(student_logits.float() / (1.0 + entropy_coef), dim=-1)
    with torch.no_grad():
        draws = draws_for(valid, 1, settings.sample_fraction)
        actions, kappa = gumbel_top_k(logp[:, :valid], draws, generator)
        rewards = drawn_rewards(referee_logits, targets, actions, settings, valid_vocab)
    logp_actions = logp.gather(-1, actions)
    advantage = sampled_advantages(logp_actions, rewards, kappa, settings.sampled_advantage)  # detached
    loss = -(advantage * logp_actions).sum(-1).mean()
    return loss, actions, torch.ones_like(actions, dtype=torch.bool), rewards


def avatarl_micro_step(student: nn.Module, referee: nn.Module, x: Tensor, y: Tensor,
                       settings: AvatarlSettings, entropy_coef: float, valid_vocab: int = 0
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """One AvataRL forward on a micro-batch: returns (loss to backpropagate, on-device metrics).

    x, y: [B, T] contexts and their next tokens; every one of the B·T positions is scored. The
    referee must be in eval mode and return logits over the student's (padded) vocabulary; it runs
    under no_grad. valid_vocab: the tokenizer's ids (0 = all). Metrics (0-dim tensors):
    reward_mean / reward_max / reward_min over the valid actions, action_set_size (mean valid
    actions per position), true_top_frac (positions where the true token has the largest,
    positive reward), reward_true_share (the share of all reward paid to the true token), entropy
    (mean entropy of the student's softmax at temperature 1, nats), kl (both from kl_and_entropy).
    """
    assert not referee.training, "the referee must be in eval mode"
    logits = student(x)
    with torch.no_grad():
        referee_logits = referee(x)
    vocab = logits.size(-1)
    flat = logits.reshape(-1, vocab)
    targets = y.reshape(-1)
    loss_of = sampled_avatarl_loss if settings.action_set == ActionSet.SAMPLED else avatarl_loss
    loss, actions, mask, rewards = loss_of(flat, referee_logits.reshape(-1, vocab), targets, settings,
                                           entropy_coef, valid_vocab)
    kl, student_entropy = kl_and_entropy(flat.detach(), referee_logits.reshape(-1, vocab))
    del referee_logits  # [B, T, V]: not needed past the rewards, so not held through the backward
    with torch.no_grad():
        metrics = {**_metrics(actions, mask, targets, rewards), "entropy": student_entropy, "kl": kl}
    return loss, metrics


def _metrics(actions: Tensor, mask: Tensor, targets: Tensor, rewards: Tensor) -> dict[str, Tensor]:
    # Masked reductions rather than boolean indexing: no host-device synchronisation.
    count = mask.sum().clamp(min=1)
    top = rewards.masked_fill(~mask, float("-inf")).amax(-1)
    true_reward = (rewards * ((actions == targets.unsqueeze(-1)) & mask)).sum(-1)
    return {
        "reward_mean": (rewards * mask).sum() / count,
        "reward_max": top.max(),
        "reward_min": rewards.masked_fill(~mask, float("inf")).amin(),
        "action_set_size": mask.sum(-1).float().mean(),
        "true_top_frac": ((true_reward >= top) & (top > 0)).float().mean(),
        "reward_true_share": true_reward.sum() / (rewards * mask).sum().clamp_min(1e-12),
    }


@torch.no_grad()
def kl_and_entropy(student_logits: Tensor, referee_logits: Tensor,
                   max_chunk_elements: int = KL_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """KL(student || referee) = sum_v p_v (log p_v - log q_v) over the full vocabulary, and the student's
    entropy -sum_v p_v log p_v (entropy.py), each the mean over the positions of [N, V] logits, in nats:
    how far the student is from its reference (GRPO's `kl`) and how spread its policy is.

    Health metrics, so no gradient; the rows go through in chunks of at most max_chunk_elements logits
    (at least one row), so the fp32 temporaries stay a few chunks in size instead of several [N, V]
    tensors. Each row's values are its own, so the chunking does not change them.
    """
    rows, vocab = student_logits.shape
    per_row = torch.empty(2, rows, dtype=torch.float32, device=student_logits.device)
    step = max(1, max_chunk_elements // max(vocab, 1))
    for start in range(0, rows, step):
        logp = F.log_softmax(student_logits[start:start + step].float(), dim=-1)
        logq = F.log_softmax(referee_logits[start:start + step].float(), dim=-1)
        p = logp.exp()
        per_row[1, start:start + step] = entropy_of_log_probs(logp, p)
        # In place (logp and p are consumed): the out-of-place temporaries raised this metric's extra peak
        # RSS from 517 to 678 MiB at N=2048, V=50,257.
        per_row[0, start:start + step] = kl_divergence(logp, logq, p, in_place=True)
    kl, student_entropy = per_row.mean(-1)
    return kl, student_entropy


def referee_loss(referee_logits: Tensor, y: Tensor) -> Tensor:
    """Next-token cross-entropy, mean over positions: -mean log softmax(logits)[y].

    The ONLY supervised loss of the product. `avatarl train-referee` uses it to train the
    referee; it is never applied to the student.
    """
    return F.cross_entropy(referee_logits.reshape(-1, referee_logits.size(-1)).float(), y.reshape(-1))
