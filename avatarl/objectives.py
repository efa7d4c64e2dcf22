"""What one micro-step optimises, as the trainer calls it: the GRPO student, the AvataRL student, or the
supervised referee.

The maths lives in avatarl/algorithms/ as pure functions; an objective here is the stateful wrapper
around it for one run. It turns a batch of corpus windows into (loss, on-device metrics), owns what
the algorithm carries between steps (old policy, KL controller, frozen referee) with its
`state_dict`, and says how many corpus chars one context reads (`window_len`).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from avatarl.algorithms.avatarl import avatarl_micro_step, referee_loss
from avatarl.algorithms.grpo import AdaptiveKLController, grpo_micro_step, kl_warmup
from avatarl.algorithms.reference import build_reference
from avatarl.algorithms.teacher_forced import teacher_forced_micro_step
from avatarl.config import Config, ConfigError
from avatarl.cuda_graphs import GraphedDecoding
from avatarl.data.corpus import Corpus, reference_ids
from avatarl.data.tokenizers import char_vocabulary
from avatarl.model import GPT, frozen_copy
from avatarl.referee import Referee, describe_identity, open_referee

log = logging.getLogger("avatarl")


class Objective(Protocol):
    name: str
    window_len: int  # corpus chars per sampled window

    def prepare_step(self, iteration: int, chars_seen: int) -> None: ...
    def micro_step(self, model: nn.Module, window: Tensor) -> tuple[Tensor, dict[str, Tensor]]: ...
    def after_log(self, metrics: dict[str, float]) -> None: ...
    def host_metrics(self) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def window_len(cfg: Config, role: str) -> int:
    """Corpus chars one context reads, and adds to chars_seen: CONTEXT_LEN + HORIZON for a GRPO student
    with autoregressive rollouts (context and true continuation), CONTEXT_LEN + 1 for teacher-forced
    GRPO, AvataRL and the referee (every next char)."""
    autoregressive = role == "student" and cfg.run.algorithm == "grpo" and cfg.grpo.rollouts == "autoregressive"
    return cfg.model.context_len + (cfg.grpo.horizon if autoregressive else 1)


def grpo_needs_reference(cfg: Config) -> bool:
    """Autoregressive GRPO always scores against its n-gram; teacher-forced GRPO only for partial credit or KL."""
    return cfg.grpo.rollouts == "autoregressive" or cfg.grpo.partial_credit > 0 or cfg.grpo.beta_kl > 0


class GRPOObjective:
    """The seed's algorithm: rollouts from a periodically refreshed old policy, PPO-clip, entropy, KL; or,
    with ROLLOUTS=teacher_forced, on-policy draws at every position of a window (no old policy)."""

    name = "grpo"

    def __init__(self, cfg: Config, corpus: Corpus, student: GPT, device: torch.device):
        self.cfg = cfg
        self.settings = cfg.grpo
        self.teacher_forced = cfg.grpo.rollouts == "teacher_forced"
        self.window_len = window_len(cfg, "student")
        self.student = student
        # Teacher-forced draws come from the student itself: no old policy, no decode graphs.
        self.old_policy = None if self.teacher_forced else frozen_copy(student)
        use_graphs = cfg.model.use_cuda_graphs and device.type == "cuda" and self.old_policy is not None
        self.graphs = GraphedDecoding(self.old_policy, capture=True) if use_graphs else None
        self.credit = self.kl_reference = None
        if grpo_needs_reference(cfg):
            try:
                self.credit, self.kl_reference = build_reference(
                    cfg.grpo.reference, cfg.grpo.ngram_order, cfg.grpo.reference_model, corpus.model_vocab_size,
                    char_vocabulary(corpus.tokenizer), reference_ids(corpus.train), device)
            except ValueError as err:
                raise ConfigError([str(err)]) from None
        chars_per_iter = cfg.optim.batch * cfg.grpo.k_samples * (cfg.model.context_len if self.teacher_forced else cfg.grpo.horizon)
        self.controller = AdaptiveKLController(cfg.grpo.beta_kl, cfg.grpo.kl_target, horizon_chars=10 * chars_per_iter,
                                               max_coef=cfg.grpo.kl_max_coef)
        self.chars_per_log = cfg.run.log_interval * chars_per_iter
        self.kl_coef = 0.0

    def prepare_step(self, iteration: int, chars_seen: int) -> None:
        if self.old_policy is not None and iteration % self.cfg.grpo.old_policy_interval == 0:
            self.old_policy.load_state_dict(self.student.state_dict())
        base = self.controller.value if self.cfg.grpo.adaptive_kl else self.cfg.grpo.beta_kl
        self.kl_coef = kl_warmup(base, chars_seen, self.cfg.grpo.kl_warm)

    def micro_step(self, model: nn.Module, window: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.teacher_forced:
            return teacher_forced_micro_step(model, self.kl_reference, window, self.settings, self.kl_coef)
        ctx, truth = window[:, :self.cfg.model.context_len], window[:, self.cfg.model.context_len:]
        return grpo_micro_step(model, self.old_policy, self.kl_reference, ctx, truth, self.settings, self.kl_coef,
                               credit_reference=self.credit, graphs=self.graphs)

    def after_log(self, metrics: dict[str, float]) -> None:
        if self.cfg.grpo.adaptive_kl and "kl" in metrics:
            self.controller.update(metrics["kl"], self.chars_per_log)

    def host_metrics(self) -> dict[str, float]:
        return {"kl_coef": self.kl_coef}

    def state_dict(self) -> dict[str, Any]:
        state = {"kl_controller": self.controller.state_dict()}
        if self.old_policy is not None:
            state["old_policy"] = self.old_policy.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.old_policy is not None:
            self.old_policy.load_state_dict(state["old_policy"])
        self.controller.load_state_dict(state["kl_controller"])


class NextCharObjective:
    """Scores every position of a window of CONTEXT_LEN + 1 chars; carries no state between steps."""

    def __init__(self, cfg: Config, role: str):
        self.cfg = cfg
        self.window_len = window_len(cfg, role)

    def prepare_step(self, iteration: int, chars_seen: int) -> None:
        pass

    def after_log(self, metrics: dict[str, float]) -> None:
        pass

    def host_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class AvataRLObjective(NextCharObjective):
    """Policy gradient at every context position, rewarded by a frozen referee and the ground truth."""

    name = "avatarl"

    def __init__(self, cfg: Config, referee: Referee, valid_vocab: int = 0):
        super().__init__(cfg, "student")
        self.referee = referee.module
        self.valid_vocab = valid_vocab  # the tokenizer's ids; those above are padding (0 = none)
        self.identity = dict(referee.identity)  # saved in every checkpoint: which referee taught this student
        self.referee_memory_mib = referee.memory_bytes / 2**20

    def micro_step(self, model: nn.Module, window: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return avatarl_micro_step(model, self.referee, window[:, :-1], window[:, 1:], self.cfg.avatarl,
                                  self.cfg.grpo.entropy_coef, self.valid_vocab)

    def host_metrics(self) -> dict[str, float]:
        return {"referee_memory_mib": self.referee_memory_mib}

    def state_dict(self) -> dict[str, Any]:
        return {"referee": dict(self.identity)} if self.identity else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("referee")
        if saved and self.identity and saved != self.identity:
            log.warning("The referee changed since the checkpoint: %s then, %s now.", describe_identity(saved),
                        describe_identity(self.identity))


class RefereeObjective(NextCharObjective):
    """Next-char cross-entropy: the one supervised model of the product, never the student."""

    name = "referee"

    def __init__(self, cfg: Config):
        super().__init__(cfg, "referee")

    def micro_step(self, model: nn.Module, window: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = referee_loss(model(window[:, :-1]), window[:, 1:])
        return loss, {"train_ce": loss.detach()}


def build_objective(cfg: Config, role: str, corpus: Corpus, student: GPT, device: torch.device) -> Objective:
    if role == "referee":
        return RefereeObjective(cfg)
    if cfg.run.algorithm == "avatarl":
        return AvataRLObjective(cfg, open_referee(cfg, corpus.tokenizer, corpus.model_vocab_size, device),
                                corpus.tokenizer.size)
    return GRPOObjective(cfg, corpus, student, device)
