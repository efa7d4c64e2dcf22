"""Teacher-forced GRPO (ROLLOUTS=teacher_forced): rewards and per-position group advantages against a
straightforward loop, the loss against a by-hand computation, and a reward that teaches."""

import math

import pytest
import torch
from torch import nn

from avatarl.algorithms.grpo import match_rewards, reward_metrics
from avatarl.algorithms.reference import NgramReference
from avatarl.algorithms.teacher_forced import sample_actions, std_advantages, teacher_forced_micro_step
from avatarl.config import Config, ConfigError
from avatarl.config_sections import GRPOSettings
from avatarl.config_sources import load_config, preset_values
from avatarl.objectives import grpo_needs_reference, window_len
from avatarl.periodic import COMPLETED
from avatarl.trainer import train
from tests.helpers import metric_records

V = 5


def settings(**overrides) -> GRPOSettings:
    base = dict(k_samples=6, horizon=1, temperature=1.3, clip_ratio=0.2, entropy_coef=0.0, min_variance=0.1,
                partial_credit=0.0, exact_match_reward=1.0)
    return GRPOSettings(**{**base, **overrides})


class TableLogits(nn.Module):
    """Next-token logits are one learnable row per current token: [B, T] -> [B, T, V]."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


def loop_advantages(actions: list[list[int]], truth: list[int], credit: list[list[float]], s: GRPOSettings
                    ) -> list[list[float]]:
    out = []
    for row, true, row_credit in zip(actions, truth, credit, strict=True):
        rewards = [s.exact_match_reward * (a == true) + s.partial_credit * c for a, c in zip(row, row_credit,
                                                                                            strict=True)]
        mean = sum(rewards) / len(rewards)
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
        out.append([(r - mean) / max(std, s.min_variance) for r in rewards])
    return out


def test_per_position_group_advantages_match_a_loop():
    s = settings(partial_credit=0.5)
    gen = torch.Generator().manual_seed(3)
    actions = torch.randint(0, V, (7, s.k_samples), generator=gen)
    truth = torch.randint(0, V, (7,), generator=gen)
    credit = torch.rand(7, s.k_samples, generator=gen)
    rewards = match_rewards((actions == truth[:, None]).float(), credit, s.exact_match_reward,
                            s.partial_credit)
    got = std_advantages(rewards, s)
    want = loop_advantages(actions.tolist(), truth.tolist(), credit.tolist(), s)
    assert got.flatten().tolist() == pytest.approx([a for row in want for a in row], abs=1e-6)
    assert (got.sum(1).abs() < 1e-5).all()  # each position's group is centred on its own mean


def test_reward_metrics_by_hand():
    rewards = torch.tensor([[1.5, 0.5], [0.2, 0.0]])  # exact match 1 + partial credit, group on dim 1
    hits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    m = reward_metrics(rewards, hits, torch.tensor(0.3), torch.tensor(1.2), kl=None)
    assert m["reward_true_share"].item() == pytest.approx(1.5 / 2.2)
    assert m["reward_std"].item() == pytest.approx((0.5 + 0.1) / 2)
    assert m["exact_match"].item() == 0.25 and "kl" not in m


def test_loss_and_metrics_by_hand():
    torch.manual_seed(0)
    s = settings(entropy_coef=0.05, partial_credit=0.5)
    policy = TableLogits()
    train_ids = torch.randint(0, V, (200,))
    reference = NgramReference(2, V, train_ids, "cpu")
    window = torch.tensor([[0, 1, 2, 3], [4, 4, 0, 1]])
    loss, m = teacher_forced_micro_step(policy, reference, window, s, kl_coef=0.3,
                                        generator=torch.Generator().manual_seed(7))
    logp_t = torch.log_softmax(policy.table.detach() / s.temperature, -1)
    logp = torch.log_softmax(policy.table.detach(), -1)
    inputs, truth = window[:, :-1].flatten().tolist(), window[:, 1:].flatten().tolist()
    actions = sample_actions(logp_t[window[:, :-1].flatten()], s.k_samples, torch.Generator().manual_seed(7))
    ref = reference.log_probs(window[:, :-1]).flatten(0, 1)
    credit = ref.gather(-1, actions).exp()
    advantages = loop_advantages(actions.tolist(), truth, credit.tolist(), s)
    policy_loss = entropy = kl = 0.0
    for n, current in enumerate(inputs):
        drawn = zip(advantages[n], actions[n].tolist(), strict=True)
        policy_loss -= sum(a * logp_t[current, act].item() for a, act in drawn) / s.k_samples
        p = logp[current].exp()
        entropy -= float((p * logp[current]).sum())
        kl += float((p * (logp[current] - ref[n])).sum())
    n = len(inputs)
    expected = policy_loss / n - 0.05 * entropy / n + 0.3 * kl / n
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    hits = (actions == torch.tensor(truth)[:, None]).float()
    rewards = hits + 0.5 * credit
    assert m["exact_match"].item() == pytest.approx(hits.mean().item())
    assert m["reward_true_share"].item() == pytest.approx(float((rewards * hits).sum() / rewards.sum()))
    assert m["kl"].item() == pytest.approx(kl / n, rel=1e-5)
    assert m["entropy"].item() == pytest.approx(entropy / n, rel=1e-5)
    loss.backward()
    assert policy.table.grad is not None and policy.table.grad.abs().sum() > 0


def test_reward_off_gives_no_policy_gradient_and_no_reference_no_kl():
    policy = TableLogits()
    loss, m = teacher_forced_micro_step(policy, None, torch.tensor([[0, 1, 2, 3]]),
                                        settings(exact_match_reward=0.0), kl_coef=0.0)
    loss.backward()
    assert m["policy_loss"].item() == 0.0 and policy.table.grad.abs().max().item() == 0.0
    assert "kl" not in m  # nothing was scored against a reference: no made-up zero


def test_teacher_forced_builds_a_reference_only_when_it_uses_one():
    shipped = Config.of(**preset_values("grpo-teacher-forced"))
    assert not grpo_needs_reference(shipped)
    assert grpo_needs_reference(shipped.replace(beta_kl=0.1))
    assert grpo_needs_reference(shipped.replace(partial_credit=1.0))
    assert grpo_needs_reference(shipped.replace(rollouts="autoregressive"))


def test_a_teacher_forced_window_reads_context_plus_one():
    cfg = Config.of(algorithm="grpo", rollouts="teacher_forced", context_len=16, horizon=4)
    assert window_len(cfg, "student") == 17


def test_teacher_forced_needs_the_ngram():
    with pytest.raises(ConfigError,
                       match="ROLLOUTS=teacher_forced with REFERENCE=gpt2: .* set REFERENCE=ngram"):
        load_config(environ={"ROLLOUTS": "teacher_forced", "REFERENCE": "gpt2"})


@pytest.mark.slow
def test_exact_match_reward_teaches_accuracy(tmp_path, tiny_env):
    """The scalar reward alone (no reference, no KL) lifts next-char accuracy far above its reward-off run."""
    accuracy = {}
    for name, reward in (("on", "1"), ("off", "0")):
        env = {**tiny_env, "CHECKPOINT_DIR": str(tmp_path / name), "ALGORITHM": "grpo",
               "ROLLOUTS": "teacher_forced", "K_SAMPLES": "32", "ENTROPY_COEF": "0.5", "TEMPERATURE": "1.0",
               "BETA_KL": "0", "ADAPTIVE_KL": "false", "PARTIAL_CREDIT": "0", "EXACT_MATCH_REWARD": reward,
               "LR": "3e-3", "TOTAL_ITERS": "60",
               "EVAL_INTERVAL": "60", "SAVE_INTERMEDIATE_CHECKPOINTS": "false"}
        cfg, _ = load_config(environ=env)
        assert train(cfg) == COMPLETED
        accuracy[name] = [r["val_acc"] for r in metric_records(tmp_path / name) if "val_acc" in r][-1]
    assert accuracy["on"] > accuracy["off"] + 0.1, accuracy
