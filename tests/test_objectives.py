"""The objectives: one class per method behind the registry, the KL schedule on its own cadence (so that
LOG_INTERVAL never changes training), tokens as the unit of the run's counters, and older checkpoints'
names still read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avatarl.checkpoint import load_checkpoint
from avatarl.config import Config
from avatarl.config_sections import GRPOSettings
from avatarl.config_sources import load_config
from avatarl.data.corpus import load_corpus
from avatarl.generate import Sample
from avatarl.model import GPT, GPTConfig
from avatarl.objectives import (
    KL_UPDATE_INTERVAL,
    OBJECTIVES,
    AutoregressiveGRPO,
    KLSchedule,
    Method,
    SupervisedObjective,
    TeacherForcedGRPO,
    build_objective,
    method_of,
    window_len,
)
from avatarl.periodic import COMPLETED
from avatarl.run import RunState
from avatarl.trainer import train
from tests.helpers import TINY, assert_identical


def test_every_method_has_its_own_class():
    assert set(OBJECTIVES) == set(Method)
    assert all(cls.method == method for method, cls in OBJECTIVES.items())
    assert len(set(OBJECTIVES.values())) == len(OBJECTIVES)
    # What checkpoints have always been called, so that those written before still resume.
    assert {method: cls.kind for method, cls in OBJECTIVES.items()} == {
        Method.GRPO: "grpo", Method.GRPO_TEACHER_FORCED: "grpo", Method.AVATARL: "avatarl",
        Method.SUPERVISED: "referee"}


def test_the_settings_and_the_role_pick_the_method_and_its_window():
    cfg = Config.of(context_len=16, horizon=4)
    picks = [
        ("student", cfg, Method.GRPO, 20),
        ("student", cfg.replace(rollouts="teacher_forced"), Method.GRPO_TEACHER_FORCED, 17),
        ("student", cfg.replace(algorithm="avatarl"), Method.AVATARL, 17),
        ("referee", cfg, Method.SUPERVISED, 17),
        ("referee", cfg.replace(algorithm="avatarl", rollouts="teacher_forced"), Method.SUPERVISED, 17),
    ]
    for role, settings, method, tokens in picks:
        assert method_of(settings, role) == method
        assert window_len(settings, role) == tokens


def test_build_objective_makes_the_class_of_the_method(corpus_path: Path):
    cfg, _ = load_config({**TINY, "DATA_PATH": str(corpus_path), "DEVICE": "cpu"}, environ={})
    corpus = load_corpus(cfg, torch.device("cpu"))
    student = GPT(GPTConfig(vocab_size=corpus.model_vocab_size, block_size=cfg.seq_len, n_layer=1, n_head=2,
                            n_emb=32, use_flash_attn=False))
    cpu = torch.device("cpu")
    grpo = build_objective(cfg, "student", corpus, student, cpu)
    assert type(grpo) is AutoregressiveGRPO and grpo.window_len == 16 + 4 and grpo.old_policy is not None
    no_reference = cfg.replace(rollouts="teacher_forced", beta_kl=0.0, partial_credit=0.0)
    forced = build_objective(no_reference, "student", corpus, student, cpu)
    assert type(forced) is TeacherForcedGRPO and forced.kl_reference is None
    assert "old_policy" not in forced.state_dict()
    supervised = build_objective(cfg, "referee", corpus, student, cpu)
    assert type(supervised) is SupervisedObjective and supervised.state_dict() == {}
    loss, metrics = supervised.micro_step(student, torch.randint(0, 65, (2, 17)))
    assert set(metrics) == {"train_ce"} and loss.requires_grad


def test_the_advantage_setting_changes_only_the_credit_of_the_same_draws(corpus_path: Path):
    """ADVANTAGE picks how teacher-forced GRPO credits its K draws; the draws themselves do not change."""
    base = dict(rollouts="teacher_forced", beta_kl=0.0, partial_credit=0.0, entropy_coef=0.0, context_len=8,
                k_samples=4, data_path=str(corpus_path), device="cpu")
    corpus = load_corpus(Config.of(**base), torch.device("cpu"))
    student = GPT(GPTConfig(vocab_size=corpus.model_vocab_size, block_size=16, n_layer=1, n_head=2,
                            n_emb=16, use_flash_attn=False))
    window = torch.randint(0, 65, (4, 9), generator=torch.Generator().manual_seed(0))
    metrics = {}
    for advantage in ("group_std", "log_reward"):
        cfg = Config.of(**base, advantage=advantage)
        torch.manual_seed(0)
        objective = TeacherForcedGRPO(cfg, corpus, torch.device("cpu"))
        _, metrics[advantage] = objective.micro_step(student, window)
    assert torch.equal(metrics["group_std"]["reward_mean"], metrics["log_reward"]["reward_mean"])
    assert metrics["group_std"]["policy_loss"].item() != metrics["log_reward"]["policy_loss"].item()


# --- the KL schedule

def schedule(**overrides) -> KLSchedule:
    settings = GRPOSettings(**{"beta_kl": 1.0, "kl_target": 0.1, "adaptive_kl": True, "kl_max_coef": 100.0,
                               **overrides})
    return KLSchedule(settings, tokens_per_step=10)


def test_the_controller_moves_only_every_kl_update_interval_steps():
    kl = schedule()
    assert kl.coef_for(0, 0) == 1.0
    for iteration in range(1, 2 * KL_UPDATE_INTERVAL + 1):
        kl.observe({"kl": torch.tensor(1.0)})  # ten times the target: the error is clipped to +0.2
        kl.observe({"kl": torch.tensor(3.0)})  # a second micro-step
        due = iteration % KL_UPDATE_INTERVAL == 0
        updates = iteration // KL_UPDATE_INTERVAL
        # Each update sees KL_UPDATE_INTERVAL steps' tokens, half the horizon of 10 steps: 1 + 0.2 / 2.
        assert kl.coef_for(iteration, 0) == pytest.approx(1.1 ** updates), (iteration, due)
    assert kl.kl_count == 0


def test_the_schedule_without_adaptation_or_a_kl_never_moves():
    fixed = schedule(adaptive_kl=False, beta_kl=0.3, kl_warm=100)
    fixed.observe({"kl": torch.tensor(5.0)})
    assert fixed.kl_count == 0
    assert fixed.coef_for(KL_UPDATE_INTERVAL, 50) == pytest.approx(0.15)  # half-way up the ramp
    unmeasured = schedule()
    unmeasured.observe({"entropy": torch.tensor(1.0)})  # teacher-forced GRPO without a reference logs no kl
    assert unmeasured.coef_for(KL_UPDATE_INTERVAL, 0) == 1.0


def test_the_sums_not_used_yet_resume_with_the_rank():
    straight, resumed = schedule(), schedule()
    for value in (0.5, 0.7):
        straight.observe({"kl": torch.tensor(value)})
    resumed.load_state_dict(straight.state_dict())
    resumed.load_rank_state_dict(straight.rank_state_dict(), torch.device("cpu"))
    assert resumed.coef_for(KL_UPDATE_INTERVAL, 0) == straight.coef_for(KL_UPDATE_INTERVAL, 0) != 1.0
    older = schedule()
    older.load_rank_state_dict({}, torch.device("cpu"))  # a checkpoint written before the schedule had sums
    assert older.kl_count == 0 and older.coef_for(KL_UPDATE_INTERVAL, 0) == 1.0


def test_a_checkpoint_that_counted_chars_seen_resumes_its_tokens():
    state = RunState()
    state.load_state_dict({"iteration": 4, "chars_seen": 1280, "bad_streak": 0, "bad_total": 0})
    assert state.tokens_seen == 1280 and "tokens_seen" in state.state_dict()


def test_two_log_intervals_train_bit_identical_weights(tmp_path: Path, corpus_path: Path, monkeypatch):
    """LOG_INTERVAL is when metrics are read, never what is trained: the adaptive KL weight moves on the
    controller's own cadence, so runs that log every step and every 7 steps end with the same weights."""
    # The end-of-run text samples take most of a tiny run's time and are no part of its training.
    monkeypatch.setattr("avatarl.periodic.training_samples", lambda *args: [Sample("A", [1, 2, 3], "bcd")])
    data = tmp_path / "shakespeare-200k.txt"  # a slice: each run counts its n-gram reference afresh
    data.write_text(corpus_path.read_text()[:200_000])
    iters = KL_UPDATE_INTERVAL + 1  # the last step trains with the weight of the first update
    saved = {}
    for interval in (1, 3):
        run_dir = tmp_path / f"log{interval}"
        settings = {**TINY, "DATA_PATH": str(data), "CHECKPOINT_DIR": str(run_dir), "ALGORITHM": "grpo",
                    "ROLLOUTS": "autoregressive", "ADAPTIVE_KL": "true", "BETA_KL": "0.5",
                    "KL_TARGET": "0.05", "KL_WARM": "0", "TOTAL_ITERS": str(iters),
                    "LOG_INTERVAL": str(interval), "EVAL_INTERVAL": "1000",
                    "SAVE_INTERMEDIATE_CHECKPOINTS": "false", "DEVICE": "cpu", "BATCH": "8",
                    "EVAL_WINDOWS": "8"}
        cfg, _ = load_config(settings, environ={})
        assert train(cfg) == COMPLETED
        saved[interval] = load_checkpoint(run_dir / f"ckpt_{iters:08d}.pt")
    every_step, every_third = saved[1], saved[3]
    coef = every_step["objective"]["kl_controller"]["coef"]
    assert coef != 0.5, "the controller moved, so the test compares runs whose KL weight changed"
    assert every_third["objective"]["kl_controller"]["coef"] == coef
    for part in ("model", "optimizer"):
        assert_identical(every_step[part], every_third[part], part)
    assert_identical(every_step["objective"]["old_policy"], every_third["objective"]["old_policy"],
                     "old_policy")
