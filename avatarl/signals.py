"""Stop signals: the trainer's clean-stop flag, and the forwarding that launchers do for their children.

SIGTERM/SIGINT mean "finish the step, save a checkpoint, exit 0" everywhere: in the trainer itself
(`StopSignal`), and in the two launchers that run it as a child process (torchrun through `avatarl
launch`, and Modal's container function), which pass the signal on with `forwarding_signals`.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """First SIGTERM/SIGINT asks for a clean stop after the current step; a second SIGINT aborts.

    The handler only sets a flag (and logs): the loop polls it once per step and all ranks agree on it
    with one all-reduce, so a signal that reaches a single worker still stops every rank at one step.
    """

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Received %s: finishing the current step, then saving a checkpoint "
                    "(press Ctrl-C again to abort).", signal.Signals(signum).name)

    def __enter__(self) -> StopSignal:
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def send(pids: Sequence[int], signum: int) -> None:
    """Send `signum` to each pid, ignoring the ones that already ended."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


@contextmanager
def forwarding_signals(forward: Callable[[int], None],
                       signums: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """While inside, SIGTERM/SIGINT call `forward(signum)` instead of stopping this process; the previous
    handlers come back on exit. Handlers can only be set from the main thread; elsewhere pass signums=()."""
    def handler(signum: int, frame: FrameType | None) -> None:
        forward(signum)

    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
