"""Process-level concerns of a run: signals, device checks, mixed precision, test hooks, the launcher."""

from __future__ import annotations

import ctypes
import logging
import os
import random
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import numpy as np
import torch

from avatarl.config import Config, ConfigError
from avatarl.distributed import DistInfo

log = logging.getLogger("avatarl")

BAD_ITERATIONS_ENV = "AVATARL_TEST_NAN_ITERS"  # test hook: "3,5-8" poisons the loss at those iterations
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies (Linux)


class StopSignal:
    """First SIGTERM/SIGINT asks for a clean stop after the current step; a second SIGINT aborts.

    The handler only sets a flag (and logs): the loop polls it once per step and all ranks agree on it
    with one all-reduce, so a signal that reaches a single worker still stops every rank at one step.
    """

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
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs, so a checkpoint's RNG states are reproducible too."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, read from /proc (Linux)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return sorted(children)


def _terminate_with_parent() -> None:
    """In the torchrun child: receive SIGTERM if the launcher dies, so workers still checkpoint."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def launch_torchrun(torchrun_args: Sequence[str]) -> int:
    """Run `python -m torch.distributed.run TORCHRUN_ARGS` and return its exit code, with clean stops.

    torchrun answers a SIGTERM/SIGINT by forwarding it to its workers, which checkpoint and exit 0, and
    then exits 1 itself whatever they did (torch 2.x re-raises the signal as an error), after killing
    workers that need more than TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds. Here torchrun runs in its own
    session and the signals this process receives go straight to the workers instead: they stop at
    one step, save and exit 0, and torchrun, seeing every worker succeed, exits 0. A second SIGINT
    reaches the workers the same way and aborts them.
    """
    child = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun_args],
                             start_new_session=True, preexec_fn=_terminate_with_parent)

    def forward(signum: int, frame: FrameType | None) -> None:
        workers = child_pids(child.pid)
        log.warning("Received %s: passing it to %s.", signal.Signals(signum).name,
                    f"the workers {workers}" if workers else "torchrun (no worker started yet)")
        for pid in workers or [child.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - code if code < 0 else code
