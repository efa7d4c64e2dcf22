"""`avatarl launch`: torchrun whose workers, not torchrun itself, receive the stop signals, and whose
rendezvous (one node or several, elastic restarts) comes from the settings NNODES, NODE_RANK,
RDZV_ENDPOINT, RDZV_ID, NODE_ADDR, MAX_RESTARTS, DIST_TIMEOUT_S and N_GPUS.

    avatarl launch --standalone -m avatarl train        # one node, a free local port
    NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=10.0.0.1:29400 avatarl launch -m avatarl train   # on each node
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from avatarl.config import Config
from avatarl.config_schema import DeviceKind
from avatarl.errors import ConfigError
from avatarl.signals import forwarding_signals, send

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies (Linux)
# By default the workers of every rendezvous round share the rendezvous's own store, where the keys of
# the previous round (a dead worker's address) are still found: after a restart, a node that rejoined
# first then connects to the dead worker and fails again. Off, rank 0 hosts a new store each round.
FRESH_STORE_EACH_ROUND = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


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


def given(args: Sequence[str], *options: str) -> bool:
    """Whether torchrun's own `args`, those before the training command (`-m MODULE` or a .py script),
    set one of `options`, spelt with '-' or '_', as `--opt value` or `--opt=value`."""
    wanted = {option.replace("_", "-") for option in options}
    for arg in args:
        if arg in ("-m", "--module") or arg.endswith(".py"):
            return False
        if arg.split("=", 1)[0].replace("_", "-") in wanted:
            return True
    return False


def rendezvous_args(cfg: Config, args: Sequence[str]) -> list[str]:
    """torchrun options from the settings, for the ones `args` leave unset: processes per node (N_GPUS),
    restarts (MAX_RESTARTS) and, unless `--standalone` or a rendezvous is given, the c10d rendezvous of
    NNODES nodes at RDZV_ENDPOINT, hosted by node 0, whose joins wait at most DIST_TIMEOUT_S, with this
    node's address NODE_ADDR when it is set."""
    extra = []
    if not given(args, "--nproc-per-node"):
        extra.append(f"--nproc-per-node={cfg.launch.n_gpus}")
    if not given(args, "--max-restarts"):
        extra.append(f"--max-restarts={cfg.distributed.max_restarts}")
    own_rendezvous = given(args, "--standalone", "--rdzv-backend", "--rdzv-endpoint", "--nnodes",
                           "--master-addr")
    if own_rendezvous or (cfg.distributed.node_range == (1, 1) and not cfg.distributed.rdzv_endpoint):
        return extra
    dist = cfg.distributed
    conf = f"is_host={int(dist.node_rank == 0)},join_timeout={math.ceil(dist.dist_timeout_s)}"
    extra += [f"--nnodes={dist.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={dist.rdzv_endpoint}",
              f"--rdzv-id={dist.rdzv_id}", f"--rdzv-conf={conf}"]
    if dist.node_addr and not given(args, "--local-addr"):
        extra.append(f"--local-addr={dist.node_addr}")
    return extra


def option_value(args: Sequence[str], option: str) -> str | None:
    """The value of torchrun's `option` among `args` (as for `given`), or None when they leave it unset."""
    wanted = option.replace("_", "-")
    for i, arg in enumerate(args):
        if arg in ("-m", "--module") or arg.endswith(".py"):
            return None
        name, equals, value = arg.partition("=")
        if name.replace("_", "-") == wanted:
            return value if equals else (args[i + 1] if i + 1 < len(args) else None)
    return None


def check_visible_gpus(cfg: Config, args: Sequence[str]) -> None:
    """Each worker takes the GPU of its local rank: refuse, before torchrun starts them, more workers per
    node than GPUs are visible here (CUDA_VISIBLE_DEVICES chooses them), which would fail one by one."""
    nproc = option_value(args, "--nproc-per-node")
    if cfg.run.device == DeviceKind.CPU or nproc is None or not nproc.isdigit():  # torchrun's gpu, auto...
        return
    import torch  # here: a CPU launch, the common case in tests, does without it

    visible = torch.cuda.device_count()
    if visible == 0 or int(nproc) <= visible:  # no GPU: DEVICE=auto trains on the CPU, DEVICE=cuda says so
        return
    chosen = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f"CUDA_VISIBLE_DEVICES={chosen}" if chosen is not None else "all of this machine's"
    raise ConfigError([f"{nproc} processes per node but {visible} GPU(s) visible ({where}): set N_GPUS "
                       f"(or --nproc-per-node) to at most {visible}, or list more GPUs in "
                       "CUDA_VISIBLE_DEVICES."])


def launch_torchrun(torchrun_args: Sequence[str], cfg: Config | None = None) -> int:
    """Run `python -m torch.distributed.run TORCHRUN_ARGS` and return its exit code, with clean stops;
    with `cfg`, the options of rendezvous_args come first.

    torchrun answers a SIGTERM/SIGINT by forwarding it to its workers, which checkpoint and exit 0, and
    then exits 1 itself whatever they did (torch 2.x re-raises the signal as an error), after killing
    workers that need more than TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds. Here torchrun runs in its own
    session and the signals this process receives go straight to the workers instead: they stop at
    one step, save and exit 0, and torchrun, seeing every worker succeed, exits 0. A second SIGINT
    reaches the workers the same way and aborts them.
    """
    options = rendezvous_args(cfg, torchrun_args) if cfg is not None else []
    if cfg is not None:
        check_visible_gpus(cfg, [*options, *torchrun_args])
    print("[avatarl] torchrun", *options, *torchrun_args, file=sys.stderr, flush=True)
    child = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *options, *torchrun_args],
                             env={**FRESH_STORE_EACH_ROUND, **os.environ}, start_new_session=True,
                             preexec_fn=_terminate_with_parent)

    def to_workers(signum: int) -> None:
        workers = child_pids(child.pid)
        log.warning("Received %s: passing it to %s.", signal.Signals(signum).name,
                    f"the workers {workers}" if workers else "torchrun (no worker started yet)")
        send(workers or [child.pid], signum)

    with forwarding_signals(to_workers):
        code = child.wait()
    return 128 - code if code < 0 else code
