"""Exit codes of every avatarl command: the one list that the CLI, the trainer, the launchers and the docs use;
and the one line an error becomes in the messages that go with them."""

from __future__ import annotations

OK = 0           # done, or stopped cleanly with a checkpoint
FAILED = 1       # a check failed (health, a benchmark), or a run ended before its last step
CONFIG = 2       # bad settings, input file or checkpoint: fix the input, a retry cannot help
BAD_STEPS = 3    # MAX_BAD_STEPS non-finite steps in a row: stopped with the last good weights saved
BUSY = 75        # another trainer holds CHECKPOINT_DIR (EX_TEMPFAIL): worth retrying later
ABORTED = 130    # a second Ctrl-C: the step in progress is lost, the newest checkpoint is intact

# What a retry (Modal, Kubernetes) cannot fix: it would fail the same way every time.
NOT_RETRYABLE = (CONFIG, BAD_STEPS)


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, or the name of its type when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
