"""AvataRL: the student learns by policy gradient from rewards set by a frozen referee.

At every position of the context window (no sampling) the student is scored on a small set
of candidate next tokens. Notation per position: V vocabulary, A = 2k+1 action slots,
y the true next token, eps = LABEL_SMOOTHING.

    actions  = top-k(student) ∪ top-k(referee) ∪ {y}                  (ACTION_SET=topk: de-duplicated, masked)
             = every valid id of the vocabulary                        (ACTION_SET=full)
    reality  = 1 - eps on y, eps spread evenly over the other actions
    mentor   = softmax(referee logits) restricted to the actions, renormalised
    ideal    ∝ reality^REALITY_WEIGHT · mentor^MENTOR_WEIGHT           (over the actions)
    reward   = REWARD_SCALE · ideal on above-mean actions, else 0; clamped per position
    loss     = -Σ_a log softmax(logits / (1 + ENTROPY_COEF))[a] · reward[a] / |A|

The rewards are constants: no gradient reaches the referee, and the student never receives a
cross-entropy gradient. It is, however, close to reward-weighted soft-target training, since
the ground truth is inside the reward (reality puts 1 - eps on it); REALITY_WEIGHT=0 makes the
reward referee-only.

Both action sets take the student's log-softmax over the whole vocabulary and then gather the actions
(upstream avataRL's PR #43, which fixed a softmax taken over the actions alone); with ACTION_SET=full
every id can earn a reward, at the cost of [positions, vocab] tensors instead of [positions, 2k+1].
Ids at or above the tokenizer's size (the padding of a BPE vocabulary to a multiple of 64, whose logits
are PAD_LOGIT) are never actions: they get no reward and no probability. `referee_loss` below is the
one supervised loss of the product: it trains the referee, never the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatarl.algorithms.entropy import entropy_of_log_probs, kl_divergence
from avatarl.config_schema import ActionSet
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
                         entropy_coef: float) -> Tensor:
    """loss = mean_positions [ -Σ_{a ∈ A} log softmax(z / (1 + c))[a] · r(a) / |A| ].

    z: student logits [N, V]; c = ENTROPY_COEF (a softer policy, which rewards entropy);
    r: rewards [N, A], treated as constants (detached).
    """
    logp = F.log_softmax(student_logits.float() / (1.0 + entropy_coef), dim=-1).gather(-1, actions)
    weighted = (logp * rewards.detach() * mask).sum(-1)
    return -(weighted / mask.sum(-1).clamp(min=1)).mean()


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
    loss = policy_gradient_loss(student_logits, actions, mask, rewards, entropy_coef)
    return loss, actions, mask, rewards


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
    loss, actions, mask, rewards = avatarl_loss(flat, referee_logits.reshape(-1, vocab), targets, settings,
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
