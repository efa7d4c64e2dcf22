"""The run directory: where each file of a run lives, its checks before a run starts, and the heartbeat.

    CHECKPOINT_DIR/RUN_NAME/   the student's run (`avatarl train`); CHECKPOINT_DIR itself without RUN_NAME
        ckpt_<iter>.pt, latest     checkpoints (see checkpoint.py)
        metrics.jsonl              one JSON object per logged step (see tracking.py)
        heartbeat.json             liveness, read by `avatarl health`, Kubernetes and Modal
        .lock                      held by the live trainer
        wandb-id                   the run's wandb id: every restart continues that wandb run (USE_WANDB)
        wandb/                     wandb's own files (USE_WANDB)
        referee.pt                 the exported referee, the default REFEREE_PATH
        referee/                   the referee's own run (`avatarl train-referee`), same layout

A restart with the same CHECKPOINT_DIR and RUN_NAME (a torchrun, Kubernetes or Modal retry runs the same
command) finds the same directory, and RESUME=auto continues it; another RUN_NAME starts another run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from avatarl.checkpoint import list_checkpoints
from avatarl.config import Config, ConfigError
from avatarl.files import atomic_write

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
HEARTBEAT = "heartbeat.json"
WANDB_ID = "wandb-id"
REFEREE_RUN = "referee"
REFEREE_FILE = "referee.pt"


def run_directory(checkpoint_dir: str | os.PathLike, run_name: str = "", role: str = "student") -> Path:
    """CHECKPOINT_DIR/RUN_NAME (CHECKPOINT_DIR when RUN_NAME is empty), or for role "referee" its referee/."""
    root = Path(checkpoint_dir).expanduser() / run_name
    return root / REFEREE_RUN if role == "referee" else root


def run_dir(cfg: Config, role: str = "student") -> Path:
    """The directory of the student run, or (role "referee") of the referee run, that `cfg` names."""
    return run_directory(cfg.run.checkpoint_dir, cfg.run.run_name, role)


def referee_path(cfg: Config) -> Path:
    """REFEREE_PATH, or referee.pt in the run directory when it is empty."""
    return Path(cfg.referee.referee_path or run_dir(cfg) / REFEREE_FILE).expanduser()


def describe_run(cfg: Config, directory: Path) -> str:
    """"Run 'exp1' (/checkpoints/exp1)", or "The run in /checkpoints" without RUN_NAME."""
    return f"Run {cfg.run.run_name!r} ({directory})" if cfg.run.run_name else f"The run in {directory}"


def prepare_run_dir(cfg: Config, role: str) -> Path:
    """The run directory, created and checked writable; RESUME=never refuses one that holds a run."""
    directory = run_dir(cfg, role)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # A name no other process can hold: ranks of several containers that share this directory can
        # have the same pid, and one would delete the other's probe.
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError([f"CHECKPOINT_DIR={cfg.run.checkpoint_dir!r} is not writable ({err.strerror}): "
                           "choose a directory you can write to."]) from None
    existing = list_checkpoints(directory)
    if cfg.run.resume == "never" and existing and not cfg.run.overwrite:
        raise ConfigError([f"RESUME=never but {directory} already holds a run ({existing[0].name}): "
                           "set RESUME=auto to continue it, OVERWRITE=true to start over, or another "
                           "RUN_NAME for a new run."])
    return directory


def clear_run(directory: Path) -> None:
    """OVERWRITE=true: remove the checkpoints, metrics and wandb id of the previous run (the lock holder
    only); the new run gets a wandb run of its own."""
    for stale in list_checkpoints(directory):
        stale.unlink()
    (directory / METRICS).unlink(missing_ok=True)
    (directory / WANDB_ID).unlink(missing_ok=True)


def write_heartbeat(directory: Path, iteration: int, total_iters: int, tokens_per_s: float,
                    finished: bool = False) -> None:
    """Replace heartbeat.json atomically; a failure (full disk) is a warning, the probe will notice."""
    beat = {"iteration": iteration, "time": time.time(), "tokens_per_s": tokens_per_s,
            "total_iters": total_iters, "finished": finished}
    try:
        atomic_write(directory / HEARTBEAT, [json.dumps(beat).encode()])
    except OSError as err:
        log.warning("Could not write %s: %s", directory / HEARTBEAT, err)


def heartbeat_age(directory: Path) -> tuple[float, dict[str, Any]]:
    """Seconds since the last heartbeat in `directory`, and its content; raises OSError/ValueError."""
    beat = json.loads((directory / HEARTBEAT).read_text())
    return time.time() - float(beat["time"]), beat
