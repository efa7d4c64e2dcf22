"""The teacher-forced rows of `avatarl bench throughput`: teacher-forced GRPO (`--preset grpo-teacher-forced`)
and its log E[reward] variant (`--preset grpo-log-reward`, K = V/4 draws without replacement, and K = V/2 as
the learning bench's grpo_log_reward_half), each a real train_step on the benchmark's model, and their cost
per token against the supervised step's.

A teacher-forced step scores B x C positions (one forward and backward over windows of C + 1 tokens); the
supervised row trains B x K x (C + H) tokens. The ratios below compare seconds per trained token, the
issue-21 target being at most 1.3x the supervised step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from avatarl.config_sources import preset_values
from avatarl.data.sampler import make_sampler
from avatarl.objectives.teacher_forced import TeacherForcedGRPO
from avatarl.run import MetricBuffer, Run, RunState

# row -> (its preset, settings on top): the learning bench's grpo_log_reward_half draws K = V/2 (its doubled
# LR does not change what a step costs)
ROWS = {"teacher_forced_iteration": ("grpo-teacher-forced", {}),
        "log_reward_iteration": ("grpo-log-reward", {}),
        "log_reward_half_iteration": ("grpo-log-reward", {"k_fraction": 0.5})}
LABELS = {"teacher_forced_iteration": "GRPO teacher-forced",
          "log_reward_iteration": "GRPO log-reward",
          "log_reward_half_iteration": "GRPO log-reward, K = V/2"}


def teacher_forced_runs(grpo: Run) -> dict[str, Run]:
    """One run per row, sharing the GRPO run's model and optimizer, each with its objective and sampler."""
    runs = {}
    for name, (preset, extra) in ROWS.items():
        cfg = grpo.cfg.replace(**{**preset_values(preset), **extra})
        objective = TeacherForcedGRPO(cfg, grpo.corpus, grpo.info.device)
        sampler = make_sampler(grpo.corpus.train, cfg.model.context_len + 1, cfg.run.seed, 0,
                               grpo.info.device)
        runs[name] = dataclasses.replace(grpo, cfg=cfg, objective=objective, state=RunState(),
                                         metrics=MetricBuffer(grpo.info.device), sampler=sampler)
    return runs


def draws(runs: dict[str, Run]) -> dict[str, int]:
    """K per position of each row (the log-reward row's follows the vocabulary)."""
    return {name: run.objective.k for name, run in runs.items()}


def per_token_ratios(t: dict[str, float], micro_batch: int, context_len: int, supervised_tokens: int
                     ) -> dict[str, float]:
    """Seconds per trained token of each teacher-forced row over the supervised step's."""
    supervised = t["supervised_step"] / supervised_tokens
    return {f"{name.removesuffix('_iteration')}_per_token_over_supervised":
            t[name] / (micro_batch * context_len) / supervised for name in ROWS if name in t}


def table_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, timing key, throughput text) for format_table."""
    c, rows = report["config"], []
    for name, label in LABELS.items():
        if name in report["timings"]:
            rate = c["micro_batch"] * c["context_len"] / report["timings"][name]["median_s"]
            rows.append((f"{label} (K={report['teacher_forced_k'][name]})", name, f"{rate:,.0f} positions/s"))
    return rows
