"""What a run saves and restores, so an interrupted run continues bit-identically, and its heartbeat."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avatarl import distributed as D
from avatarl.checkpoint import (
    CheckpointError,
    capture_rng,
    changed_settings,
    incompatible_settings,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from avatarl.data import atomic_write_bytes

if TYPE_CHECKING:
    from avatarl.trainer import Run

log = logging.getLogger("avatarl")
HEARTBEAT = "heartbeat.json"


@dataclass
class RunState:
    iteration: int = 0
    chars_seen: int = 0
    bad_streak: int = 0
    bad_total: int = 0
    last_saved: int = -1


def save_run(run: Run) -> Path | None:
    """Collective: every rank contributes its RNG and sampler state; rank 0 writes the file."""
    state = run.state
    rank_states = D.gather_to_all({"rng": capture_rng(), "sampler": run.sampler.state_dict()})
    if state.last_saved == state.iteration:
        return None
    state.last_saved = state.iteration
    if not run.info.is_main:
        return None
    payload: dict[str, Any] = {
        "kind": run.objective.name,
        "iteration": state.iteration,
        "chars_seen": state.chars_seen,
        "bad_streak": state.bad_streak,
        "bad_total": state.bad_total,
        "config": run.cfg.to_dict(),
        "model_config": vars(run.raw_model.config).copy(),
        "vocab": list(run.corpus.vocab.chars),
        "model": run.raw_model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "objective": run.objective.state_dict(),
        "metric_sums": {name: value.cpu() for name, value in run.metrics.sums.items()},
        "metric_counts": dict(run.metrics.counts),
        "rank_states": rank_states,
    }
    started = time.perf_counter()
    path = save_checkpoint(run.run_dir, state.iteration, payload, run.cfg.keep_checkpoints)
    log.info("Saved %s in %.2fs", path.name, time.perf_counter() - started)
    return path


def restore_run(run: Run, path: Path) -> None:
    """Load `path` into a freshly built run, refusing checkpoints of another model or algorithm."""
    saved = load_checkpoint(path, map_location=run.info.device)
    current = run.cfg.to_dict()
    problems = incompatible_settings(saved["config"], current, saved["vocab"], list(run.corpus.vocab.chars))
    if saved.get("kind") != run.objective.name:
        problems.append(f"run kind: checkpoint {saved.get('kind')!r}, now {run.objective.name!r}")
    if problems:
        raise CheckpointError(f"Cannot resume from {path}: " + "; ".join(problems) +
                              ". Use another CHECKPOINT_DIR, or RESUME=never OVERWRITE=true to start over.")
    for change in changed_settings(saved["config"], current):
        log.info("Setting changed since the checkpoint: %s", change)
    run.raw_model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scaler.load_state_dict(saved["scaler"])
    run.objective.load_state_dict(saved["objective"])
    state = run.state
    state.iteration, state.chars_seen = saved["iteration"], saved["chars_seen"]
    state.bad_streak, state.bad_total = saved["bad_streak"], saved["bad_total"]
    state.last_saved = state.iteration
    run.metrics.sums = {name: value.to(run.info.device) for name, value in saved["metric_sums"].items()}
    run.metrics.counts = dict(saved["metric_counts"])
    rank_states = saved["rank_states"]
    if len(rank_states) == run.info.world_size:
        restore_rng(rank_states[run.info.rank]["rng"])
        run.sampler.load_state_dict(rank_states[run.info.rank]["sampler"])
    else:
        log.warning("The checkpoint was written by %d ranks, this run has %d: data order is re-seeded.",
                    len(rank_states), run.info.world_size)
    D.print0(f"[avatarl] resumed from {path} at iteration {state.iteration} ({state.chars_seen} chars seen)")


def write_heartbeat(run: Run, chars_per_s: float, finished: bool = False) -> None:
    beat = {"iteration": run.state.iteration, "time": time.time(), "chars_per_s": chars_per_s,
            "total_iters": run.cfg.total_iters, "finished": finished}
    atomic_write_bytes(run.run_dir / HEARTBEAT, json.dumps(beat).encode())


def heartbeat_age(directory: Path) -> tuple[float, dict[str, Any]]:
    """Seconds since the last heartbeat in `directory`, and its content; raises OSError/ValueError."""
    beat = json.loads((directory / HEARTBEAT).read_text())
    return time.time() - float(beat["time"]), beat
