"""Teacher-forced GRPO (Method.GRPO_TEACHER_FORCED, ROLLOUTS=teacher_forced): K draws from the student at
every position of a real window, rewarded against the true next token (algorithms/teacher_forced.py). No
old policy: the draws come from the policy being trained. SAMPLING and ADVANTAGE choose how the K draws are
made and credited (GRPO's group normalisation, or the log E[reward] estimator of algorithms/log_reward.py)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from avatarl.algorithms.log_reward import draws_for
from avatarl.algorithms.teacher_forced import teacher_forced_micro_step
from avatarl.config import Config
from avatarl.data.corpus import Corpus
from avatarl.model import GPT
from avatarl.objectives.base import Method
from avatarl.objectives.grpo_base import GRPOBase


class TeacherForcedGRPO(GRPOBase):
    """On-policy REINFORCE with a group baseline at every position of a window of CONTEXT_LEN + 1 tokens."""

    method = Method.GRPO_TEACHER_FORCED

    def __init__(self, cfg: Config, corpus: Corpus, device: torch.device):
        # K follows the vocabulary when K_FRACTION is set: the tokenizer's ids, not the padded rows.
        self.k = draws_for(corpus.tokenizer.size, cfg.grpo.k_samples, cfg.grpo.k_fraction)
        # The tokens the controller's horizon counts: every sampled action, K per position.
        super().__init__(cfg, corpus, device, cfg.optim.batch * self.k * cfg.model.context_len)

    @classmethod
    def create(cls, cfg: Config, corpus: Corpus, student: GPT, device: torch.device) -> TeacherForcedGRPO:
        return cls(cfg, corpus, device)

    def micro_step(self, model: nn.Module, window: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss, metrics = teacher_forced_micro_step(model, self.kl_reference, window, self.settings,
                                                  self.kl.coef, k=self.k)
        self.kl.observe(metrics)
        return loss, metrics
