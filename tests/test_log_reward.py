"""The log E[reward] advantages (avatarl/algorithms/log_reward.py) against hand computations: draws without
replacement are distinct and their Horvitz-Thompson weights unbiased; a hit gives the likelihood gradient,
a miss the policy's expected likelihood gradient given that the truth was not drawn."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from avatarl.algorithms.log_reward import (
    draws_for,
    gumbel_top_k,
    importance_advantages,
    inclusion_probability,
    log_reward_advantages,
    mean_normalised_advantages,
)


def test_draws_without_replacement_are_distinct_and_their_weights_estimate_expectations_without_bias():
    logp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]), -1).expand(20000, -1)
    f = torch.tensor([0.3, 5.0, -1.0, 2.0, 7.0, 11.0])  # any function of the action
    actions, kappa = gumbel_top_k(logp, 2, torch.Generator().manual_seed(0))
    assert actions.shape == (20000, 2) and bool((actions[:, 0] != actions[:, 1]).all())
    lp = logp.gather(-1, actions)
    weights = lp.exp() / inclusion_probability(lp, kappa)
    estimate = (weights * f[actions]).sum(1).mean()
    exact = (logp[0].exp() * f).sum()
    assert float(estimate) == pytest.approx(float(exact), rel=0.03)


def test_the_whole_vocabulary_drawn_has_no_threshold_and_weights_one():
    logp = torch.log_softmax(torch.randn(3, 4), -1)
    actions, kappa = gumbel_top_k(logp, 4)
    assert bool(torch.isinf(kappa).all()) and sorted(actions[0].tolist()) == [0, 1, 2, 3]
    assert torch.allclose(inclusion_probability(logp.gather(-1, actions), kappa), torch.ones(3, 4))


def likelihood_gradient_of_the_estimate(logits, actions, rewards, kappa):
    logits = logits.clone().requires_grad_(True)
    logp = F.log_softmax(logits, -1)
    lp = logp.gather(-1, actions)
    advantages = log_reward_advantages(lp, rewards, kappa)
    (advantages * lp).sum().backward()
    return logits.grad


def test_a_draw_that_hits_the_truth_gives_the_likelihood_gradient():
    torch.manual_seed(0)
    logits = torch.randn(5, 7)
    truth = torch.tensor([1, 4, 0, 6, 2])
    actions, kappa = gumbel_top_k(F.log_softmax(logits, -1), 7)  # every id drawn: every row hits
    rewards = (actions == truth[:, None]).float()
    got = likelihood_gradient_of_the_estimate(logits, actions, rewards, kappa)
    want = torch.autograd.functional.jacobian(
        lambda z: F.log_softmax(z, -1).gather(-1, truth[:, None]).sum(), logits)
    assert torch.allclose(got, want, atol=1e-5)


def test_a_miss_gives_the_expected_likelihood_gradient_over_the_ids_not_drawn():
    logits = torch.tensor([[1.5, 0.2, -0.3, 0.9, -1.0]])
    actions, kappa = torch.tensor([[0, 3]]), torch.tensor([[0.4]])
    got = likelihood_gradient_of_the_estimate(logits, actions, torch.zeros(1, 2), kappa)
    p = logits.softmax(-1)[0]
    outside = [1, 2, 4]
    want = sum(p[b] / p[outside].sum() * (F.one_hot(torch.tensor(b), 5).float() - p) for b in outside)
    assert torch.allclose(got[0], want, atol=1e-6)


@pytest.mark.parametrize("without_replacement", [True, False])
def test_importance_advantages_estimate_the_likelihood_gradient_without_bias(without_replacement):
    """Σ_k A_k grad_z log pi(a_k) = Σ_k A_k (e_a_k - pi) averages to e_truth - pi, whether or not the truth
    was drawn in a row: the exact-match reward over the drawn ids, divided by their chance of being drawn."""
    rows, truth = 40000, 4
    logp = torch.log_softmax(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]), -1).expand(rows, -1)
    generator = torch.Generator().manual_seed(0)
    if without_replacement:
        actions, kappa = gumbel_top_k(logp, 2, generator)
    else:
        actions = torch.multinomial(logp.exp(), 2, replacement=True, generator=generator)
        kappa = None
    advantages = importance_advantages(logp.gather(-1, actions), (actions == truth).float(), kappa)
    p = logp[0].exp()
    estimate = (advantages[..., None] * (F.one_hot(actions, 6).float() - p)).sum(1).mean(0)
    want = F.one_hot(torch.tensor(truth), 6).float() - p
    assert torch.allclose(estimate, want, atol=0.05), (estimate, want)
    assert float((actions == truth).any(1).float().mean()) < 0.3  # most rows missed the truth


def test_independent_draws_divide_by_the_group_mean():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    got = log_reward_advantages(torch.zeros(2, 4), rewards, None)
    assert got.tolist() == [[1.0, -1.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("vocab, k_samples, k_fraction, want", [(2048, 4, 0.25, 512), (65, 4, 0.25, 17),
                                                               (65, 4, 0.0, 4), (10, 4, 1.0, 10)])
def test_k_follows_the_vocabulary_when_a_fraction_is_set(vocab, k_samples, k_fraction, want):
    assert draws_for(vocab, k_samples, k_fraction) == want == min(vocab, want)
    assert want == (math.ceil(k_fraction * vocab) if k_fraction else k_samples)


class FixedLogits(torch.nn.Module):
    """A policy whose logits at every position are one learnable row per input token."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(3)))

    def forward(self, idx):
        return self.table[idx]


def test_the_teacher_forced_step_with_every_id_drawn_takes_the_likelihood_gradient():
    from avatarl.algorithms.teacher_forced import teacher_forced_micro_step
    from avatarl.config_sections import GRPOSettings

    vocab, window = 6, torch.tensor([[0, 3, 5, 1, 2, 4, 4, 0]])
    settings = GRPOSettings(rollouts="teacher_forced", sampling="without_replacement", advantage="log_reward",
                            temperature=1.0, entropy_coef=0.0, beta_kl=0.0, partial_credit=0.0)
    policy = FixedLogits(vocab)
    loss, metrics = teacher_forced_micro_step(policy, None, window, settings, 0.0, k=vocab)
    (got,) = torch.autograd.grad(loss, policy.table)
    ce = F.cross_entropy(policy(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
    (want,) = torch.autograd.grad(ce, policy.table)
    assert float(metrics["truth_drawn"]) == 1.0
    assert torch.allclose(got, want, atol=1e-6)
    off = GRPOSettings(**{**settings.__dict__, "exact_match_reward": 0.0})
    loss_off, metrics_off = teacher_forced_micro_step(policy, None, window, off, 0.0, k=2)
    assert float(metrics_off["reward_mean"]) == 0.0 and float(metrics_off["truth_drawn"]) <= 1.0
    (pushed,) = torch.autograd.grad(loss_off, policy.table)
    # the reward-off ablation still moves the policy: away from its draws
    assert float(pushed.abs().sum()) > 0


def test_train_local_trains_the_log_reward_method_with_and_without_a_gpu():
    from avatarl.config_sources import preset_settings
    from tests.helpers import REPO

    method = preset_settings("grpo-log-reward")
    cpu_small = preset_settings("cpu-small")
    assert {name: cpu_small.get(name) for name in method} == method
    recipe = (REPO / "Makefile").read_text().split("train-local:")[1].split("\n\n")[0]
    assert "--preset grpo-log-reward" in recipe and "--preset cpu-small" in recipe


def test_mean_normalised_advantages_by_hand_and_with_a_mask():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    # mean 1/2: A = 2r - 1; a group without reward gets 0
    assert torch.equal(mean_normalised_advantages(rewards), torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.0] * 4]))
    assert torch.equal(log_reward_advantages(rewards, rewards, None), mean_normalised_advantages(rewards))
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # first group {1, 0}: mean 1/2 -> 1, -1, and 0 for the draws outside it
    expected = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0] * 4])
    assert torch.equal(mean_normalised_advantages(rewards, mask), expected)


def test_draws_are_the_k_largest_perturbed_keys_and_kappa_the_next():
    logp = torch.log_softmax(torch.randn(64, 50), -1)
    actions, kappa = gumbel_top_k(logp, 12, torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)  # the same noise again
    keys = logp - torch.log(-torch.log(torch.rand(logp.shape, generator=generator).clamp_min(1e-20)))
    ranked = keys.sort(dim=-1, descending=True)
    assert torch.equal(actions.sort(-1).values, ranked.indices[:, :12].sort(-1).values)
    assert torch.equal(kappa, ranked.values[:, 12:13])
