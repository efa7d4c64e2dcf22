"""Saving a Run as one checkpoint and restoring it, so an interrupted run continues bit-identically.

A checkpoint is the run's `state_dict()` (alike on every rank) plus every rank's `rank_state_dict()`
(RNGs, data sampler, unlogged metric sums); rank 0 writes it. Restoring refuses a checkpoint of
another model shape, vocabulary or algorithm, with the list of differences.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from avatarl import distributed as D
from avatarl.checkpoint import (
    CheckpointError,
    changed_settings,
    incompatible_settings,
    load_checkpoint,
    save_checkpoint,
    set_aside_newer,
)
from avatarl.data.tokenizers import vocabulary_difference
from avatarl.exit_codes import first_line
from avatarl.run import Run

log = logging.getLogger("avatarl")


def save_run(run: Run) -> Path | None:
    """Collective: every rank contributes its rank state, rank 0 writes the file, and every rank raises
    CheckpointError when that write failed (e.g. a full disk), so no rank trains on alone."""
    state = run.state
    rank_states = D.gather_to_all(run.rank_state_dict())
    if state.last_saved == state.iteration:
        return None
    state.last_saved = state.iteration
    path, error = None, None
    if run.info.is_main:
        started = time.perf_counter()
        try:
            path = save_checkpoint(run.run_dir, state.iteration, {**run.state_dict(), "rank_states": rank_states},
                                   run.cfg.run.keep_checkpoints)
            log.info("Saved %s in %.2fs", path.name, time.perf_counter() - started)
        except (CheckpointError, OSError) as err:
            error = err if isinstance(err, CheckpointError) else CheckpointError(f"Could not save a checkpoint: {err}")
    if D.any_rank(error is not None, run.info.device):
        raise error or CheckpointError("Rank 0 could not save the checkpoint (see its error); stopping.")
    return path


def shape_differences(saved: dict[str, Any], run: Run) -> list[str]:
    """Why the checkpoint cannot be loaded into this run's model and objective; empty when it can."""
    problems = incompatible_settings(saved["config"], run.cfg.to_dict())
    vocabulary = vocabulary_difference(saved, run.corpus.tokenizer)
    if vocabulary:
        problems.append(f"vocabulary: checkpoint and now differ, {vocabulary} (DATA_PATH, TOKENIZER)")
    if not problems:  # a backstop for shapes not named by a setting (e.g. REFEREE_N_EMB of a referee run)
        current = vars(run.raw_model.config)
        problems = [f"model {name}: checkpoint {saved['model_config'].get(name)!r}, now {current[name]!r}"
                    for name in ("vocab_size", "n_layer", "n_head", "n_emb")
                    if saved["model_config"].get(name) != current[name]]
    if saved.get("kind") != run.objective.name:
        problems.append(f"run kind: checkpoint {saved.get('kind')!r}, now {run.objective.name!r}")
    return problems


def restore_run(run: Run, path: Path) -> None:
    """Load `path` (rank 0's choice, the same on every rank) into a freshly built run, refusing checkpoints
    of another model or algorithm. Collective: a rank that cannot read the file stops every rank."""
    if not run.info.is_distributed:
        saved = load_checkpoint(path, map_location=run.info.device)
    else:
        try:
            saved, problem = load_checkpoint(path, map_location=run.info.device), None
        except (CheckpointError, OSError) as err:
            saved, problem = {}, first_line(err)
        D.require_on_every_rank(problem, run.info, f"RESUME: cannot read the checkpoint {path} that rank 0 chose "
                                "(every rank must see CHECKPOINT_DIR as rank 0 does)")
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
    run.load_state_dict(saved)
    rank_states = saved["rank_states"]
    if len(rank_states) == run.info.world_size:
        run.load_rank_state_dict(rank_states[run.info.rank])
    else:
        log.warning("The checkpoint was written by %d ranks, this run has %d: data order is re-seeded.",
                    len(rank_states), run.info.world_size)
    D.print0(f"[avatarl] resumed from {path} at iteration {run.state.iteration} ({run.state.chars_seen} chars seen)")
