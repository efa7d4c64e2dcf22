"""Which objective a run trains: `method_of` reads the settings (and the role), `OBJECTIVES` maps each
Method to its class, `build_objective` makes it for the trainer and `window_len` tells the benchmarks how
many corpus tokens a context of it reads, without building anything.

Adding a method, e.g. teacher-forced GRPO with another advantage formula:
1. a member of `Method` (base.py), e.g. GRPO_TF_MEAN = "grpo_tf_mean";
2. its class, in a module of this package named for it: subclass the nearest objective (here
   TeacherForcedGRPO, overriding its static `advantages(rewards, settings)`), or ObjectiveBase, and set
   `method` (and `kind` if its checkpoints must not resume as another method's);
3. its entry in OBJECTIVES below, and the settings that select it in `method_of` (a new setting belongs to
   its section in config_sections.py, e.g. an enum in GRPOSettings).
The trainer, checkpoints and benchmarks then need no change; tests/test_objectives.py checks every entry.
"""

from __future__ import annotations

import torch

from avatarl.config import Config
from avatarl.config_schema import Algorithm, Rollouts
from avatarl.data.corpus import Corpus
from avatarl.model import GPT
from avatarl.objectives.avatarl import AvataRLObjective
from avatarl.objectives.base import Method, Objective, ObjectiveBase
from avatarl.objectives.grpo import AutoregressiveGRPO
from avatarl.objectives.supervised import SupervisedObjective
from avatarl.objectives.teacher_forced import TeacherForcedGRPO

OBJECTIVES: dict[Method, type[ObjectiveBase]] = {
    Method.GRPO: AutoregressiveGRPO,
    Method.GRPO_TEACHER_FORCED: TeacherForcedGRPO,
    Method.AVATARL: AvataRLObjective,
    Method.SUPERVISED: SupervisedObjective,
}


def method_of(cfg: Config, role: str) -> Method:
    """The method a run of `role` trains: the referee role (`avatarl train-referee`) is supervised; a student
    runs ALGORITHM, and GRPO's ROLLOUTS picks between its two objectives."""
    if role == "referee":
        return Method.SUPERVISED
    if cfg.run.algorithm == Algorithm.AVATARL:
        return Method.AVATARL
    return Method.GRPO_TEACHER_FORCED if cfg.grpo.rollouts == Rollouts.TEACHER_FORCED else Method.GRPO


def build_objective(cfg: Config, role: str, corpus: Corpus, student: GPT, device: torch.device) -> Objective:
    return OBJECTIVES[method_of(cfg, role)].create(cfg, corpus, student, device)


def window_len(cfg: Config, role: str) -> int:
    """Corpus tokens one context of this run reads, and adds to tokens_seen: CONTEXT_LEN + HORIZON for
    autoregressive GRPO (context and true continuation), CONTEXT_LEN + 1 for the others (every next token)."""
    return OBJECTIVES[method_of(cfg, role)].window_len_of(cfg)
