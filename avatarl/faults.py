"""Fault-injection hooks that the reliability tests switch on through the environment (off by default)."""

from __future__ import annotations

import os
import time
from typing import Any

BAD_ITERATIONS_ENV = "AVATARL_TEST_NAN_ITERS"  # "3,5-8" poisons the loss at those iterations
SLOW_WRITE_ENV = "AVATARL_TEST_SLOW_WRITE"  # seconds spent writing each checkpoint file, in 64 KiB pieces
SLOW_PIECE = 64 << 10


def bad_iterations() -> frozenset[int]:
    """The iterations whose loss AVATARL_TEST_NAN_ITERS turns into NaN (empty when unset)."""
    spec = os.environ.get(BAD_ITERATIONS_ENV, "").strip()
    chosen: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        low, _, high = part.partition("-")
        chosen.update(range(int(low), int(high or low) + 1))
    return frozenset(chosen)


def write_slowly_if_asked(handle: Any, blobs: list[bytes]) -> None:
    """Write the blobs; with AVATARL_TEST_SLOW_WRITE, in 64 KiB pieces spread over that many seconds,
    so a test can kill the writer in the middle of a checkpoint."""
    slow = float(os.environ.get(SLOW_WRITE_ENV, "0") or 0)
    total = sum(len(blob) for blob in blobs)
    for blob in blobs:
        if slow <= 0:
            handle.write(blob)
            continue
        for start in range(0, len(blob), SLOW_PIECE):
            piece = blob[start:start + SLOW_PIECE]
            handle.write(piece)
            handle.flush()
            time.sleep(slow * len(piece) / total)
