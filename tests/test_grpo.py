"""GRPO pieces: hand-computed values for the pure functions, rollout consistency, gradient isolation."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from avatarl.algorithms.entropy import entropy_and_kl, entropy_of_log_probs, kl_divergence
from avatarl.algorithms.grpo import (
    AdaptiveKLController,
    Rollout,
    group_advantages,
    grpo_loss,
    grpo_micro_step,
    kl_warmup,
    match_rewards,
    ppo_clip_loss,
    prefix_credit,
    rollout,
    score_rollout,
)
from avatarl.algorithms.reference import NgramReference
from avatarl.bench.throughput import FullRowsStudent
from avatarl.config import Config, ConfigError
from avatarl.model import GPT, GPTConfig

V = 11


def tiny_gpt(seed: int = 0, block_size: int = 16) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, block_size=block_size, n_layer=2, n_head=2, n_emb=16,
                          use_flash_attn=False))
    with torch.no_grad():  # sharper than the 0.02 init, so distributions are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20.0)
    return model


def small_cfg(**overrides) -> Config:
    base = dict(k_samples=4, horizon=5, temperature=1.3, clip_ratio=0.2, entropy_coef=0.01,
                min_variance=0.1, partial_credit=0.5, context_len=6, n_layer=2, n_head=2, n_emb=16,
                batch=4, micro_batch=4)
    base.update(overrides)
    return Config.of(**base)


# --- rewards and advantages

def hits_of(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """1.0 where samples [B, K, H] hit truth [B, H], as score_rollout marks them."""
    return (samples == truth[:, None, :]).float()


def token_rewards(samples, truth, ref_prob, partial_credit, exact_match=1.0):
    return match_rewards(hits_of(samples, truth), ref_prob, exact_match, partial_credit)


def test_reward_off_is_all_zero():
    samples = torch.tensor([[[1, 2], [1, 1]]])
    truth = torch.tensor([[1, 2]])
    rewards = token_rewards(samples, truth, torch.full((1, 2, 2), 0.3), partial_credit=0.0, exact_match=0.0)
    assert torch.equal(rewards, torch.zeros(1, 2, 2))
    torch.testing.assert_close(token_rewards(samples, truth, None, 0.0, exact_match=2.0),
                               torch.tensor([[[2.0, 2.0], [2.0, 0.0]]]))


def test_match_rewards_hand_values():
    samples = torch.tensor([[[0, 1, 2], [0, 0, 0]]])  # [B=1, K=2, H=3]
    truth = torch.tensor([[0, 1, 1]])
    ref_prob = torch.tensor([[[0.5, 0.25, 0.1], [0.2, 0.2, 0.2]]])
    expected = torch.tensor([[[1.25, 1.125, 0.05], [1.1, 0.1, 0.1]]])
    torch.testing.assert_close(token_rewards(samples, truth, ref_prob, 0.5), expected)
    # Any shape: the teacher-forced [N, K] draws are rewarded by the same function.
    drawn = match_rewards(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.4, 0.2]]), 2.0, 0.5)
    torch.testing.assert_close(drawn, torch.tensor([[2.2, 0.1]]))


def test_group_advantages_population_std_and_floor():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 4, 1)  # mean 0.5, population std 0.5
    torch.testing.assert_close(group_advantages(rewards, 0.1).flatten(), torch.tensor([1.0, -1.0, -1.0, 1.0]))
    near_tie = torch.tensor([1.0, 1.0, 1.0, 1.1]).view(1, 4, 1)  # std 0.0433 < floor 0.1
    torch.testing.assert_close(group_advantages(near_tie, 0.1).flatten(),
                               torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    tie = torch.full((1, 4, 1), 0.7)
    assert torch.equal(group_advantages(tie, 0.1), torch.zeros(1, 4, 1))


def loop_rewards_and_advantages(samples, truth, ref_prob, partial_credit, min_std):
    B, K, H = samples.shape
    rewards = torch.zeros(B, K, H)
    adv = torch.zeros(B, K, H)
    for b in range(B):
        for h in range(H):
            group = []
            for k in range(K):
                matched = 1.0 if samples[b, k, h] == truth[b, h] else 0.0
                r = matched + partial_credit * float(ref_prob[b, k, h])
                rewards[b, k, h] = r
                group.append(r)
            mean = sum(group) / K
            std = math.sqrt(sum((g - mean) ** 2 for g in group) / K)
            for k in range(K):
                adv[b, k, h] = (group[k] - mean) / max(std, min_std)
    return rewards, adv


def test_vectorised_rewards_and_advantages_match_loop():
    gen = torch.Generator().manual_seed(3)
    B, K, H = 5, 4, 7
    samples = torch.randint(0, 3, (B, K, H), generator=gen)  # 3 symbols: many exact matches and ties
    truth = torch.randint(0, 3, (B, H), generator=gen)
    ref_prob = torch.rand(B, K, H, generator=gen)
    ref_prob[0] = 0.3  # a constant-credit context exercises the floor
    for pc in (0.0, 0.7):
        rewards = token_rewards(samples, truth, ref_prob, pc)
        adv = group_advantages(rewards, 0.1)
        loop_r, loop_a = loop_rewards_and_advantages(samples, truth, ref_prob, pc, 0.1)
        torch.testing.assert_close(rewards, loop_r)
        torch.testing.assert_close(adv, loop_a)


# --- PPO surrogate, entropy, KL

def test_ppo_clip_loss_binds_for_both_signs():
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.0])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 2.0])
    new_logp = ratio.log().requires_grad_(True)
    loss, stats = ppo_clip_loss(new_logp, torch.zeros(5), adv, 0.2)
    # surrogates: min(1.5, 1.2)=1.2 (clipped), min(-0.5, -0.8)=-0.8 (clipped), -1.5, 0.5, 2.0
    torch.testing.assert_close(loss, torch.tensor(-(1.2 - 0.8 - 1.5 + 0.5 + 2.0) / 5))
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(0.4))
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(1.0))
    torch.testing.assert_close(stats["ratio_max"], torch.tensor(1.5))
    loss.backward()
    # d loss / d new_logp = -rho A / 5 where unclipped, 0 where the clip binds
    torch.testing.assert_close(new_logp.grad, torch.tensor([0.0, 0.0, 0.3, -0.1, -0.4]))


def test_entropy_hand_values():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = torch.tensor([math.log(2.0), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))])
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(entropy_of_log_probs(logp), expected)
    torch.testing.assert_close(entropy_of_log_probs(logp, logp.exp()), expected)
    assert entropy_of_log_probs(torch.zeros(2, 3, 4)).shape == (2, 3)


def test_kl_divergence_hand_values():
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.25, 0.75]).log()
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)  # 0.143841
    torch.testing.assert_close(kl_divergence(p, q), torch.tensor(expected))
    torch.testing.assert_close(kl_divergence(q, q), torch.tensor(0.0))
    point = torch.tensor([0.0, -math.inf])  # p = (1, 0): the 0 log 0 term is 0
    torch.testing.assert_close(kl_divergence(point, p), torch.tensor(math.log(2.0)))
    assert kl_divergence(point.clone(), p.clone(), in_place=True).item() == pytest.approx(math.log(2.0))
    logits = torch.randn(3, 4, 5)
    torch.testing.assert_close(kl_divergence(F.log_softmax(logits, -1), F.log_softmax(logits, -1)),
                               torch.zeros(3, 4))


def test_the_in_place_kl_equals_the_out_of_place_one_bit_for_bit():
    logp = F.log_softmax(torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 4, -1)
    logq = F.log_softmax(torch.randn(64, 50, generator=torch.Generator().manual_seed(1)), -1)
    out_of_place = kl_divergence(logp, logq)
    scratch = logp.clone()
    assert torch.equal(kl_divergence(scratch, logq, scratch.exp(), in_place=True), out_of_place)
    assert not torch.equal(scratch, logp), "in_place uses its input as scratch"


def test_entropy_and_kl_are_the_means_of_the_per_position_terms():
    logp = F.log_softmax(torch.randn(2, 3, 5, requires_grad=True), -1)
    ref = F.log_softmax(torch.randn(2, 3, 5), -1)
    ent, kl = entropy_and_kl(logp, ref)
    torch.testing.assert_close(ent, entropy_of_log_probs(logp).mean())
    torch.testing.assert_close(kl, kl_divergence(logp, ref).mean())
    assert ent.requires_grad and kl.requires_grad  # both are loss terms of GRPO
    assert entropy_and_kl(logp, None)[1] is None


def test_grpo_loss_adds_the_kl_term_only_with_a_reference():
    policy_loss, ent, kl = torch.tensor(0.5), torch.tensor(2.0), torch.tensor(0.25)
    assert grpo_loss(policy_loss, ent, kl, 0.1, 2.0).item() == pytest.approx(0.5 - 0.2 + 0.5)
    assert grpo_loss(policy_loss, ent, None, 0.1, 2.0).item() == pytest.approx(0.3)


# --- KL weight schedule

def test_adaptive_kl_controller_updates():
    ctl = AdaptiveKLController(0.1, target=0.02, horizon_tokens=1000)
    assert ctl.update(0.04, 500) == pytest.approx(0.1 * 1.1)  # error clipped to +0.2, half a horizon
    assert ctl.update(0.019, 1000) == pytest.approx(0.11 * 0.95)  # error -0.05, a full horizon
    assert ctl.update(0.0, 5000) == pytest.approx(0.1045 * 0.8)  # error -0.2, interval capped at 1 horizon
    before = ctl.value
    assert ctl.update(float("nan"), 1000) == before
    restored = AdaptiveKLController(1.0, target=0.02, horizon_tokens=1000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    capped = AdaptiveKLController(90.0, target=0.02, horizon_tokens=1000, max_coef=100.0)
    assert capped.update(1.0, 1000) == 100.0  # 90 x 1.2 = 108, held at the cap
    assert capped.update(1.0, 1000) == 100.0


def test_kl_warmup_ramp():
    assert kl_warmup(0.1, 0, 50000) == 0.0
    assert kl_warmup(0.1, 25000, 50000) == pytest.approx(0.05)
    assert kl_warmup(0.1, 100000, 50000) == pytest.approx(0.1)
    assert kl_warmup(0.1, 0, 0) == pytest.approx(0.1)


# --- rollout

def test_rollout_shapes_and_old_logp_match_full_recompute():
    model = tiny_gpt()
    ctx = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(0))
    K, H, T = 4, 5, 1.3
    ro = rollout(model, ctx, K, H, T, torch.Generator().manual_seed(1))
    assert ro.samples.shape == (3, K, H) and ro.samples.dtype == torch.long
    assert ro.old_logp.shape == (3, K, H) and not ro.old_logp.requires_grad
    seq = torch.cat((ctx.repeat_interleave(K, 0), ro.samples.view(3 * K, H)), 1)
    with torch.no_grad():
        logits = model(seq[:, :-1])[:, 5:]
    full = F.log_softmax(logits / T, -1).gather(-1, seq[:, 6:, None]).squeeze(-1).view(3, K, H)
    # KV-cached decoding vs one full forward differ only by float32 summation order
    torch.testing.assert_close(ro.old_logp, full, atol=1e-5, rtol=0)
    assert (ro.old_logp < -1e-3).any()  # sharpened model, but not a deterministic one


def test_rollout_is_deterministic_under_a_seeded_generator():
    model = tiny_gpt()
    ctx = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(0))
    a = rollout(model, ctx, 3, 6, 1.0, torch.Generator().manual_seed(7))
    b = rollout(model, ctx, 3, 6, 1.0, torch.Generator().manual_seed(7))
    c = rollout(model, ctx, 3, 6, 1.0, torch.Generator().manual_seed(8))
    assert torch.equal(a.samples, b.samples) and torch.equal(a.old_logp, b.old_logp)
    assert not torch.equal(a.samples, c.samples)


class BigramPolicy(torch.nn.Module):
    """logits depend on the last token only, so the sampling distribution is known exactly."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def new_cache(self, batch_size, max_len=None, dtype=None):
        return None

    def forward(self, idx, cache=None):
        return self.table[idx]


def test_rollout_draws_from_the_tempered_distribution():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, -2.0]])
    policy = BigramPolicy(logits)
    T, n = 1.5, 20000
    ro = rollout(policy, torch.tensor([[0], [1]]), n, 1, T, torch.Generator().manual_seed(0))
    for row, last in enumerate((0, 1)):
        probs = F.softmax(logits[last] / T, -1)
        freq = torch.bincount(ro.samples[row, :, 0], minlength=3).float() / n
        torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)  # ~4 binomial std devs at n=20000
        torch.testing.assert_close(ro.old_logp[row, :, 0], probs.log()[ro.samples[row, :, 0]])


# --- the whole micro-step

class ModelReference:
    """A reference backed by a trainable module: it must still receive no gradient."""

    def __init__(self, model):
        self.model = model

    def log_probs(self, history):
        return F.log_softmax(self.model(history).float(), -1)

    def log_probs_from(self, history, first):
        return self.log_probs(history)[:, first:]

    def token_probs(self, ctx, samples):
        seq = torch.cat((ctx, samples), 1)
        logp = self.log_probs(seq[:, :-1])[:, ctx.size(1) - 1:]
        return logp.gather(-1, samples[..., None]).squeeze(-1).exp()


def micro_step_case(cfg: Config) -> tuple:
    """(student, old policy = its copy, a module-backed reference, contexts [3, C], truths [3, H],
    generator)."""
    policy, ref_model = tiny_gpt(0), tiny_gpt(5)
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, V, (3, cfg.model.context_len), generator=gen)
    truth = torch.randint(0, V, (3, cfg.grpo.horizon), generator=gen)
    return policy, copy.deepcopy(policy), ModelReference(ref_model), ctx, truth, gen


def test_micro_step_backward_reaches_only_the_student():
    cfg = small_cfg()
    policy, old_policy, reference, ctx, truth, gen = micro_step_case(cfg)
    ref_model = reference.model
    loss, metrics = grpo_micro_step(policy, old_policy, reference, ctx, truth, cfg.grpo, kl_coef=0.1,
                                    generator=gen)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in policy.parameters())
    assert sum(float(p.grad.abs().sum()) for p in policy.parameters()) > 0
    assert all(p.grad is None for p in old_policy.parameters())
    assert all(p.grad is None for p in ref_model.parameters())
    assert set(metrics) == {"reward_mean", "reward_std", "exact_match", "reward_true_share", "policy_loss",
                            "kl", "entropy", "ratio_mean", "ratio_max", "clip_frac"}
    assert 0.0 <= float(metrics["reward_true_share"]) <= 1.0
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in metrics.values())
    # student == old policy: the ratio is 1 up to cached-vs-full float error, so nothing is clipped
    assert abs(float(metrics["ratio_mean"]) - 1.0) < 1e-4 and float(metrics["clip_frac"]) == 0.0


def test_micro_step_shares_each_context_without_changing_loss_or_gradients():
    cfg = small_cfg()
    policy, old_policy, reference, ctx, truth, _ = micro_step_case(cfg)
    results = []
    for student in (policy, FullRowsStudent(policy)):
        loss, metrics = grpo_micro_step(student, old_policy, reference, ctx, truth, cfg.grpo, kl_coef=0.1,
                                        generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(loss, list(policy.parameters()))
        results.append((loss, metrics, grads))
    (shared_loss, shared_metrics, shared_grads), (full_loss, full_metrics, full_grads) = results
    torch.testing.assert_close(shared_loss, full_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared_metrics, full_metrics, rtol=1e-5, atol=1e-6)
    assert float(shared_loss.detach()) != 0.0 and float(shared_metrics["kl"]) > 0
    for s, f in zip(shared_grads, full_grads, strict=True):
        torch.testing.assert_close(s, f, rtol=1e-4, atol=1e-4 * float(f.abs().max()))


class ConstantCredit:
    def token_probs(self, ctx, samples):
        return torch.full(samples.shape, 0.25)


def test_micro_step_uses_the_credit_reference_and_ngram_kl():
    cfg = small_cfg(partial_credit=2.0)
    policy = tiny_gpt(0)
    counted = torch.randint(0, V, (500,), generator=torch.Generator().manual_seed(1))
    ngram = NgramReference(2, V, counted, "cpu")
    ctx = torch.randint(0, V, (2, cfg.model.context_len))
    truth = torch.randint(0, V, (2, cfg.grpo.horizon))
    _, m = grpo_micro_step(policy, copy.deepcopy(policy), ngram, ctx, truth, cfg.grpo, kl_coef=0.0,
                           generator=torch.Generator().manual_seed(2), credit_reference=ConstantCredit())
    torch.testing.assert_close(m["reward_mean"], m["exact_match"] + 2.0 * 0.25)
    assert float(m["kl"]) > 0 and float(m["entropy"]) > 0


# --- CREDIT=prefix: a token earns reward only while its sample's prefix is the true one

def test_prefix_credit_stops_after_the_first_miss():
    hits = torch.tensor([[[1., 1., 0., 1.],    # misses at 2: positions 0-2 count, 3 does not
                          [0., 1., 1., 1.],    # misses at 0: only position 0 counts
                          [1., 1., 1., 1.]]])  # never misses: all count
    expected = torch.tensor([[[1., 1., 1., 0.], [1., 0., 0., 0.], [1., 1., 1., 1.]]])
    assert torch.equal(prefix_credit(hits), expected)


def test_masked_group_advantages_compare_only_the_credited_samples():
    rewards = torch.tensor([[[1.0], [0.0], [0.0], [5.0]]])  # [B=1, K=4, H=1]
    mask = torch.tensor([[[1.0], [1.0], [1.0], [0.0]]])     # the 5.0 is not credited
    adv = group_advantages(rewards, 0.1, mask)
    # group {1, 0, 0}: mean 1/3, population std sqrt(2)/3
    std = math.sqrt(2) / 3
    expected = torch.tensor([[[(2 / 3) / std], [-(1 / 3) / std], [-(1 / 3) / std], [0.0]]])
    torch.testing.assert_close(adv, expected)
    # a group of one has nothing to be compared with; an all-ones mask is the unmasked formula
    single = torch.tensor([[[1.0], [0.0], [0.0], [0.0]]])
    assert torch.equal(group_advantages(rewards, 0.1, single), torch.zeros_like(rewards))
    torch.testing.assert_close(group_advantages(rewards, 0.1, torch.ones_like(rewards)),
                               group_advantages(rewards, 0.1))


class UniformReference:
    def log_probs_from(self, history, first):
        return torch.full((history.size(0), history.size(1) - first, V), -math.log(V))


def test_score_rollout_with_prefix_credit_pays_only_the_true_prefix():
    cfg = small_cfg(horizon=3, k_samples=3, partial_credit=0.0, credit="prefix")
    truth = torch.tensor([[4, 5, 6]])
    samples = torch.tensor([[[4, 5, 6],    # all true: paid 1, 1, 1
                             [4, 0, 6],    # misses at 1: paid 1, 0, and position 2 is not credited
                             [0, 5, 6]]])  # misses at 0: paid 0, then nothing credited
    ro = Rollout(samples, torch.zeros(samples.shape))
    scored = score_rollout(ro, torch.zeros(1, cfg.model.context_len, dtype=torch.long), truth,
                           UniformReference(), cfg.grpo)
    assert torch.equal(scored.credited, torch.tensor([[[1., 1., 1.], [1., 1., 0.], [1., 0., 0.]]]))
    assert torch.equal(scored.rewards, torch.tensor([[[1., 1., 1.], [1., 0., 0.], [0., 0., 0.]]]))
    # position 0: group {1, 1, 0}, mean 2/3, std sqrt(2)/3; position 1: group {1, 0}, mean 1/2, std 1/2;
    # position 2: a group of one (sample 0), advantage 0
    s0 = math.sqrt(2) / 3
    expected = torch.tensor([[[(1 / 3) / s0, 1.0, 0.0], [(1 / 3) / s0, -1.0, 0.0],
                              [-(2 / 3) / s0, 0.0, 0.0]]])
    torch.testing.assert_close(scored.advantages, expected)
    seed = small_cfg(horizon=3, k_samples=3, partial_credit=0.0).grpo  # CREDIT=all
    seed_credit = score_rollout(ro, torch.zeros(1, cfg.model.context_len, dtype=torch.long), truth,
                                UniformReference(), seed)
    assert seed_credit.credited is None
    assert float(seed_credit.rewards[0, 2].sum()) == 2.0  # after the miss, 5 and 6 are still paid


def test_log_reward_advantages_of_prefix_groups_give_the_likelihood_gradient_where_a_sample_hit():
    """ADVANTAGE=log_reward with CREDIT=prefix: at each position the group is the samples on the true
    prefix, A = r / mean - 1 there, 0 elsewhere and in a group without a hit."""
    cfg = small_cfg(horizon=3, k_samples=3, partial_credit=0.0, credit="prefix", advantage="log_reward")
    truth = torch.tensor([[4, 5, 6]])
    samples = torch.tensor([[[4, 5, 1], [4, 0, 6], [0, 5, 6]]])
    ro = Rollout(samples, torch.zeros(samples.shape))
    scored = score_rollout(ro, torch.zeros(1, cfg.model.context_len, dtype=torch.long), truth,
                           UniformReference(), cfg.grpo)
    # position 0: rewards {1, 1, 0}, mean 2/3 -> 1/2, 1/2, -1; position 1: group {sample 0, sample 1},
    # rewards {1, 0}, mean 1/2 -> 1, -1; position 2: group {sample 0} without a hit -> 0
    expected = torch.tensor([[[0.5, 1.0, 0.0], [0.5, -1.0, 0.0], [-1.0, 0.0, 0.0]]])
    torch.testing.assert_close(scored.advantages, expected)
    # the K-sample mean of A grad log pi is grad log pi(truth) - mean_k grad log pi(a_k): with a hit, the
    # likelihood's plus a term of expectation 0
    logits = torch.randn(V, requires_grad=True)
    draws = samples[0, :, 0]
    (estimate,) = torch.autograd.grad((scored.advantages[0, :, 0] * F.log_softmax(logits, -1)[draws]).mean(),
                                      logits)
    likelihood = F.log_softmax(logits, -1)[4] - F.log_softmax(logits, -1)[draws].mean()
    (expected_grad,) = torch.autograd.grad(likelihood, logits)
    torch.testing.assert_close(estimate, expected_grad)


def test_autoregressive_rollouts_refuse_only_the_teacher_forced_draw_settings():
    assert Config.of(advantage="log_reward").grpo.advantage == "log_reward"
    with pytest.raises(ConfigError) as err:
        Config.of(sampling="without_replacement")
    assert err.value.problems[0].startswith("SAMPLING=without_replacement applies to teacher-forced draws")
    with pytest.raises(ConfigError) as err:
        Config.of(advantage="importance")
    assert err.value.problems == ["ADVANTAGE=importance applies to teacher-forced draws: set "
                                  "ROLLOUTS=teacher_forced, or ADVANTAGE=group_std or log_reward."]
    assert Config.of(advantage="importance", rollouts="teacher_forced").grpo.advantage == "importance"


def test_micro_step_with_prefix_credit_logs_the_credited_share():
    cfg = small_cfg(credit="prefix")
    policy, old_policy, reference, ctx, truth, gen = micro_step_case(cfg)
    loss, metrics = grpo_micro_step(policy, old_policy, reference, ctx, truth, cfg.grpo, kl_coef=0.1,
                                    generator=gen)
    loss.backward()
    assert torch.isfinite(loss)
    assert 1.0 / cfg.grpo.horizon <= float(metrics["credited"]) <= 1.0  # position 0 always counts
