"""Saving a Run as one checkpoint and restoring it, so an interrupted run continues bit-identically.

A checkpoint is the run's `state_dict()` (alike on every rank) plus every rank's `rank_state_dict()`
(RNGs, data sampler, unlogged metric sums); rank 0 writes it. Restoring refuses a checkpoint of
another model shape, vocabulary or algorithm, with the list of differences; it lists the other settings
changed since the checkpoint (at WARNING those that change what the run learns). A run resumed at its
TOTAL_ITERS is finished: it says so, and how to start another run.
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
from avatarl.config import section_of
from avatarl.data.tokenizers import vocabulary_difference
from avatarl.errors import first_line
from avatarl.run import Run
from avatarl.run_dir import describe_run, write_heartbeat

log = logging.getLogger(__name__)

# Where the run lives, not what it learns: a run moved or resumed under another path is the same run.
LOCATION_SETTINGS = ("checkpoint_dir", "run_name", "resume", "overwrite")
# What a run learns: a change of one of these makes the resumed run another experiment.
LEARNING_SECTIONS = ("data", "model", "optim", "grpo", "avatarl", "referee")
LEARNING_RUN_SETTINGS = ("algorithm", "seed")


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
            saved = {**run.state_dict(), "rank_states": rank_states}
            path = save_checkpoint(run.run_dir, state.iteration, saved, run.cfg.run.keep_checkpoints)
            log.info("Saved %s in %.2fs", path.name, time.perf_counter() - started)
        except (CheckpointError, OSError) as err:
            error = (err if isinstance(err, CheckpointError)
                     else CheckpointError(f"Could not save a checkpoint: {err}"))
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
    if saved.get("kind") != run.objective.kind:
        problems.append(f"run kind: checkpoint {saved.get('kind')!r}, now {run.objective.kind!r}")
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
        D.require_on_every_rank(problem, run.info,
                                f"RESUME: cannot read the checkpoint {path} that rank 0 chose "
                                "(every rank must see CHECKPOINT_DIR as rank 0 does)")
    problems = shape_differences(saved, run)
    if problems:
        raise CheckpointError(f"Cannot resume from {path}, the settings differ: " + "; ".join(problems) +
                              ". Restore those settings, give the new run another RUN_NAME, or RESUME=never "
                              "OVERWRITE=true to start over.")
    if run.info.is_main:
        report_changed_settings(saved, run)
        for moved in set_aside_newer(run.run_dir, saved["iteration"]):
            log.warning("Set aside %s: it is newer than the checkpoint this run continues from.", moved.name)
    run.load_state_dict(saved)
    rank_states = saved["rank_states"]
    if len(rank_states) == run.info.world_size:
        run.load_rank_state_dict(rank_states[run.info.rank])
    else:
        log.warning("The checkpoint was written by %d ranks, this run has %d: data order is re-seeded.",
                    len(rank_states), run.info.world_size)
    D.print0(f"[avatarl] resumed from {path} at iteration {run.state.iteration} "
             f"({run.state.tokens_seen} tokens seen)")


def learning_settings() -> set[str]:
    """The settings (field names) that change what a run learns."""
    owner = section_of()
    learning = {name for name, section in owner.items() if section in LEARNING_SECTIONS}
    return learning | set(LEARNING_RUN_SETTINGS)


def report_changed_settings(saved: dict[str, Any], run: Run) -> None:
    """Rank 0: each setting changed since the checkpoint, at WARNING when it changes what the run learns
    (then with a line on how a new experiment gets its own directory), at INFO otherwise (logging,
    intervals, devices); where the run lives (CHECKPOINT_DIR, RUN_NAME, RESUME, OVERWRITE) is not listed."""
    current = {k: v for k, v in run.cfg.to_dict().items() if k not in LOCATION_SETTINGS}
    learning = learning_settings()
    changed = changed_settings(saved["config"], {k: v for k, v in current.items() if k in learning})
    for change in changed:
        log.warning("Setting changed since the checkpoint: %s", change)
    for change in changed_settings(saved["config"], {k: v for k, v in current.items() if k not in learning}):
        log.info("Setting changed since the checkpoint: %s", change)
    if changed:
        log.warning("%s continues from iteration %d with %d changed setting(s) above; for a separate "
                    "experiment give it another RUN_NAME (its own directory) instead.",
                    describe_run(run.cfg, run.run_dir), saved["iteration"], len(changed))


def report_finished(run: Run) -> None:
    """Rank 0, when the run resumed at or past TOTAL_ITERS: the heartbeat says finished, and one warning
    line says so and how to start another run."""
    if not run.info.is_main:
        return
    write_heartbeat(run.run_dir, run.state.iteration, run.cfg.optim.total_iters, 0.0, finished=True)
    log.warning("%s is finished: it trained to iteration %d (TOTAL_ITERS=%d), nothing to do. To start "
                "another run set a new RUN_NAME; to train this one further raise TOTAL_ITERS; to redo it set "
                "RESUME=never OVERWRITE=true.", describe_run(run.cfg, run.run_dir), run.state.iteration,
                run.cfg.optim.total_iters)
