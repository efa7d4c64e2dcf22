"""The AvataRL student (Method.AVATARL): policy gradient at every context position, rewarded by a frozen
referee and the ground truth (algorithms/avatarl.py); the referee's identity goes into every checkpoint."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from avatarl.algorithms.avatarl import avatarl_micro_step
from avatarl.config import Config
from avatarl.data.corpus import Corpus
from avatarl.model import GPT
from avatarl.objectives.base import Method, ObjectiveBase
from avatarl.referee import Referee, describe_identity, open_referee

log = logging.getLogger(__name__)


class AvataRLObjective(ObjectiveBase):
    """Scores every next token of a window of CONTEXT_LEN + 1 tokens against the referee's opinion."""

    method = Method.AVATARL
    kind = "avatarl"

    def __init__(self, cfg: Config, referee: Referee, valid_vocab: int = 0):
        super().__init__(cfg)
        self.referee = referee.module
        self.valid_vocab = valid_vocab  # the tokenizer's ids; those above are padding (0 = none)
        self.identity = dict(referee.identity)  # saved in every checkpoint: which referee taught this student
        self.referee_memory_mib = referee.memory_bytes / 2**20

    @classmethod
    def create(cls, cfg: Config, corpus: Corpus, student: GPT, device: torch.device) -> AvataRLObjective:
        referee = open_referee(cfg, corpus.tokenizer, corpus.model_vocab_size, device)
        return cls(cfg, referee, corpus.tokenizer.size)

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
            log.warning("The referee changed since the checkpoint: %s then, %s now.",
                        describe_identity(saved), describe_identity(self.identity))
