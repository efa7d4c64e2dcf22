"""The state one run carries and saves: its components (model, optimizer, scaler, objective, sampler,
metric sums, counters), each owning its `state_dict`, composed here into what a checkpoint holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from avatarl import distributed as D
from avatarl.config import Config
from avatarl.data.corpus import Corpus
from avatarl.data.sampler import WindowSampler
from avatarl.data.tokenizers import char_vocabulary
from avatarl.model import GPT
from avatarl.objectives import Objective
from avatarl.rng import capture_rng, restore_rng


@dataclass
class MetricBuffer:
    """On-device running sums of metrics, each with its own count; one host sync per log interval."""

    device: torch.device
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
            self.counts[name] = self.counts.get(name, 0) + 1

    def drain(self) -> dict[str, float]:
        """The mean of each metric since the last drain, averaged over ranks (one all-reduce)."""
        means = D.mean_over_ranks({name: total / self.counts[name] for name, total in self.sums.items()})
        self.sums, self.counts = {}, {}
        return means

    def state_dict(self) -> dict[str, Any]:
        return {"metric_sums": {name: value.cpu() for name, value in self.sums.items()},
                "metric_counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {name: value.to(self.device) for name, value in state["metric_sums"].items()}
        self.counts = dict(state["metric_counts"])


@dataclass
class RunState:
    """The run's counters: optimizer steps, corpus tokens read, non-finite steps skipped."""

    iteration: int = 0
    tokens_seen: int = 0
    bad_streak: int = 0
    bad_total: int = 0
    last_saved: int = -1  # not saved: the iteration of the checkpoint on disk, so a stop never saves twice

    def record_step(self, finite: bool, tokens: int) -> None:
        self.iteration += 1
        self.tokens_seen += tokens
        self.bad_streak = 0 if finite else self.bad_streak + 1
        self.bad_total += 0 if finite else 1

    def state_dict(self) -> dict[str, int]:
        return {"iteration": self.iteration, "tokens_seen": self.tokens_seen, "bad_streak": self.bad_streak,
                "bad_total": self.bad_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        # Checkpoints written before the counter was named for its unit call it chars_seen.
        self.tokens_seen = int(state["tokens_seen"] if "tokens_seen" in state else state["chars_seen"])
        self.bad_streak, self.bad_total = int(state["bad_streak"]), int(state["bad_total"])
        self.last_saved = self.iteration


@dataclass
class Run:
    cfg: Config
    info: D.DistInfo
    corpus: Corpus
    model: torch.nn.Module       # what forward/backward go through (DDP and/or compiled)
    raw_model: GPT               # the plain module whose weights we save
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: WindowSampler
    objective: Objective
    run_dir: Path
    state: RunState
    metrics: MetricBuffer

    def state_dict(self) -> dict[str, Any]:
        """What every rank holds alike: settings, shapes, vocabulary, weights, optimizer, scaler,
        objective."""
        return {"kind": self.objective.kind, **self.state.state_dict(), "config": self.cfg.to_dict(),
                "model_config": vars(self.raw_model.config).copy(),
                "vocab": char_vocabulary(self.corpus.tokenizer),
                "tokenizer": self.corpus.tokenizer.identity.to_dict(),
                "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "objective": self.objective.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        self.objective.load_state_dict(saved["objective"])
        self.state.load_state_dict(saved)

    def rank_state_dict(self) -> dict[str, Any]:
        """What differs between ranks: RNGs, the data sampler, the not yet logged metric sums (each rank
        averages its own before the all-reduce at the next log) and the objective's own (the KL sums its
        controller has not used yet)."""
        return {"rng": capture_rng(), "sampler": self.sampler.state_dict(), **self.metrics.state_dict(),
                "objective": self.objective.rank_state_dict()}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(state["rng"])
        self.sampler.load_state_dict(state["sampler"])
        self.metrics.load_state_dict(state)
        self.objective.load_rank_state_dict(state.get("objective", {}))  # absent from older checkpoints
