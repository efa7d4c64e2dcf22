"""What one micro-step optimises: the GRPO student, the AvataRL student, or the supervised referee.

Each objective turns a batch of corpus windows into (loss, on-device metrics) and owns the state
that the algorithm carries between steps (old policy, KL controller, frozen referee).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from avatarl.algorithms.avatarl import avatarl_micro_step, check_referee_compatible, referee_loss
from avatarl.algorithms.grpo import AdaptiveKLController, grpo_micro_step, kl_warmup
from avatarl.checkpoint import CheckpointError, load_checkpoint
from avatarl.config import Config, ConfigError
from avatarl.cuda_graphs import GraphedDecoding
from avatarl.data import Corpus
from avatarl.model import GPT, GPTConfig
from avatarl.reference import build_reference


class Objective(Protocol):
    name: str
    window_len: int  # corpus chars per sampled window

    def prepare_step(self, iteration: int, chars_seen: int) -> None: ...
    def micro_step(self, model: nn.Module, window: Tensor) -> tuple[Tensor, dict[str, Tensor]]: ...
    def after_log(self, metrics: dict[str, float]) -> None: ...
    def host_metrics(self) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def frozen_copy(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model).eval()
    twin.requires_grad_(False)
    return twin


class GRPOObjective:
    """The seed's algorithm: rollouts from a periodically refreshed old policy, PPO-clip, entropy, KL."""

    name = "grpo"

    def __init__(self, cfg: Config, corpus: Corpus, student: GPT, device: torch.device):
        self.cfg = cfg
        self.window_len = cfg.context_len + cfg.horizon
        self.student = student
        self.old_policy = frozen_copy(student)
        use_graphs = cfg.use_cuda_graphs and device.type == "cuda"
        self.graphs = GraphedDecoding(self.old_policy, capture=True) if use_graphs else None
        self.credit, self.kl_reference = build_reference(cfg, list(corpus.vocab.chars), corpus.train, device)
        chars_per_iter = cfg.batch * cfg.k_samples * cfg.horizon
        self.controller = AdaptiveKLController(cfg.beta_kl, cfg.kl_target, horizon_chars=10 * chars_per_iter,
                                               max_coef=cfg.kl_max_coef)
        self.chars_per_log = cfg.log_interval * chars_per_iter
        self.kl_coef = 0.0

    def prepare_step(self, iteration: int, chars_seen: int) -> None:
        if iteration % self.cfg.old_policy_interval == 0:
            self.old_policy.load_state_dict(self.student.state_dict())
        base = self.controller.value if self.cfg.adaptive_kl else self.cfg.beta_kl
        self.kl_coef = kl_warmup(base, chars_seen, self.cfg.kl_warm)

    def micro_step(self, model: nn.Module, window: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ctx, truth = window[:, :self.cfg.context_len], window[:, self.cfg.context_len:]
        return grpo_micro_step(model, self.old_policy, self.kl_reference, ctx, truth, self.cfg, self.kl_coef,
                               credit_reference=self.credit, graphs=self.graphs)

    def after_log(self, metrics: dict[str, float]) -> None:
        if self.cfg.adaptive_kl and "kl" in metrics:
            self.controller.update(metrics["kl"], self.chars_per_log)

    def host_metrics(self) -> dict[str, float]:
        return {"kl_coef": self.kl_coef}

    def state_dict(self) -> dict[str, Any]:
        return {"old_policy": self.old_policy.state_dict(), "kl_controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.old_policy.load_state_dict(state["old_policy"])
        self.controller.load_state_dict(state["kl_controller"])


def referee_path(cfg: Config) -> Path:
    return Path(cfg.referee_path or Path(cfg.checkpoint_dir) / "referee.pt").expanduser()


def load_referee(cfg: Config, vocab_chars: list[str], device: torch.device) -> GPT:
    """The frozen referee for ALGORITHM=avatarl, checked against this run's corpus and context."""
    path = referee_path(cfg)
    if not path.is_file():
        raise ConfigError([f"REFEREE_PATH={str(path)!r}: no referee there. Train one first with "
                           "`avatarl train-referee` (same DATA_PATH and CONTEXT_LEN), or set REFEREE_PATH."])
    try:
        saved = load_checkpoint(path, map_location=device)
        check_referee_compatible(saved, vocab_chars, cfg.context_len)
    except (CheckpointError, ValueError) as err:
        raise ConfigError([f"REFEREE_PATH={str(path)!r}: {err}"]) from None
    referee = GPT(GPTConfig(**saved["model_config"])).to(device)
    referee.load_state_dict(saved["model"])
    if device.type == "cuda" and cfg.use_amp and cfg.amp_dtype == "bfloat16":
        referee = referee.to(torch.bfloat16)
    return frozen_copy(referee)


class NextCharObjective:
    """Scores every position of a window of CONTEXT_LEN + 1 chars; carries no state between steps."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.window_len = cfg.context_len + 1

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

    def __init__(self, cfg: Config, corpus: Corpus, device: torch.device):
        super().__init__(cfg)
        self.referee = load_referee(cfg, list(corpus.vocab.chars), device)

    def micro_step(self, model: nn.Module, window: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return avatarl_micro_step(model, self.referee, window[:, :-1], window[:, 1:], self.cfg)


class RefereeObjective(NextCharObjective):
    """Next-char cross-entropy: the one supervised model of the product, never the student."""

    name = "referee"

    def micro_step(self, model: nn.Module, window: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = referee_loss(model(window[:, :-1]), window[:, 1:])
        return loss, {"train_ce": loss.detach()}


def build_objective(cfg: Config, role: str, corpus: Corpus, student: GPT, device: torch.device) -> Objective:
    if role == "referee":
        return RefereeObjective(cfg)
    if cfg.algorithm == "avatarl":
        return AvataRLObjective(cfg, corpus, device)
    return GRPOObjective(cfg, corpus, student, device)
