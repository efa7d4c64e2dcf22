"""Process-level concerns of a run: signals, device checks, mixed precision, test hooks."""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType

import torch

from avatarl.config import Config, ConfigError
from avatarl.distributed import DistInfo

log = logging.getLogger("avatarl")

BAD_ITERATIONS_ENV = "AVATARL_TEST_NAN_ITERS"  # test hook: "3,5-8" poisons the loss at those iterations


class StopSignal:
    """First SIGTERM/SIGINT asks for a clean stop after the current step; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Received %s: finishing the current step, then saving a checkpoint "
                    "(press Ctrl-C again to abort).", signal.Signals(signum).name)

    def __enter__(self) -> StopSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def check_runtime(cfg: Config, info: DistInfo) -> None:
    """Problems only visible at run time, reported before any model is built."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["DEVICE=cuda but no CUDA GPU is visible: use DEVICE=auto or DEVICE=cpu, or run "
                           "on a GPU host (docker: --gpus all)."])
    if info.world_size > 1 and cfg.n_gpus != info.world_size and info.device.type == "cuda":
        log.warning("N_GPUS=%d but torchrun started %d processes: trusting torchrun.", cfg.n_gpus, info.world_size)


def mixed_precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full float32 (always on CPU)."""
    if device.type != "cuda" or not cfg.use_amp:
        return None
    return torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16


def bad_iterations_from_env() -> frozenset[int]:
    spec = os.environ.get(BAD_ITERATIONS_ENV, "").strip()
    chosen: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        low, _, high = part.partition("-")
        chosen.update(range(int(low), int(high or low) + 1))
    return frozenset(chosen)
