"""The supervised objective (Method.SUPERVISED): next-token cross-entropy, the one supervised loss of the
product. `avatarl train-referee` trains AvataRL's referee with it (its checkpoints keep the kind "referee"),
and `avatarl bench learning` its ceiling row; the RL student never gets it."""

from __future__ import annotations

from torch import Tensor, nn

from avatarl.algorithms.avatarl import referee_loss
from avatarl.objectives.base import Method, ObjectiveBase


class SupervisedObjective(ObjectiveBase):
    """Cross-entropy of every next token of a window of CONTEXT_LEN + 1 tokens; no state between steps."""

    method = Method.SUPERVISED
    kind = "referee"  # what train-referee checkpoints have always been called: they still resume

    def micro_step(self, model: nn.Module, window: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = referee_loss(model(window[:, :-1]), window[:, 1:])
        return loss, {"train_ce": loss.detach()}
