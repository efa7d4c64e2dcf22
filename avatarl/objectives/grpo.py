"""The seed's GRPO student (Method.GRPO, ROLLOUTS=autoregressive): K continuations of HORIZON tokens per
context from an old policy refreshed every OLD_POLICY_INTERVAL steps, PPO-clip, entropy and KL
(algorithms/grpo.py), the decode steps optionally replayed from a CUDA graph."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from avatarl.algorithms.grpo import grpo_micro_step
from avatarl.config import Config
from avatarl.cuda_graphs import GraphedDecoding
from avatarl.data.corpus import Corpus
from avatarl.model import GPT, frozen_copy
from avatarl.objectives.base import Method
from avatarl.objectives.grpo_base import GRPOBase


class AutoregressiveGRPO(GRPOBase):
    """Rollouts from the old policy, scored per generated token against the true continuation."""

    method = Method.GRPO

    def __init__(self, cfg: Config, corpus: Corpus, student: GPT, device: torch.device):
        self.student = student
        self.old_policy = frozen_copy(student)
        use_graphs = cfg.model.use_cuda_graphs and device.type == "cuda"
        self.graphs = GraphedDecoding(self.old_policy, capture=True) if use_graphs else None
        # The tokens the controller's horizon counts: every generated one.
        super().__init__(cfg, corpus, device, cfg.optim.batch * cfg.grpo.k_samples * cfg.grpo.horizon)

    @classmethod
    def create(cls, cfg: Config, corpus: Corpus, student: GPT, device: torch.device) -> AutoregressiveGRPO:
        return cls(cfg, corpus, student, device)

    @classmethod
    def window_len_of(cls, cfg: Config) -> int:
        """The context and its true continuation: CONTEXT_LEN + HORIZON tokens."""
        return cfg.model.context_len + cfg.grpo.horizon

    def prepare_step(self, iteration: int, tokens_seen: int) -> None:
        if iteration % self.cfg.grpo.old_policy_interval == 0:
            self.old_policy.load_state_dict(self.student.state_dict())
        super().prepare_step(iteration, tokens_seen)

    def micro_step(self, model: nn.Module, window: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ctx, truth = window[:, :self.cfg.model.context_len], window[:, self.cfg.model.context_len:]
        loss, metrics = grpo_micro_step(model, self.old_policy, self.kl_reference, ctx, truth, self.settings,
                                        self.kl.coef, credit_reference=self.credit, graphs=self.graphs)
        self.kl.observe(metrics)
        return loss, metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "old_policy": self.old_policy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.old_policy.load_state_dict(state["old_policy"])
        super().load_state_dict(state)
