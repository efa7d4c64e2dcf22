"""AvataRL math: action sets, the reality/mentor/ideal distributions, rewards, the loss and its gradient."""

import math

import pytest
import torch
from torch import nn

from avatarl.algorithms.avatarl import (
    action_rewards,
    action_set,
    avatarl_micro_step,
    drawn_rewards,
    full_action_set,
    ideal_distribution,
    kl_and_entropy,
    mentor_distribution,
    policy_gradient_loss,
    reality_distribution,
    referee_loss,
    sampled_advantages,
    sampled_avatarl_loss,
    vocabulary_rewards,
)
from avatarl.algorithms.log_reward import gumbel_top_k
from avatarl.config import Config, ConfigError
from avatarl.config_schema import RewardNorm, SampledAdvantage
from avatarl.data.tokenizers import CharTokenizer
from avatarl.referee import check_referee_compatible

LN2 = math.log(2.0)


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def valid_rows(actions, mask):
    return [actions[i][mask[i]].tolist() for i in range(actions.size(0))]


# ---------------------------------------------------------------- action set

def test_action_set_dedups_overlapping_and_disjoint_sets():
    student = t([[0, 5, 4, 1, 2, 3],    # top-2 {1, 2}
                 [0, 0, 9, 8, 1, 2],    # top-2 {2, 3}
                 [0, 1, 2, 3, 9, 8]])   # top-2 {4, 5}
    referee = t([[5, 4, 0, 1, 2, 3],    # top-2 {0, 1}: overlaps the student on 1
                 [9, 8, 0, 1, 2, 3],    # top-2 {0, 1}: disjoint
                 [0, 1, 2, 3, 8, 9]])   # top-2 {5, 4}: identical to the student's
    targets = t([1, 5, 4], torch.long)  # inside both / outside both / inside both
    actions, mask = action_set(student, referee, targets, top_k=2)
    assert actions.shape == mask.shape == (3, 5)
    assert actions.dtype == torch.long and mask.dtype == torch.bool
    assert valid_rows(actions, mask) == [[0, 1, 2], [0, 1, 2, 3, 5], [4, 5]]
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5, [True] * 2 + [False] * 3]
    assert ((actions >= 0) & (actions < 6)).all()  # padding slots are still gatherable


def test_action_set_true_token_exactly_once_and_outside_top_k():
    student = t([[3, 2, 1, 0, -1, -2, -3, -4]])
    referee = t([[3, 2, 1, 0, -1, -2, -3, -4]])
    for target, expected in ((7, [0, 7]), (0, [0])):
        actions, mask = action_set(student, referee, t([target], torch.long), top_k=1)
        assert actions.shape == (1, 3)
        assert valid_rows(actions, mask) == [expected]
        assert int(((actions == target) & mask).sum()) == 1


def test_action_set_top_k_larger_than_vocab_is_clipped():
    logits = torch.randn(4, 5)
    actions, mask = action_set(logits, logits, t([0, 1, 2, 3], torch.long), top_k=9)
    assert actions.shape == (4, 11)
    assert valid_rows(actions, mask) == [[0, 1, 2, 3, 4]] * 4


# ---------------------------------------------------------------- distributions

def test_reality_spreads_smoothing_over_other_valid_actions():
    actions = t([[0, 1, 2, 1, 1], [3, 3, 3, 3, 3], [2, 4, 2, 2, 2]], torch.long)
    mask = t([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], torch.bool)
    reality = reality_distribution(actions, mask, t([1, 3, 2], torch.long), label_smoothing=0.1)
    torch.testing.assert_close(reality, t([[0.05, 0.9, 0.05, 0, 0], [1, 0, 0, 0, 0], [0.9, 0.1, 0, 0, 0]]))
    no_smoothing = reality_distribution(actions, mask, t([1, 3, 2], torch.long), label_smoothing=0.0)
    torch.testing.assert_close(no_smoothing, t([[0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]))


def test_mentor_is_referee_softmax_renormalised_over_valid_actions():
    referee = torch.log(t([[0.1, 0.2, 0.3, 0.4]])) + 5.0  # the softmax ignores the shift
    mentor = mentor_distribution(referee, t([[1, 3, 1]], torch.long), t([[1, 1, 0]], torch.bool))
    torch.testing.assert_close(mentor, t([[1 / 3, 2 / 3, 0]]))


def test_mentor_survives_probabilities_that_underflow():
    referee = t([[0.0, -200.0, -300.0]])  # softmax gives exactly 0 in float32 for tokens 1, 2
    mentor = mentor_distribution(referee, t([[1, 2]], torch.long), t([[1, 1]], torch.bool))
    torch.testing.assert_close(mentor, t([[1.0, 0.0]]))


def test_ideal_is_weighted_geometric_product():
    reality, mentor, mask = t([[0.9, 0.1, 0]]), t([[0.2, 0.8, 0]]), t([[1, 1, 0]], torch.bool)
    torch.testing.assert_close(ideal_distribution(reality, mentor, mask, 1.0, 1.0),
                               t([[0.18 / 0.26, 0.08 / 0.26, 0]]))
    # sqrt(0.18) : sqrt(0.08) = 3 : 2
    torch.testing.assert_close(ideal_distribution(reality, mentor, mask, 0.5, 0.5), t([[0.6, 0.4, 0]]))


def test_ideal_zero_weights_select_one_source():
    mask = t([[1, 1, 1, 0]], torch.bool)
    reality, mentor = t([[1.0, 0.0, 0.0, 0]]), t([[0.0, 0.25, 0.75, 0]])  # zeros on both sides: 0^0 = 1
    torch.testing.assert_close(ideal_distribution(reality, mentor, mask, 0.0, 1.0), mentor)
    half = math.sqrt(0.75) / (0.5 + math.sqrt(0.75))  # mentor^0.5, renormalised
    tempered = t([[0, 1 - half, half, 0]])
    torch.testing.assert_close(ideal_distribution(reality, mentor, mask, 0.0, 0.5), tempered)
    torch.testing.assert_close(ideal_distribution(reality, mentor, mask, 0.7, 0.0), reality)
    uniform = t([[1 / 3, 1 / 3, 1 / 3, 0]])
    torch.testing.assert_close(ideal_distribution(reality, mentor, mask, 0.0, 0.0), uniform)


# ---------------------------------------------------------------- rewards

def test_rewards_above_mean_only_and_masked():
    ideal = t([[0.4, 0.35, 0.25, 0.9]])  # the masked 0.9 must neither count in the mean nor be rewarded
    mask = t([[1, 1, 1, 0]], torch.bool)
    torch.testing.assert_close(action_rewards(ideal, mask, 1.0, 10.0), t([[0.4, 0.35, 0, 0]]))


def test_rewards_clamp_scales_the_whole_row():
    ideal, mask = t([[0.4, 0.35, 0.25], [0.5, 0.3, 0.2]]), t([[1, 1, 1], [1, 1, 1]], torch.bool)
    # row 0: [4, 3.5, 0] has max 4 > 2, scaled by 1/2; row 1: [5, 0, 0] -> [2, 0, 0]
    torch.testing.assert_close(action_rewards(ideal, mask, 10.0, 2.0), t([[2.0, 1.75, 0], [2.0, 0, 0]]))
    # below the clamp nothing changes
    torch.testing.assert_close(action_rewards(ideal, mask, 1.0, 2.0), t([[0.4, 0.35, 0], [0.5, 0, 0]]))


def test_rewards_uniform_ideal_gets_nothing_and_carry_no_grad():
    ideal = torch.full((2, 3), 1 / 3, requires_grad=True)
    rewards = action_rewards(ideal, torch.ones(2, 3, dtype=torch.bool), 100.0, 1.5)
    assert not rewards.requires_grad and rewards.grad_fn is None
    assert rewards.abs().sum() == 0


# ---------------------------------------------------------------- loss

def test_policy_gradient_loss_by_hand():
    logits = torch.log(t([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    actions = t([[0, 1, 2], [2, 0, 1]], torch.long)
    mask = t([[1, 1, 0], [1, 1, 1]], torch.bool)
    rewards = t([[1.5, 0.5, 9.0], [1.0, 0, 0]])
    # row 0: (1.5 ln2 + 0.5 · 2 ln2) / 2 = 1.25 ln2;  row 1: 2 ln2 / 3
    expected = (1.25 * LN2 + 2 * LN2 / 3) / 2
    loss = policy_gradient_loss(logits, actions, mask, rewards, entropy_coef=0.0, norm=RewardNorm.ACTIONS)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the entropy coefficient divides the logits by 1 + c
    softened = policy_gradient_loss(2 * logits, actions, mask, rewards, entropy_coef=1.0,
                                    norm=RewardNorm.ACTIONS)
    assert softened.item() == pytest.approx(expected, rel=1e-6)


def test_policy_gradient_loss_divided_by_the_rewards_by_hand():
    logits = torch.log(t([[0.5, 0.25, 0.25]] * 3))
    actions = t([[0, 1, 2], [2, 0, 1], [0, 1, 2]], torch.long)
    mask = t([[1, 1, 0], [1, 1, 1], [1, 1, 1]], torch.bool)
    rewards = t([[1.5, 0.5, 9.0], [1.0, 0, 0], [0, 0, 0]])
    # row 0: (1.5 ln2 + 0.5 · 2 ln2) / 2 = 1.25 ln2;  row 1: 2 ln2 / 1;  row 2 is paid nothing: 0
    expected = (1.25 * LN2 + 2 * LN2 + 0.0) / 3
    loss = policy_gradient_loss(logits, actions, mask, rewards, 0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # a position's rewards scaled by any factor (REWARD_SCALE, the clamp) leave this loss unchanged
    scaled = rewards * t([[7.0], [0.01], [3.0]])
    loss = policy_gradient_loss(logits, actions, mask, scaled, 0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("norm", list(RewardNorm))
def test_exhaustive_gradient_is_a_soft_label_cross_entropy_gradient(norm):
    """grad = Σ_i w_i grad CE(q_i, pi_i) with q = r / Σ r and w = Σ r / D: 1 for norm=rewards, Σ r / |A|
    for norm=actions."""
    torch.manual_seed(4)
    n, vocab = 6, 9
    logits = torch.randn(n, vocab, requires_grad=True)
    actions, mask = action_set(logits, torch.randn(n, vocab), torch.randint(0, vocab, (n,)), top_k=3)
    rewards = torch.rand(n, actions.size(1)) * mask
    (grad,) = torch.autograd.grad(policy_gradient_loss(logits, actions, mask, rewards, 0.0, norm), logits)
    q = torch.zeros(n, vocab).scatter_add_(1, actions, rewards)
    total = q.sum(-1)
    weight = torch.ones(n) if norm == RewardNorm.REWARDS else total / mask.sum(-1)
    soft_ce = -(weight * ((q / total[:, None]) * torch.log_softmax(logits, -1)).sum(-1)).mean()
    (expected,) = torch.autograd.grad(soft_ce, logits)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    # and in closed form: (w / n) · (pi - q)
    closed = (weight[:, None] / n) * (torch.softmax(logits.detach(), -1) - q / total[:, None])
    torch.testing.assert_close(grad, closed, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- sampled actions (on-policy)

def test_vocabulary_rewards_by_hand_and_padding_gets_nothing():
    referee = torch.log(t([[0.5, 0.25, 0.2, 0.05, 1.0]]))  # id 4 is padding: it must not enter the mentor
    cfg = Config.of(label_smoothing=0.3, reality_weight=1.0, mentor_weight=1.0)
    rewards = vocabulary_rewards(referee, t([0], torch.long), cfg.avatarl, valid_vocab=4)
    # reality [0.7, 0.1, 0.1, 0.1] x mentor [0.5, 0.25, 0.2, 0.05] = [0.35, 0.025, 0.02, 0.005], over 0.4;
    # the mean ideal is 1/4: only id 0 is above it
    torch.testing.assert_close(rewards, t([[0.35 / 0.4, 0.0, 0.0, 0.0, 0.0]]))
    flat = Config.of(label_smoothing=0.9, reality_weight=1.0, mentor_weight=1.0).avatarl
    # reality [0.1, 0.3, 0.3, 0.3] x mentor = [0.05, 0.075, 0.06, 0.015], over 0.2: ids 1 and 2 pass 1/4
    torch.testing.assert_close(vocabulary_rewards(referee, t([0], torch.long), flat, valid_vocab=4),
                               t([[0.0, 0.375, 0.3, 0.0, 0.0]]))


@pytest.mark.parametrize(("eps", "rw", "mw"), [(0.1, 1.0, 1.0), (0.0, 1.0, 1.0), (0.5, 2.0, 0.5),
                                               (0.1, 0.0, 1.0), (0.1, 1.0, 0.0), (1.0, 1.0, 1.0)])
def test_drawn_rewards_are_the_full_action_sets_ideal_and_reward_at_the_drawn_ids(eps, rw, mw):
    """The sampled form's rewards from one score tensor match ACTION_SET=full's reality, mentor, ideal and
    above-mean rewards over every valid id, gathered at the draws; padding ids (>= valid) get 0."""
    n, vocab, valid = 16, 11, 9
    generator = torch.Generator().manual_seed(7)
    referee = 3 * torch.randn(n, vocab, generator=generator)
    targets = torch.randint(0, valid, (n,), generator=generator)
    settings = Config.of(label_smoothing=eps, reality_weight=rw, mentor_weight=mw).avatarl
    actions, mask = full_action_set(n, vocab, valid)
    ideal = ideal_distribution(reality_distribution(actions, mask, targets, eps),
                               mentor_distribution(referee, actions, mask), mask, rw, mw)
    full = action_rewards(ideal, mask, 1.0, math.inf)
    close = {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(vocabulary_rewards(referee, targets, settings, valid), full, **close)
    drawn = torch.randint(0, vocab, (n, 4), generator=generator)
    torch.testing.assert_close(drawn_rewards(referee, targets, drawn, settings, valid),
                               full.gather(-1, drawn), **close)
    assert bool((full[:, valid:] == 0).all()) and int((full > 0).sum()) >= n


def test_sampled_advantages_by_hand():
    logp, rewards = torch.log(t([[0.5, 0.25]])), t([[0.8, 0.1]])
    kappa = torch.log(t([[0.25]]))
    # inclusion q = 1 - exp(-pi / exp(kappa)): 1 - e^-2 and 1 - e^-1
    q = [1 - math.exp(-2), 1 - math.exp(-1)]
    paid = [0.5 / q[0] * 0.8, 0.25 / q[1] * 0.1]  # log_reward: A = w r / Σ w r with w = pi / q
    expected = t([[paid[0] / sum(paid), paid[1] / sum(paid)]])
    advantage = sampled_advantages(logp, rewards, kappa, SampledAdvantage.LOG_REWARD)
    torch.testing.assert_close(advantage, expected)
    # importance: A = r / q
    advantage = sampled_advantages(logp, rewards, kappa, SampledAdvantage.IMPORTANCE)
    torch.testing.assert_close(advantage, t([[0.8 / q[0], 0.1 / q[1]]]))
    # mean: (r - mean r) / K with mean 0.3 over the 3 draws
    three = t([[0.6, 0.2, 0.1]])
    advantage = sampled_advantages(torch.log(t([[0.2, 0.3, 0.5]])), three, kappa, SampledAdvantage.MEAN)
    torch.testing.assert_close(advantage, t([[0.1, -0.1 / 3, -0.2 / 3]]))


@pytest.mark.parametrize("kind", ["importance", "log_reward"])
def test_sampled_loss_with_every_id_drawn_is_exact(kind):
    """SAMPLE_FRACTION=1: K = all valid ids, inclusion probability 1, so the estimates are exact: importance
    gives the gradient of -Σ_a r(a) log pi(a) (the exhaustive form's over every id), log_reward that of
    -log Σ_a pi(a) r(a). Padding ids are never drawn."""
    torch.manual_seed(5)
    n, vocab, valid = 8, 7, 5
    logits = torch.randn(n, vocab).masked_fill(torch.arange(vocab) >= valid, -1e4).requires_grad_(True)
    referee, targets = torch.randn(n, vocab), torch.randint(0, valid, (n,))
    cfg = Config.of(action_set="sampled", sample_fraction=1.0, sampled_advantage=kind, label_smoothing=0.5)
    loss, actions, mask, rewards = sampled_avatarl_loss(logits, referee, targets, cfg.avatarl, 0.0, valid,
                                                        torch.Generator().manual_seed(0))
    assert actions.shape == (n, valid) and bool(mask.all())
    assert actions.sort(-1).values.tolist() == [list(range(valid))] * n  # every valid id once, no padding
    every = vocabulary_rewards(referee, targets, cfg.avatarl, valid)
    torch.testing.assert_close(rewards, every.gather(-1, actions))
    assert int((every > 0).sum()) > n  # some positions reward more than one id
    (grad,) = torch.autograd.grad(loss, logits)
    logp = torch.log_softmax(logits, -1)
    if kind == "importance":
        exact = -(every * logp).sum(-1).mean()
    else:
        exact = -torch.log((logp.exp() * every).sum(-1)).mean()
    (expected,) = torch.autograd.grad(exact, logits)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_importance_advantages_are_unbiased_for_the_exhaustive_gradient():
    """K = 2 of 5 ids: the mean over many draws of Σ_k A_k grad log pi(a_k), in the logits Σ_k A_k (e_a - pi),
    approaches Σ_a r(a) (e_a - pi)."""
    logits = t([[1.0, 0.5, 0.0, -0.5, -1.0]])
    rewards = t([[0.0, 0.6, 0.0, 0.3, 0.0]])
    pi = torch.softmax(logits, -1)
    generator = torch.Generator().manual_seed(3)
    total, draws = torch.zeros(5), 20000
    for _ in range(draws):
        actions, kappa = gumbel_top_k(torch.log_softmax(logits, -1), 2, generator)
        advantage = sampled_advantages(pi.log().gather(-1, actions), rewards.gather(-1, actions), kappa,
                                       SampledAdvantage.IMPORTANCE)
        total += (advantage[0, :, None] * (torch.nn.functional.one_hot(actions[0], 5) - pi)).sum(0)
    expected = rewards[0] - rewards.sum() * pi[0]  # [-0.386, 0.366, -0.142, 0.214, -0.052]
    torch.testing.assert_close(total / draws, expected, atol=0.01, rtol=0.0)


def test_sampled_loss_mean_baseline_draws_a_share_of_the_vocabulary():
    torch.manual_seed(6)
    n, vocab = 4, 10
    logits, referee = torch.randn(n, vocab, requires_grad=True), torch.randn(n, vocab)
    targets = torch.arange(n)
    cfg = Config.of(action_set="sampled", sample_fraction=0.25, sampled_advantage="mean")
    loss, actions, _, rewards = sampled_avatarl_loss(logits, referee, targets, cfg.avatarl, 0.01, 0,
                                                     torch.Generator().manual_seed(1))
    assert actions.shape == (n, 3)  # ceil(0.25 x 10)
    assert all(len(set(row)) == 3 for row in actions.tolist())  # without replacement
    logp = torch.log_softmax(logits.detach() / 1.01, -1).gather(-1, actions)
    advantage = (rewards - rewards.mean(-1, keepdim=True)) / 3
    assert loss.item() == pytest.approx(-(advantage * logp).sum(-1).mean().item(), rel=1e-5)


def test_micro_step_with_sampled_actions_logs_the_metrics_of_its_draws():
    vocab = 8
    student, referee = Bigram(vocab, seed=1), Bigram(vocab, seed=2).eval()
    cfg = Config.of(action_set="sampled", sample_fraction=0.5)
    torch.manual_seed(7)
    x, y = torch.randint(0, vocab, (2, 5)), torch.randint(0, vocab, (2, 5))
    loss, m = avatarl_micro_step(student, referee, x, y, cfg.avatarl, cfg.grpo.entropy_coef)
    loss.backward()
    assert all(p.grad is None for p in referee.parameters()) and student.emb.weight.grad.abs().sum() > 0
    assert m["action_set_size"].item() == 4.0  # ceil(0.5 x 8) draws per position
    assert 0 <= m["reward_min"].item() <= m["reward_mean"].item() < m["reward_max"].item() <= 1.0
    assert set(m) == {"reward_mean", "reward_max", "reward_min", "action_set_size", "true_top_frac",
                      "reward_true_share", "entropy", "kl"}


def test_sample_settings_without_sampled_actions_are_refused():
    with pytest.raises(ConfigError) as err:
        Config.of(sample_fraction=0.25)
    assert err.value.problems == ["SAMPLE_FRACTION=0.25 applies to sampled actions: set ACTION_SET=sampled, "
                                  "or leave SAMPLE_FRACTION at 0.5."]
    assert Config.of(action_set="sampled", sampled_advantage="mean").avatarl.sampled_advantage == "mean"


def test_referee_loss_is_cross_entropy():
    logits = torch.zeros(2, 3, 4)
    logits[0, 0, 1] = math.log(3.0)  # p(1) = 3/6 at that position
    y = torch.tensor([[1, 0, 0], [2, 3, 1]])
    expected = (math.log(2.0) + 5 * math.log(4.0)) / 6
    assert referee_loss(logits, y).item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- micro step

class Table(nn.Module):
    """Logits that depend only on the position: easy to compute by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, idx):
        return self.table.expand(idx.size(0), -1, -1)


class Bigram(nn.Module):
    def __init__(self, vocab, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, vocab)

    def forward(self, idx):
        return self.emb(idx)


def test_micro_step_by_hand_referee_only():
    student = Table(t([[1, 2, 0, -1], [0, 0, 1, 2]]))              # top-1: token 1, token 3
    referee = Table(torch.log(t([[0.6, 0.1, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]]))).eval()
    cfg = Config.of(top_k=1, label_smoothing=0.1, reality_weight=0.0, mentor_weight=1.0, reward_scale=100.0,
                 max_reward_clamp=1.5, entropy_coef=0.0)
    x, y = torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 2]])
    loss, m = avatarl_micro_step(student, referee, x, y, cfg.avatarl, cfg.grpo.entropy_coef)
    # position 0: actions {0, 1}, mentor [6/7, 1/7] -> rewards [1.5, 0] (85.7 clamped)
    # position 1: actions {2, 3}, mentor [1/8, 7/8] -> rewards [0, 1.5]: the true token 2 is not top
    logp = torch.log_softmax(student.table.detach(), -1)
    # REWARD_NORM=rewards divides each position by its 1.5 paid; actions (upstream's) by its 2 actions
    assert loss.item() == pytest.approx(-(logp[0, 0] + logp[1, 3]).item() / 2, rel=1e-6)
    upstream, _ = avatarl_micro_step(student, referee, x, y, cfg.replace(reward_norm="actions").avatarl, 0.0)
    expected = -(1.5 * logp[0, 0] / 2 + 1.5 * logp[1, 3] / 2) / 2
    assert upstream.item() == pytest.approx(expected.item(), rel=1e-6)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    kl = (logp.exp() * (logp - torch.log_softmax(referee.table.detach(), -1))).sum(-1).mean()
    # reward_true_share: 1.5 of the 3.0 paid goes to a true token (position 0's)
    assert {k: round(v.item(), 5) for k, v in m.items()} == {
        "reward_mean": 0.75, "reward_max": 1.5, "reward_min": 0.0, "action_set_size": 2.0,
        "true_top_frac": 0.5, "reward_true_share": 0.5, "entropy": round(entropy.item(), 5),
        "kl": round(kl.item(), 5)}


def test_kl_and_entropy_in_row_chunks_equal_the_whole_and_keep_no_graph():
    torch.manual_seed(0)
    student = torch.randn(7, 11, requires_grad=True)
    referee = torch.randn(7, 11, dtype=torch.bfloat16)
    whole = torch.nn.functional.kl_div(torch.log_softmax(referee.float(), -1),
                                       torch.log_softmax(student.float(), -1), reduction="batchmean",
                                       log_target=True)
    whole_entropy = -(student.softmax(-1) * student.log_softmax(-1)).sum(-1).mean()
    for chunk_elements in (11, 3 * 11, 4 * 11 + 5, 1, 10**9):  # one row, rows that do not divide 7, one chunk
        kl, student_entropy = kl_and_entropy(student, referee, max_chunk_elements=chunk_elements)
        assert torch.allclose(kl, whole, rtol=1e-6, atol=1e-7), chunk_elements
        assert torch.allclose(student_entropy, whole_entropy, rtol=1e-6, atol=1e-7), chunk_elements
        assert not kl.requires_grad and not student_entropy.requires_grad
    assert whole.item() > 0.1


def loop_reference(student_logits, referee_logits, targets, cfg):
    """Straightforward per-position implementation, plain Python floats for the reward.

    Returns ([(sorted actions, {action: reward})] per position, loss)."""
    rows, terms = [], []
    for z, r, y in zip(student_logits, referee_logits, targets.tolist(), strict=True):
        k = min(cfg.avatarl.top_k, z.numel())
        by_student = sorted(range(z.numel()), key=lambda i: -z[i].item())[:k]
        by_referee = sorted(range(r.numel()), key=lambda i: -r[i].item())[:k]
        acts = sorted(set(by_student) | set(by_referee) | {y})
        eps = cfg.avatarl.label_smoothing
        reality = {a: (1 - eps if len(acts) > 1 else 1.0) if a == y else eps / (len(acts) - 1) for a in acts}
        p = torch.softmax(r.double(), -1)
        mentor = {a: p[a].item() / sum(p[b].item() for b in acts) for a in acts}
        score = {a: reality[a] ** cfg.avatarl.reality_weight * mentor[a] ** cfg.avatarl.mentor_weight
                 for a in acts}
        ideal = {a: score[a] / sum(score.values()) for a in acts}
        mean = sum(ideal.values()) / len(acts)
        reward = {a: cfg.avatarl.reward_scale * ideal[a] if ideal[a] > mean else 0.0 for a in acts}
        top = max(reward.values())
        if top > cfg.avatarl.max_reward_clamp:
            reward = {a: v * cfg.avatarl.max_reward_clamp / top for a, v in reward.items()}
        logp = torch.log_softmax(z / (1 + cfg.grpo.entropy_coef), -1)
        paid = sum(reward.values())
        divisor = len(acts) if cfg.avatarl.reward_norm == RewardNorm.ACTIONS else (paid if paid > 0 else 1.0)
        terms.append(-sum(logp[a] * reward[a] for a in acts) / divisor)
        rows.append((acts, reward))
    return rows, torch.stack(terms).mean()


@pytest.mark.parametrize("top_k,rw,mw", [(1, 0.7, 0.3), (2, 0.0, 1.0), (3, 1.0, 0.0), (5, 0.7, 0.3)])
def test_vectorised_matches_loop_reference(top_k, rw, mw):
    torch.manual_seed(top_k)
    n, vocab = 200, 8
    student, referee = 2 * torch.randn(n, vocab), 2 * torch.randn(n, vocab)
    targets = torch.randint(0, vocab, (n,))
    cfg = Config.of(top_k=top_k, reality_weight=rw, mentor_weight=mw)
    actions, mask = action_set(student, referee, targets, top_k)
    reality = reality_distribution(actions, mask, targets, cfg.avatarl.label_smoothing)
    ideal = ideal_distribution(reality, mentor_distribution(referee, actions, mask), mask, rw, mw)
    rewards = action_rewards(ideal, mask, cfg.avatarl.reward_scale, cfg.avatarl.max_reward_clamp)
    rows, _ = loop_reference(student, referee, targets, cfg)
    for i, (acts, reward) in enumerate(rows):
        assert valid_rows(actions[i:i + 1], mask[i:i + 1])[0] == acts
        assert rewards[i][mask[i]].tolist() == pytest.approx([reward[a] for a in acts], rel=1e-4, abs=1e-6)
        assert rewards[i][~mask[i]].abs().sum() == 0


@pytest.mark.parametrize("norm", ["rewards", "actions"])
def test_student_gradient_is_the_policy_gradient_and_referee_gets_none(norm):
    vocab = 7
    student, referee = Bigram(vocab, seed=1), Bigram(vocab, seed=2).eval()
    cfg = Config.of(top_k=2, entropy_coef=0.05, reward_norm=norm)
    torch.manual_seed(3)
    x, y = torch.randint(0, vocab, (3, 5)), torch.randint(0, vocab, (3, 5))
    loss, _ = avatarl_micro_step(student, referee, x, y, cfg.avatarl, cfg.grpo.entropy_coef)
    loss.backward()
    assert all(p.grad is None for p in referee.parameters())
    grad = student.emb.weight.grad.clone()

    student.zero_grad()
    z = student(x).reshape(-1, vocab)
    _, reference_loss = loop_reference(z, referee(x).detach().reshape(-1, vocab), y.reshape(-1), cfg)
    assert reference_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    reference_loss.backward()
    torch.testing.assert_close(grad, student.emb.weight.grad, rtol=1e-4, atol=1e-6)

    # and it is not the cross-entropy gradient
    student.zero_grad()
    nn.functional.cross_entropy(student(x).reshape(-1, vocab), y.reshape(-1)).backward()
    assert not torch.allclose(grad, student.emb.weight.grad, atol=1e-3)


def test_micro_step_requires_eval_referee():
    model = Bigram(5, seed=0)
    with pytest.raises(AssertionError, match="eval"):
        avatarl_micro_step(model, Bigram(5, seed=1), torch.zeros(1, 2, dtype=torch.long),
                           torch.zeros(1, 2, dtype=torch.long), Config().avatarl, 0.0)


# ---------------------------------------------------------------- referee compatibility

VOCAB = list("\n !abc")


def test_compatible_referee_passes():
    check_referee_compatible({"vocab_chars": VOCAB, "context_len": 64}, CharTokenizer(VOCAB), 32)
    check_referee_compatible({"vocab_chars": VOCAB, "context_len": 32}, CharTokenizer(VOCAB), 32)


@pytest.mark.parametrize("meta,match", [
    ({"vocab_chars": VOCAB + ["d"], "context_len": 32}, r"vocabulary differs \(7 vs 6 symbols\)"),
    ({"vocab_chars": list("\n !abd"), "context_len": 32}, r"token 5 is 'd' vs 'c'"),
    ({"vocab_chars": VOCAB, "context_len": 16}, r"context length too short.*CONTEXT_LEN=16.*CONTEXT_LEN=32"),
    ({"context_len": 32}, r"lacks vocab_chars"),
])
def test_incompatible_referee_raises(meta, match):
    with pytest.raises(ValueError, match=match):
        check_referee_compatible(meta, CharTokenizer(VOCAB), 32)
