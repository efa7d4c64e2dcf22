"""The training device: which one (DEVICE), whether it can run the settings, and the autocast dtype."""

from __future__ import annotations

import logging

import torch

from avatarl.config import Config, ConfigError
from avatarl.config_schema import AmpDtype, DeviceKind

log = logging.getLogger(__name__)


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """DEVICE=auto|cpu|cuda as a torch.device; under torchrun each local rank gets its own GPU."""
    if preference == DeviceKind.CPU or (preference == DeviceKind.AUTO and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def check_device(cfg: Config, device: torch.device, world_size: int) -> None:
    """Problems only visible at run time, reported before any model is built."""
    if cfg.run.device == DeviceKind.CUDA and not torch.cuda.is_available():
        raise ConfigError(["DEVICE=cuda but no CUDA GPU is visible: use DEVICE=auto or DEVICE=cpu, or run "
                           "on a GPU host (docker: --gpus all)."])
    if world_size > 1 and cfg.launch.n_gpus != world_size and device.type == "cuda":
        log.warning("N_GPUS=%d but torchrun started %d processes: trusting torchrun.",
                    cfg.launch.n_gpus, world_size)


def mixed_precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full float32 (always on CPU)."""
    if device.type != "cuda" or not cfg.optim.use_amp:
        return None
    return torch.bfloat16 if cfg.optim.amp_dtype == AmpDtype.BFLOAT16 else torch.float16
