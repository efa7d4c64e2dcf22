"""User errors, and the one place where they become exit codes.

Library code raises an `AvatarlError`: one line per problem, saying what to fix, and the exit code it
ends the command with (the codes are listed in exit_codes.py). The commands' entry points (`avatarl`,
`python -m avatarl`, train_generic.py, the Modal prepare launcher) run their work in `run_entry`, which
prints each line as `error: LINE` on stderr, without a traceback, and returns that code.

    ConfigError          2   a setting is wrong (and the files a setting names: InputError)
    CheckpointError      2   a checkpoint cannot be read, written or resumed from
    RunDirectoryBusy    75   another trainer holds CHECKPOINT_DIR: worth retrying later
    NonFiniteSteps       3   MAX_BAD_STEPS non-finite steps in a row; the last good weights are saved
    PeerLost             1   a collective lost a rank of the job (each surviving rank says which)
    Aborted            130   a second Ctrl-C
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from avatarl import exit_codes


class AvatarlError(Exception):
    """A problem the user can act on: `problems` holds one line each, `exit_code` ends the command."""

    exit_code = exit_codes.FAILED
    # Under torchrun every rank raises the same error (the ranks agree on what they refuse), so only rank 0
    # prints it; an error whose text differs by rank (PeerLost) is printed by every rank.
    every_rank = False

    def __init__(self, problems: str | Sequence[str]):
        lines = problems.splitlines() if isinstance(problems, str) else [str(line) for line in problems]
        self.problems = [line for line in lines if line.strip()] or [type(self).__name__]
        # One string argument: a copy made by pickle (a worker process of `avatarl prepare`) is rebuilt
        # from it with the same problems.
        super().__init__("\n".join(self.problems))


class ConfigError(AvatarlError, ValueError):
    """Bad configuration: one actionable line per problem."""

    exit_code = exit_codes.CONFIG


class InputError(ConfigError):
    """An input file or directory (a corpus source, prepared data) that cannot be used as it is."""


class CheckpointError(AvatarlError, RuntimeError):
    """A checkpoint that cannot be read, trusted, written or resumed from."""

    exit_code = exit_codes.CONFIG


class RunDirectoryBusy(CheckpointError):
    """Another live trainer holds CHECKPOINT_DIR: worth retrying later (a pod still terminating)."""

    exit_code = exit_codes.BUSY


class NonFiniteSteps(AvatarlError):
    """MAX_BAD_STEPS non-finite steps in a row: the run stopped with its last good weights saved."""

    exit_code = exit_codes.BAD_STEPS


class PeerLost(AvatarlError):
    """A collective failed because a rank died or hung past DIST_TIMEOUT_S."""

    exit_code = exit_codes.FAILED
    every_rank = True


class Aborted(AvatarlError):
    """A second interrupt ended the command without waiting for what it was doing."""

    exit_code = exit_codes.ABORTED


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, or the name of its type when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def print_error(error: AvatarlError) -> None:
    """`error: LINE` on stderr for each of the error's lines; off rank 0 only for an `every_rank` error."""
    if not error.every_rank and os.environ.get("RANK", "0") != "0":
        return
    for line in error.problems:
        print(f"error: {line}", file=sys.stderr)
    sys.stderr.flush()


def run_entry(command: Callable[[], int | None]) -> int:
    """Run one command and return its exit code (None counts as 0): an AvatarlError it raises is printed
    by `print_error` and ends it with the error's code; an interrupt (Ctrl-C) ends it with 130."""
    try:
        code = command()
    except AvatarlError as err:
        print_error(err)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr, flush=True)
        return exit_codes.ABORTED
    return exit_codes.OK if code is None else code
