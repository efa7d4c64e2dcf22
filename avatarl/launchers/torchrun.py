"""`avatarl launch`: torchrun whose workers, not torchrun itself, receive the stop signals."""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from avatarl.signals import forwarding_signals, send

log = logging.getLogger("avatarl")

PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies (Linux)


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, read from /proc (Linux)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return sorted(children)


def _terminate_with_parent() -> None:
    """In the torchrun child: receive SIGTERM if the launcher dies, so workers still checkpoint."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def launch_torchrun(torchrun_args: Sequence[str]) -> int:
    """Run `python -m torch.distributed.run TORCHRUN_ARGS` and return its exit code, with clean stops.

    torchrun answers a SIGTERM/SIGINT by forwarding it to its workers, which checkpoint and exit 0, and
    then exits 1 itself whatever they did (torch 2.x re-raises the signal as an error), after killing
    workers that need more than TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds. Here torchrun runs in its own
    session and the signals this process receives go straight to the workers instead: they stop at
    one step, save and exit 0, and torchrun, seeing every worker succeed, exits 0. A second SIGINT
    reaches the workers the same way and aborts them.
    """
    child = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun_args],
                             start_new_session=True, preexec_fn=_terminate_with_parent)

    def to_workers(signum: int) -> None:
        workers = child_pids(child.pid)
        log.warning("Received %s: passing it to %s.", signal.Signals(signum).name,
                    f"the workers {workers}" if workers else "torchrun (no worker started yet)")
        send(workers or [child.pid], signum)

    with forwarding_signals(to_workers):
        code = child.wait()
    return 128 - code if code < 0 else code
