"""The reliability tests' trainer: `python -m tests.fault_entry ARGS` is `avatarl ARGS` with the faults
that the environment asks for, installed by wrapping avatarl's own functions (avatarl has no test hooks):

    AVATARL_TEST_NAN_ITERS="3,5-8"   the loss of those iterations is NaN (the objective's micro_step, wrapped
                                     for the steps of those iterations)
    AVATARL_TEST_SLOW_WRITE=1.5      each checkpoint file and its `latest` pointer take that many seconds to
                                     write, in 64 KiB pieces, so that a test can kill the writer mid-write

It needs the repository on PYTHONPATH (tests.helpers.start sets it), also in torchrun's workers:
`torchrun ... -m tests.fault_entry train`.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from avatarl import checkpoint, trainer
from avatarl.cli import main as avatarl_main

NAN_ITERS_ENV = "AVATARL_TEST_NAN_ITERS"
SLOW_WRITE_ENV = "AVATARL_TEST_SLOW_WRITE"
SLOW_PIECE = 64 << 10


def iterations(spec: str) -> frozenset[int]:
    """The iterations of a spec such as "3,5-8" (empty for "")."""
    chosen: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        low, _, high = part.partition("-")
        chosen.update(range(int(low), int(high or low) + 1))
    return frozenset(chosen)


def poison_iterations(bad: frozenset[int]) -> None:
    """Make the loss of every micro-step of the iterations in `bad` NaN, by wrapping trainer.train_step
    so that, for those steps only, the objective's micro_step multiplies its loss by NaN."""
    real_step = trainer.train_step

    @functools.wraps(real_step)
    def train_step(run: Any) -> bool:
        if run.state.iteration not in bad:
            return real_step(run)
        objective = run.objective
        own = vars(objective).get("micro_step")  # an instance attribute to put back, or none
        real_micro = objective.micro_step

        def poisoned(*args: Any, **kwargs: Any) -> Any:
            loss, metrics = real_micro(*args, **kwargs)
            return loss * float("nan"), metrics

        objective.micro_step = poisoned
        try:
            return real_step(run)
        finally:
            if own is None:
                del objective.micro_step
            else:
                objective.micro_step = own

    trainer.train_step = train_step


def slow_checkpoint_writes(seconds: float) -> None:
    """Spread the writing of every checkpoint file (and `latest` pointer) over `seconds`, by wrapping the
    atomic write that checkpoint.py calls with one that writes 64 KiB pieces and sleeps in between."""
    real_write = checkpoint.atomic_write

    def write_slowly(handle: Any, blobs: list[bytes]) -> None:
        total = sum(len(blob) for blob in blobs)
        for blob in blobs:
            for start in range(0, len(blob), SLOW_PIECE):
                piece = blob[start:start + SLOW_PIECE]
                handle.write(piece)
                handle.flush()
                time.sleep(seconds * len(piece) / total)

    def atomic_write(path: Path, blobs: list[bytes]) -> None:
        real_write(path, blobs, write_slowly)

    checkpoint.atomic_write = atomic_write


def install(environ: Mapping[str, str]) -> None:
    """The faults that `environ` asks for (none when neither variable is set)."""
    bad = iterations(environ.get(NAN_ITERS_ENV, ""))
    if bad:
        poison_iterations(bad)
    slow = float(environ.get(SLOW_WRITE_ENV, "0") or 0)
    if slow > 0:
        slow_checkpoint_writes(slow)


if __name__ == "__main__":
    install(os.environ)
    sys.exit(avatarl_main())
