"""The rows of `avatarl bench learning`: the shipped methods and their ablations, and the rows a user adds
with `--row NAME [ROW | PRESET ...] SETTING=VALUE ...`: a shipped row's method or a student, with a
preset's settings and the given ones on top of the command's, at the same budget as every other row."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from avatarl.config import Config, ConfigError, config_fields
from avatarl.config_sources import near_miss, parse_value, preset_names, preset_values

TEACHER_FORCED_PRESET = "grpo-teacher-forced"  # the scalar-reward GRPO setting of issue 14's study
LOG_REWARD_PRESET = "grpo-log-reward"  # teacher-forced GRPO credited by the log E[reward] estimator
AUTOREGRESSIVE_PRESET = "grpo-autoregressive"  # the seed's rollouts, prefix credit, log E[reward]
# What the benchmark sets for every row itself: the budget, the schedule, the seed, where a run goes, the
# corpus and the windows every row is scored on, and the run handling it forces.
BENCH_OWNED = ("TOTAL_ITERS", "WARMUP_ITERS", "EVAL_INTERVAL", "SEED", "CHECKPOINT_DIR", "REFEREE_PATH",
               "DATA_PATH", "TOKENIZER", "CONTEXT_LEN", "EVAL_WINDOWS", "USE_WANDB", "RESUME", "OVERWRITE",
               "SAVE_INTERMEDIATE_CHECKPOINTS", "SAMPLE_INTERVAL")
RESERVED_NAMES = ("referee",)  # the AvataRL referee's run directory
ROW_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str
    role: str                                  # "referee" role = trained with cross-entropy
    overrides: tuple[tuple[str, Any], ...] = ()
    lr_scale: float = 1.0                      # LR and MIN_LR: the command's times this, unless overridden

    def settings(self, base: Config) -> dict[str, Any]:
        """The row's settings on top of `base`: its overrides, and its scaled LR and MIN_LR (neither scaled
        when the overrides set either)."""
        given = {"lr", "min_lr"} & {key for key, _ in self.overrides}
        scaled = {} if self.lr_scale == 1.0 or given else {"lr": base.optim.lr * self.lr_scale,
                                                           "min_lr": base.optim.min_lr * self.lr_scale}
        return {**scaled, **dict(self.overrides)}


def methods() -> tuple[Method, ...]:
    """The rows of the table, in order (the teacher-forced setting is read from its preset file)."""
    teacher_forced = tuple(preset_values(TEACHER_FORCED_PRESET).items())
    log_reward = tuple(preset_values(LOG_REWARD_PRESET).items())
    autoregressive = tuple(preset_values(AUTOREGRESSIVE_PRESET).items())
    reward_off = (("partial_credit", 0.0), ("exact_match_reward", 0.0))
    half = (("k_fraction", 0.5),)  # the log-reward row at supervised quality on BPE 2,048 (docs/learning.md)
    return (
        Method("supervised", "supervised (not RL, the ceiling)", "referee"),
        Method("grpo", "GRPO (autoregressive, shipped defaults)", "student", (("algorithm", "grpo"),)),
        Method("grpo_reward_off", "GRPO, reward off (KL + entropy only)", "student",
               (("algorithm", "grpo"), *reward_off)),
        Method("grpo_ar_credit", "GRPO autoregressive, prefix credit, log reward", "student", autoregressive),
        Method("grpo_ar_credit_off", "GRPO autoregressive, prefix credit, reward off", "student",
               (*autoregressive, *reward_off)),
        Method("grpo_tf", "GRPO teacher-forced, exact match only", "student", teacher_forced),
        Method("grpo_tf_reward_off", "GRPO teacher-forced, reward off (entropy only)", "student",
               (*teacher_forced, *reward_off)),
        Method("grpo_log_reward", "GRPO teacher-forced, log reward (K = V/4 distinct draws)", "student",
               log_reward),
        Method("grpo_log_reward_off", "GRPO teacher-forced log reward, reward off", "student",
               (*log_reward, *reward_off)),
        Method("grpo_log_reward_half", "GRPO teacher-forced, log reward, K = V/2, twice the LR", "student",
               (*log_reward, *half), lr_scale=2.0),
        Method("grpo_log_reward_half_off", "GRPO teacher-forced log reward, K = V/2, 2x LR, reward off",
               "student", (*log_reward, *half, *reward_off), lr_scale=2.0),
        Method("avatarl", "AvataRL", "student", (("algorithm", "avatarl"),)),
        Method("avatarl_referee_only", "AvataRL, REALITY_WEIGHT=0 (referee only)", "student",
               (("algorithm", "avatarl"), ("reality_weight", 0.0))),
        Method("avatarl_sampled", "AvataRL on-policy (V/2 student draws, importance weights)", "student",
               (("algorithm", "avatarl"), ("action_set", "sampled"))),
        Method("avatarl_sampled_mean", "AvataRL on-policy, group-mean baseline", "student",
               (("algorithm", "avatarl"), ("action_set", "sampled"), ("sampled_advantage", "mean"))),
    )


def settings_row(spec: list[str], taken: set[str]) -> Method:
    """The row of `--row NAME [ROW | PRESET ...] SETTING=VALUE ...`: a student, or a shipped ROW's method
    (supervised: its role too) with that row's settings; then each preset's (their budget and schedule
    give way to the benchmark's) and the SETTING=VALUE words, the later winning. A ConfigError that says
    what to fix when NAME is taken (`taken`: the names so far) or not a plain name, or a word is no row,
    preset or setting, a setting is bench-owned or its value of the wrong type."""
    name, *words = spec
    where = f"--row {name}"
    if not ROW_NAME.fullmatch(name) or "=" in name:
        raise ConfigError([f"{where}: a row needs a name first (letters, digits, _ . -), then SETTING=VALUE "
                           "words, e.g. --row my_k64 K_SAMPLES=64."])
    if name in taken or name in RESERVED_NAMES:
        raise ConfigError([f"{where}: that name is already a row (or the referee's); give this one another."])
    shipped = {m.name: m for m in methods()}
    known, problems, overrides, role, lr_scale = config_fields(), [], {}, "student", 1.0
    owned = {known[key].name for key in BENCH_OWNED}
    for word in words:
        key, equals, text = word.partition("=")
        key = key.strip().upper()
        if not equals and word in shipped:
            role, lr_scale = shipped[word].role, shipped[word].lr_scale
            if lr_scale != 1.0:  # its scaled LR comes after any LR given before it
                overrides.pop("lr", None)
                overrides.pop("min_lr", None)
            overrides.update(shipped[word].overrides)
        elif not equals and word in preset_names():
            overrides.update({key: value for key, value in preset_values(word).items() if key not in owned})
        elif not equals or not key:
            problems.append(f"{where}: '{word}' is none of SETTING=VALUE, a row of the table "
                            f"({', '.join(shipped)}) or a preset ({', '.join(preset_names())}).")
        elif key not in known:
            guess = near_miss(key)
            problems.append(f"{where}: {key} is no setting" + (f"; did you mean {guess}?" if guess else
                            " (avatarl train --help lists them)."))
        elif key in BENCH_OWNED:
            problems.append(f"{where}: {key} is set by the benchmark for every row (the equal budget); "
                            "leave it out.")
        else:
            try:
                overrides[known[key].name] = parse_value(known[key], text)
            except ValueError as err:
                problems.append(f"{where}: {key}={text}: {err}.")
    if problems:
        raise ConfigError(problems)
    label = f"{name} ({' '.join(words)})" if words else name
    return Method(name, label, role, tuple(overrides.items()), lr_scale)


def chosen_methods(names: list[str] | None, specs: list[list[str]] | None = None) -> tuple[Method, ...]:
    """The rows named by `--methods` in table order, then the `--row` rows in their order. Every shipped
    row when neither is given, only the `--row` rows when they come without `--methods`; a ConfigError
    naming the rows there are."""
    rows = methods()
    if not names and not specs:
        return rows
    unknown = [name for name in names or () if name not in {m.name for m in rows}]
    if unknown:
        raise ConfigError([f"--methods {', '.join(unknown)}: no such row; choose among "
                           f"{', '.join(m.name for m in rows)}."])
    chosen = [m for m in rows if m.name in (names or ())]
    taken = {m.name for m in rows}
    for spec in specs or ():
        chosen.append(settings_row(spec, taken))
        taken.add(spec[0])
    return tuple(chosen)
