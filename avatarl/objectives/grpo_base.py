"""What both GRPO objectives share: the references (n-gram KL anchor, partial credit) and `KLSchedule`, the
KL weight of each step with its adaptive controller on a cadence of its own.

The controller is fed every KL_UPDATE_INTERVAL optimizer steps with the mean KL of those steps over all
ranks, accumulated by the objective itself: neither LOG_INTERVAL nor any other duty changes training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from avatarl import distributed as D
from avatarl.algorithms.grpo import AdaptiveKLController, kl_warmup
from avatarl.algorithms.reference import build_reference
from avatarl.config import Config, ConfigError
from avatarl.config_schema import Rollouts
from avatarl.config_sections import GRPOSettings
from avatarl.data.corpus import Corpus, reference_ids
from avatarl.data.tokenizers import char_vocabulary
from avatarl.objectives.base import ObjectiveBase

# Optimizer steps between two updates of the adaptive KL weight: LOG_INTERVAL's default, which fed the
# controller before it had a cadence of its own, so that runs at the default settings train as they did.
KL_UPDATE_INTERVAL = 5
# The controller's horizon in optimizer steps: an update moves the weight by the full error only once it
# has seen this many steps' tokens (AdaptiveKLController's horizon_tokens).
KL_HORIZON_STEPS = 10


def grpo_needs_reference(cfg: Config) -> bool:
    """Autoregressive GRPO always scores against its n-gram; teacher-forced GRPO only for partial credit or
    the KL."""
    return cfg.grpo.rollouts == Rollouts.AUTOREGRESSIVE or cfg.grpo.partial_credit > 0 or cfg.grpo.beta_kl > 0


class KLSchedule:
    """The KL weight of each step: BETA_KL, or with ADAPTIVE_KL the controller's value, times KL_WARM's ramp.

    `observe` adds each micro-step's on-device KL to this rank's sums (no host sync); `coef_for` the step
    `iteration`, when iteration is a multiple of KL_UPDATE_INTERVAL, averages them over ranks (one
    all-reduce, one sync) and moves the controller by that interval's tokens. The controller is alike on
    every rank (state_dict); the sums not yet used are each rank's own (rank_state_dict).
    """

    def __init__(self, settings: GRPOSettings, tokens_per_step: int):
        self.settings = settings
        self.controller = AdaptiveKLController(settings.beta_kl, settings.kl_target,
                                               horizon_tokens=KL_HORIZON_STEPS * tokens_per_step,
                                               max_coef=settings.kl_max_coef)
        self.tokens_per_update = KL_UPDATE_INTERVAL * tokens_per_step
        self.kl_sum: Tensor | None = None
        self.kl_count = 0
        self.coef = 0.0

    def observe(self, metrics: dict[str, Tensor]) -> None:
        """Count a micro-step's KL toward the next update (nothing to count without a reference)."""
        if self.settings.adaptive_kl and "kl" in metrics:
            kl = metrics["kl"].detach().float()
            self.kl_sum = kl.clone() if self.kl_sum is None else self.kl_sum + kl
            self.kl_count += 1

    def coef_for(self, iteration: int, tokens_seen: int) -> float:
        """The KL weight of step `iteration`, after the controller's update when one is due."""
        if self.settings.adaptive_kl and iteration % KL_UPDATE_INTERVAL == 0 and self.kl_count:
            assert self.kl_sum is not None
            kl = D.mean_over_ranks({"kl": self.kl_sum / self.kl_count})["kl"]
            self.controller.update(kl, self.tokens_per_update)
            self.kl_sum, self.kl_count = None, 0
        base = self.controller.value if self.settings.adaptive_kl else self.settings.beta_kl
        self.coef = kl_warmup(base, tokens_seen, self.settings.kl_warm)
        return self.coef

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)

    def rank_state_dict(self) -> dict[str, Any]:
        return {"kl_sum": None if self.kl_sum is None else self.kl_sum.cpu(), "kl_count": self.kl_count}

    def load_rank_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """A checkpoint written before the schedule had sums of its own holds none: the count starts again."""
        kl_sum = state.get("kl_sum")
        self.kl_sum = None if kl_sum is None else kl_sum.to(device)
        self.kl_count = int(state.get("kl_count", 0))


class GRPOBase(ObjectiveBase):
    """A GRPO student: its references, built when its settings use one, and its KL schedule; subclasses give
    the rollouts (`micro_step`, which must pass its metrics to `self.kl.observe`)."""

    kind = "grpo"

    def __init__(self, cfg: Config, corpus: Corpus, device: torch.device, tokens_per_step: int):
        super().__init__(cfg)
        self.settings = cfg.grpo
        self.device = device
        self.credit = self.kl_reference = None
        if grpo_needs_reference(cfg):
            grpo = cfg.grpo
            try:
                self.credit, self.kl_reference = build_reference(
                    grpo.reference, grpo.ngram_order, grpo.reference_model, corpus.model_vocab_size,
                    char_vocabulary(corpus.tokenizer), reference_ids(corpus.train), device)
            except ValueError as err:
                raise ConfigError([str(err)]) from None
        self.kl = KLSchedule(cfg.grpo, tokens_per_step)

    def prepare_step(self, iteration: int, tokens_seen: int) -> None:
        self.kl.coef_for(iteration, tokens_seen)

    def host_metrics(self) -> dict[str, float]:
        return {"kl_coef": self.kl.coef}

    def state_dict(self) -> dict[str, Any]:
        return {"kl_controller": self.kl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl.load_state_dict(state["kl_controller"])

    def rank_state_dict(self) -> dict[str, Any]:
        return {"kl_schedule": self.kl.rank_state_dict()}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        self.kl.load_rank_state_dict(state.get("kl_schedule", {}), self.device)
