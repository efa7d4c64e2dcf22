"""What every objective is to the trainer: the `Objective` protocol, the `Method` names that key the
registry (registry.py), and `ObjectiveBase`, the defaults of an objective that carries no state."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from avatarl.config import Config
from avatarl.config_schema import Choice
from avatarl.data.corpus import Corpus
from avatarl.model import GPT


class Method(Choice):
    """One objective class each (registry.OBJECTIVES); registry.method_of says which settings pick it."""

    GRPO = "grpo"                                  # autoregressive rollouts from an old policy (the seed)
    GRPO_TEACHER_FORCED = "grpo_teacher_forced"    # K draws at every position of a real window
    AVATARL = "avatarl"                            # rewards from a frozen referee at every position
    SUPERVISED = "supervised"                      # next-token cross-entropy: the referee, never the student


class Objective(Protocol):
    """What one micro-step optimises, as the trainer calls it, with the state it carries between steps."""

    method: Method
    kind: str        # the checkpoint's "kind": a resume refuses a checkpoint of another kind
    window_len: int  # corpus tokens per sampled window, which is what one context adds to tokens_seen

    def prepare_step(self, iteration: int, tokens_seen: int) -> None: ...
    def micro_step(self, model: nn.Module, window: Tensor) -> tuple[Tensor, dict[str, Tensor]]: ...
    def host_metrics(self) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...        # alike on every rank
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def rank_state_dict(self) -> dict[str, Any]: ...   # this rank's own (e.g. its not yet reduced sums)
    def load_rank_state_dict(self, state: dict[str, Any]) -> None: ...


class ObjectiveBase:
    """An objective that scores every position of a window of CONTEXT_LEN + 1 tokens and carries no state;
    subclasses set `method` and `kind` and override what they need."""

    method: ClassVar[Method]
    kind: ClassVar[str]

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.window_len = self.window_len_of(cfg)

    @classmethod
    def create(cls, cfg: Config, corpus: Corpus, student: GPT, device: torch.device) -> ObjectiveBase:
        """The registry's one way to build any objective for a run; objectives that need no more than the
        settings take only those."""
        return cls(cfg)

    @classmethod
    def window_len_of(cls, cfg: Config) -> int:
        """Corpus tokens one context reads (every next token of CONTEXT_LEN positions)."""
        return cfg.model.context_len + 1

    def prepare_step(self, iteration: int, tokens_seen: int) -> None:
        pass

    def micro_step(self, model: nn.Module, window: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def host_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def rank_state_dict(self) -> dict[str, Any]:
        return {}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        pass
