"""Exit codes of every avatarl command: the one list that the errors (errors.py), the trainer, the
launchers and the docs use."""

from __future__ import annotations

OK = 0           # done, or stopped cleanly with a checkpoint
FAILED = 1       # a check failed (health, a benchmark), a run ended before its last step, a rank was lost
CONFIG = 2       # bad settings, input file or checkpoint: fix the input, a retry cannot help
BAD_STEPS = 3    # MAX_BAD_STEPS non-finite steps in a row: stopped with the last good weights saved
BUSY = 75        # another trainer holds CHECKPOINT_DIR (EX_TEMPFAIL): worth retrying later
ABORTED = 130    # a second Ctrl-C: the step in progress is lost, the newest checkpoint is intact

# What a retry (Modal, Kubernetes) cannot fix: it would fail the same way every time.
NOT_RETRYABLE = (CONFIG, BAD_STEPS)
