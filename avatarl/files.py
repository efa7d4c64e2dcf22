"""File primitives that checkpoints, the heartbeat, the corpus and prepared data share: fsync, an atomic
write, and a file's sha256 (no torch here, so `avatarl prepare`'s workers start fast)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory so that the renames in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(handle: Any, blobs: list[bytes]) -> None:
    for blob in blobs:
        handle.write(blob)


def atomic_write(path: Path, blobs: list[bytes],
                 write: Callable[[Any, list[bytes]], None] = _write_all) -> None:
    """Write blobs to `path` so that readers only ever see the old or the complete new file.

    A temporary file beside `path` is written with `write`, fsynced and renamed over `path`, and the
    directory is fsynced so the rename survives a power loss. `write` puts the blobs into the open
    file (the reliability tests pass one that writes slowly, to kill a writer mid-write).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle, blobs)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
