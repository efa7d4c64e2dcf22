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
    atomic_write,
    capture_rng,
    changed_settings,
    incompatible_settings,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    set_aside_newer,
)

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
    """Collective: every rank contributes its `rank_state`, rank 0 writes the file, and every
    rank raises CheckpointError when that write failed (e.g. a full disk), so no rank trains on alone."""
    state = run.state
    rank_states = D.gather_to_all(rank_state(run))
    if state.last_saved == state.iteration:
        return None
    state.last_saved = state.iteration
    path, error = None, None
    if run.info.is_main:
        started = time.perf_counter()
        try:
            path = save_checkpoint(run.run_dir, state.iteration, checkpoint_payload(run, rank_states),
                                   run.cfg.keep_checkpoints)
            log.info("Saved %s in %.2fs", path.name, time.perf_counter() - started)
        except (CheckpointError, OSError) as err:
            error = err if isinstance(err, CheckpointError) else CheckpointError(f"Could not save a checkpoint: {err}")
    if D.any_rank(error is not None, run.info.device):
        raise error or CheckpointError("Rank 0 could not save the checkpoint (see its error); stopping.")
    return path


def rank_state(run: Run) -> dict[str, Any]:
    """What differs between ranks: RNGs, the data sampler, and the not yet logged metric sums (each
    rank averages its own before the all-reduce at the next log, which also feeds the KL controller)."""
    return {"rng": capture_rng(), "sampler": run.sampler.state_dict(),
            "metric_sums": {name: value.cpu() for name, value in run.metrics.sums.items()},
            "metric_counts": dict(run.metrics.counts)}


def checkpoint_payload(run: Run, rank_states: list[object]) -> dict[str, Any]:
    state = run.state
    return {
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
        "rank_states": rank_states,
    }


def shape_differences(saved: dict[str, Any], run: Run) -> list[str]:
    """Why the checkpoint cannot be loaded into this run's model and objective; empty when it can."""
    problems = incompatible_settings(saved["config"], run.cfg.to_dict(), saved["vocab"],
                                     list(run.corpus.vocab.chars))
    if not problems:  # a backstop for shapes not named by a setting (e.g. REFEREE_N_EMB of a referee run)
        current = vars(run.raw_model.config)
        problems = [f"model {name}: checkpoint {saved['model_config'].get(name)!r}, now {current[name]!r}"
                    for name in ("vocab_size", "n_layer", "n_head", "n_emb")
                    if saved["model_config"].get(name) != current[name]]
    if saved.get("kind") != run.objective.name:
        problems.append(f"run kind: checkpoint {saved.get('kind')!r}, now {run.objective.name!r}")
    return problems


def restore_run(run: Run, path: Path) -> None:
    """Load `path` into a freshly built run, refusing checkpoints of another model or algorithm."""
    saved = load_checkpoint(path, map_location=run.info.device)
    problems = shape_differences(saved, run)
    if problems:
        raise CheckpointError(f"Cannot resume from {path}, the settings differ: " + "; ".join(problems) +
                              ". Restore those settings, use another CHECKPOINT_DIR, or RESUME=never "
                              "OVERWRITE=true to start over.")
    for change in changed_settings(saved["config"], run.cfg.to_dict()):
        log.info("Setting changed since the checkpoint: %s", change)
    if run.info.is_main:
        for moved in set_aside_newer(run.run_dir, saved["iteration"]):
            log.warning("Set aside %s: it is newer than the checkpoint this run continues from.", moved.name)
    run.raw_model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scaler.load_state_dict(saved["scaler"])
    run.objective.load_state_dict(saved["objective"])
    state = run.state
    state.iteration, state.chars_seen = saved["iteration"], saved["chars_seen"]
    state.bad_streak, state.bad_total = saved["bad_streak"], saved["bad_total"]
    state.last_saved = state.iteration
    rank_states = saved["rank_states"]
    if len(rank_states) == run.info.world_size:
        mine = rank_states[run.info.rank]
        restore_rng(mine["rng"])
        run.sampler.load_state_dict(mine["sampler"])
        run.metrics.sums = {name: value.to(run.info.device) for name, value in mine["metric_sums"].items()}
        run.metrics.counts = dict(mine["metric_counts"])
    else:
        log.warning("The checkpoint was written by %d ranks, this run has %d: data order is re-seeded.",
                    len(rank_states), run.info.world_size)
    D.print0(f"[avatarl] resumed from {path} at iteration {state.iteration} ({state.chars_seen} chars seen)")


def write_heartbeat(run: Run, chars_per_s: float, finished: bool = False) -> None:
    """Replace heartbeat.json atomically; a failure (full disk) is a warning, the probe will notice."""
    beat = {"iteration": run.state.iteration, "time": time.time(), "chars_per_s": chars_per_s,
            "total_iters": run.cfg.total_iters, "finished": finished}
    try:
        atomic_write(run.run_dir / HEARTBEAT, [json.dumps(beat).encode()])
    except OSError as err:
        log.warning("Could not write %s: %s", run.run_dir / HEARTBEAT, err)


def heartbeat_age(directory: Path) -> tuple[float, dict[str, Any]]:
    """Seconds since the last heartbeat in `directory`, and its content; raises OSError/ValueError."""
    beat = json.loads((directory / HEARTBEAT).read_text())
    return time.time() - float(beat["time"]), beat
