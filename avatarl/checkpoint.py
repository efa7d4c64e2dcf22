"""Crash-safe checkpoints: atomic writes, a checksum in every file, newest-valid lookup, retention.

File layout: `ckpt_<iter:08d>.pt` = one header line `AVATARL-CKPT 1 <sha256 of payload>\n` followed by
the `torch.save` payload. A file is written to a temporary name in the same directory, fsynced and
renamed, then the small `latest` pointer is replaced the same way, so a crash at any instant leaves
the previous checkpoint complete; the temporary file of a killed writer is removed by the next save.
Loading verifies the checksum and uses `weights_only=True` only: a file holding anything but tensors
and plain values is refused (never skipped: someone wrote a valid checksum around it).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import logging
import os
import pickle
import re
import socket
from pathlib import Path
from typing import Any

import torch

from avatarl.errors import CheckpointError, RunDirectoryBusy, first_line
from avatarl.files import atomic_write

log = logging.getLogger(__name__)

MAGIC = b"AVATARL-CKPT 1 "
NAME_PATTERN = re.compile(r"^ckpt_(\d{8})\.pt$")
# Temporary files of atomic_write for checkpoints and the pointer: left behind only by a killed writer.
TEMP_PATTERN = re.compile(r"^\.(ckpt_\d{8}\.pt|latest)\..+\.tmp$")
LATEST = "latest"
# Settings whose change makes a checkpoint unusable for the current model; the rest may change on resume.
SHAPE_SETTINGS = ("n_layer", "n_head", "n_emb", "algorithm")


def checkpoint_name(iteration: int) -> str:
    return f"ckpt_{iteration:08d}.pt"


def _atomic_write_or_explain(path: Path, blobs: list[bytes]) -> None:
    """atomic_write, turning a full disk into a CheckpointError that says what is still safe."""
    try:
        atomic_write(path, blobs)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        size = sum(len(blob) for blob in blobs)
        intact = find_resume_checkpoint(path.parent, quiet=True)
        raise CheckpointError(f"Out of disk space writing {path} ({size / 1e6:.1f} MB). The newest valid "
                              f"checkpoint, {intact.name if intact else '(none)'}, is intact; free space in "
                              f"{path.parent} or lower KEEP_CHECKPOINTS.") from err


def write_checkpoint_file(path: Path, state: dict[str, Any]) -> int:
    """Serialise `state` with a checksum header and write it atomically to `path`. Returns bytes written."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    _atomic_write_or_explain(path, [header, payload])
    return len(header) + len(payload)


def save_checkpoint(directory: Path, iteration: int, state: dict[str, Any], keep: int) -> Path:
    """Atomically write checkpoint `iteration`, point `latest` at it, then prune to `keep` files."""
    path = directory / checkpoint_name(iteration)
    write_checkpoint_file(path, state)
    _atomic_write_or_explain(directory / LATEST, [path.name.encode() + b"\n"])
    prune(directory, keep, newest_valid=path)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, newest iteration first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if NAME_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(NAME_PATTERN.match(p.name).group(1)), reverse=True)


def prune(directory: Path, keep: int, newest_valid: Path | None = None) -> None:
    """Delete all but the `keep` newest checkpoints, and temporary files of killed writers.

    The newest valid checkpoint is never deleted; pass it as `newest_valid` when the caller just
    wrote it, which saves reading it back. Only the lock holder may call this.
    """
    files = list_checkpoints(directory)
    if newest_valid is None:
        newest_valid = next((p for p in files if verify(p) is None), None)
    for stale in files[keep:]:
        if stale != newest_valid:
            stale.unlink(missing_ok=True)
    for leftover in directory.iterdir():
        if TEMP_PATTERN.match(leftover.name):
            leftover.unlink(missing_ok=True)


def set_aside_newer(directory: Path, iteration: int) -> list[Path]:
    """Rename checkpoints newer than `iteration` to `<name>.abandoned`, returning the new names.

    After resuming from an older checkpoint (RESUME=PATH), newer files belong to a timeline that this
    run no longer continues: left in place, RESUME=auto would pick them after the next crash and
    pruning would delete this run's own checkpoints as the oldest ones.
    """
    moved = []
    for path in list_checkpoints(directory):
        if int(NAME_PATTERN.match(path.name).group(1)) > iteration:
            target = path.with_name(path.name + ".abandoned")
            os.replace(path, target)
            moved.append(target)
    return moved


def _read_verified(path: Path) -> bytes:
    raw = path.read_bytes()
    newline = raw.find(b"\n")
    if not raw.startswith(MAGIC) or newline < 0:
        raise CheckpointError(f"{path} is not an avatarl checkpoint (bad header).")
    expected = raw[len(MAGIC):newline].decode(errors="replace")
    payload = raw[newline + 1:]
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise CheckpointError(f"{path} is corrupted or truncated: checksum {actual[:12]}… != recorded "
                              f"{expected[:12]}….")
    return payload


def verify(path: Path) -> str | None:
    """None when the file is a complete checkpoint, else the reason it is not."""
    try:
        _read_verified(path)
    except (OSError, CheckpointError) as err:
        return str(err)
    return None


def _unpickling_reason(err: Exception) -> str:
    """The line of torch's weights_only error that names the refused object (not its advice to disable it)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(err).__name__])[0]


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify the checksum, then unpickle with weights_only=True (tensors and plain containers only).

    A file that passes the checksum but holds other objects was not written by avatarl (whoever planted
    it also wrote the checksum): it is refused, never executed, and never silently skipped.
    """
    payload = _read_verified(path)
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"Refusing to load {path}: it contains objects other than tensors and plain "
                              f"values, which could run code when unpickled ({_unpickling_reason(err)}). "
                              "Delete the file, or set RESUME to a checkpoint you trust.") from None
    except (RuntimeError, KeyError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path} has a valid checksum but is not a torch checkpoint "
                              f"({type(err).__name__}: {first_line(err)}).") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not an avatarl checkpoint.")
    return state


def find_resume_checkpoint(directory: Path, quiet: bool = False) -> Path | None:
    """The newest checkpoint that verifies; warns (unless quiet) about each newer one that does not."""
    for path in list_checkpoints(directory):
        problem = verify(path)
        if problem is None:
            return path
        if not quiet:
            log.warning("Skipping checkpoint %s: %s Falling back to an older one.", path.name, problem)
    return None


def resolve_checkpoint_arg(value: str, directory: Path) -> Path:
    """`latest`/empty = newest valid checkpoint in `directory`; otherwise a file path."""
    if value in ("", LATEST):
        found = find_resume_checkpoint(directory)
        if found is None:
            raise CheckpointError(f"No valid checkpoint in {directory}.")
        return found
    path = Path(value).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path}: no such file.")
    return path


def incompatible_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The SHAPE_SETTINGS that differ between a checkpoint's config and the current one."""
    return [f"{name.upper()}: checkpoint {saved.get(name)!r}, now {current[name]!r}"
            for name in SHAPE_SETTINGS if saved.get(name) != current[name]]


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{name.upper()}: {saved[name]!r} -> {value!r}" for name, value in current.items()
            if name in saved and saved[name] != value and name not in SHAPE_SETTINGS]


class RunLock:
    """An exclusive flock on CHECKPOINT_DIR/.lock; the kernel releases it when the holder dies."""

    def __init__(self, directory: Path):
        self.path = directory / ".lock"
        self.handle: Any = None

    def acquire(self) -> None:
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise RunDirectoryBusy(f"CHECKPOINT_DIR={self.path.parent} is in use by a running trainer "
                                   f"({owner}): stop it or choose another CHECKPOINT_DIR.") from None
        handle.seek(0)
        previous = handle.read().strip()
        if previous:
            log.warning("Taking over the stale lock of a process that is gone (%s).", previous)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
