"""All torch.distributed plumbing lives here, so plain `python` and `torchrun` behave the same.

Single process (no RANK in the environment) is world size 1 and every helper is a no-op.
Under torchrun: NCCL on CUDA, gloo on CPU; rank 0 alone logs and writes files. Collectives wait at
most DIST_TIMEOUT_S for a peer; a rank that loses one stops with `lost_peers_message`, which names the
ranks that did not answer, and several nodes must share CHECKPOINT_DIR (`check_shared_directory`).
What the ranks must agree on but could see differently (the checkpoint to resume from) rank 0 decides
for all (`decided_by_rank0`).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from avatarl.device import resolve_device
from avatarl.errors import first_line

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    members: tuple[str, ...] = ()  # "node N (host, pid P)" of every rank, in rank order
    nodes: int = 1  # torchrun's worker groups (GROUP_WORLD_SIZE), one per node

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def describe(self, rank: int) -> str:
        """'rank R = node N (host, pid P)' for error lines; 'rank R' where the members are not known."""
        return f"rank {rank} = {self.members[rank]}" if self.members else f"rank {rank}"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_preference: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the torchrun process group when launched by torchrun; otherwise world size 1. Collectives
    give up after `timeout_s` seconds without a peer (DIST_TIMEOUT_S)."""
    if not launched_by_torchrun():
        return DistInfo(0, 0, 1, resolve_device(device_preference))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=timedelta(seconds=timeout_s))
    # A node is known by its NODE_RANK where the user gave one (avatarl launch), else by torchrun's own
    # number for it (GROUP_RANK, in the rendezvous's order); torchrun counts the nodes (GROUP_WORLD_SIZE).
    group = os.environ.get("GROUP_RANK", "0")
    me = f"node {os.environ.get('NODE_RANK', group)} ({socket.gethostname()}, pid {os.getpid()})"
    members = cast(list[str], gather_to_all(me))
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    info = DistInfo(rank, local_rank, world_size, device, tuple(members), nodes)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    # Each node counts its own restarts: a node restarted to let another rejoin does not.
    if restarts and local_rank == 0:
        most = os.environ.get("TORCHELASTIC_MAX_RESTARTS")
        print(f"[avatarl] {me}: torchrun restart {restarts} of {most}, "
              f"the worker group started again ({world_size} ranks on {info.nodes} nodes); "
              "RESUME decides where it continues.", flush=True)
    return info


def lost_a_peer(error: BaseException) -> bool:
    """Whether a collective raised `error` because a peer died or did not answer within DIST_TIMEOUT_S
    (gloo raises plain RuntimeErrors from its transport; NCCL and the stores raise DistErrors)."""
    return isinstance(error, dist.DistError) or "gloo/transport" in str(error)


def lost_peers_message(info: DistInfo, error: BaseException, grace_s: float = 5.0) -> str:
    """The one line a rank prints when a collective failed: which ranks did not answer, found by every
    surviving rank checking in at the workers' store (MASTER_ADDR:MASTER_PORT) and waiting `grace_s`
    for the others; when that store is gone too, every other rank is named."""
    # gloo's messages start "[file.cc:537] Read error ..." and end in advice that does not apply here.
    detail = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error)).split(". This is typically")[0]
    others = [r for r in range(info.world_size) if r != info.rank]
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=grace_s))
        prefix = f"avatarl/alive/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/" \
                 f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        store.set(f"{prefix}/{info.rank}", "1")
        deadline = time.monotonic() + grace_s
        while others and time.monotonic() < deadline:
            others = [r for r in others if not store.check([f"{prefix}/{r}"])]
            time.sleep(0.1)
        where = "did not answer"
    except (KeyError, ValueError, RuntimeError):  # the store is rank 0's (avatarl launch): rank 0 is gone
        where = "did not answer, nor did rank 0's store"
    lost = "; ".join(info.describe(r) for r in others) or "none found"
    return (f"rank {info.rank} lost its peers: {lost} {where} ({detail}). A node or worker died or "
            "hung longer than DIST_TIMEOUT_S; with MAX_RESTARTS > 0 torchrun restarts the group, otherwise "
            "start every node again and RESUME=auto continues from the newest checkpoint.")


# Set by a launcher whose nodes each mount the same committed snapshot of CHECKPOINT_DIR at start (a Modal
# volume): every rank reads the same checkpoints, but what rank 0 writes reaches the others only later.
SNAPSHOT_SHARED_ENV = "AVATARL_CHECKPOINT_DIR_SNAPSHOT"


def decided_by_rank0(decide: Callable[[], T], info: DistInfo, what: str) -> T:
    """`decide()` run on rank 0 alone and its answer given to every rank (broadcast_object_list), so that
    ranks whose views of the disk differ still agree (e.g. on the checkpoint to resume from). When it
    raises, every rank raises instead of waiting DIST_TIMEOUT_S for rank 0: a ConfigError as the same
    ConfigError everywhere, anything else as itself on rank 0 and a ConfigError naming `what` elsewhere."""
    from avatarl.config import ConfigError

    if not info.is_distributed:
        return decide()
    answer: list[object] = [None]
    failure: BaseException | None = None
    if info.is_main:
        try:
            answer[0] = ("ok", decide())
        except ConfigError as err:
            answer[0] = ("refused", err.problems)
        except Exception as err:  # re-raised below, once the other ranks know
            failure, answer[0] = err, ("failed", [f"rank 0 failed while choosing {what} "
                                                  f"({type(err).__name__}: {err}); see rank 0's error."])
    dist.broadcast_object_list(answer, src=0)
    outcome, value = cast(tuple[str, Any], answer[0])
    if failure is not None:
        raise failure
    if outcome != "ok":
        raise ConfigError(value)
    return cast(T, value)


def require_on_every_rank(problem: str | None, info: DistInfo, what: str) -> None:
    """Collective: every rank reports `problem` (None = fine) and, when any rank has one, every rank
    raises the same one-line ConfigError naming those ranks, so none trains on alone."""
    from avatarl.config import ConfigError

    failed = [f"{info.describe(r)}: {p}" for r, p in enumerate(gather_to_all(problem)) if p is not None]
    if failed:
        raise ConfigError([f"{what}: " + "; ".join(failed)])


def check_shared_directory(directory: Path, info: DistInfo) -> None:
    """With several nodes, refuse to start unless every rank sees CHECKPOINT_DIR as the same directory:
    rank 0 writes a fresh token there, every rank reads it back (a resume reads the checkpoints on
    every rank, and rank 0 alone writes them). A token rank 0 cannot write stops every rank alike."""
    if info.nodes <= 1 or os.environ.get(SNAPSHOT_SHARED_ENV) == "1":
        return
    from avatarl.config import ConfigError

    token_file = directory / ".shared-by-all-nodes"

    def write_token() -> str:
        token = secrets.token_hex(16)
        try:
            token_file.write_text(token, encoding="utf-8")
        except OSError as err:
            raise ConfigError([f"CHECKPOINT_DIR={directory}: rank 0 cannot write {token_file.name} there "
                               f"({err.strerror or err}); make the shared directory writable by the "
                               "trainer's user on node 0."]) from None
        return token

    token = decided_by_rank0(write_token, info, "the shared-directory token")  # returns once it is written
    try:
        seen = token_file.read_text(encoding="utf-8").strip() == token
    except OSError:
        seen = False
    blind = [info.members[r] for r, ok in enumerate(gather_to_all(seen)) if not ok]
    if blind:
        raise ConfigError([f"CHECKPOINT_DIR={directory} is not one directory shared by all nodes: "
                           f"{', '.join(blind)} cannot read what rank 0 wrote there. Mount the same network "
                           "volume (NFS, a ReadWriteMany PVC) at that path on every node."])


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average a dict of scalar tensors over ranks with one all-reduce and one host sync."""
    if not values:
        return {}
    names = sorted(values)
    stacked = torch.stack([values[name].detach().float().reshape(()) for name in names])
    if _active():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist(), strict=True))


def max_over_ranks(value: float, device: torch.device) -> float:
    if not _active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on at least one: ranks agree on stopping."""
    return max_over_ranks(1.0 if flag else 0.0, device) > 0


def barrier() -> None:
    if _active():
        dist.barrier()


def wrap_ddp(model: torch.nn.Module, info: DistInfo, bucket_size_mb: int) -> torch.nn.Module:
    if not info.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=bucket_size_mb)


def gather_to_all(obj: object) -> list[object]:
    """Every rank's `obj` (e.g. its RNG and sampler state), in rank order, on every rank."""
    if not _active():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def replica_divergence(model: torch.nn.Module) -> float:
    """Largest difference between ranks of a float64 fingerprint of the weights (0.0 = identical)."""
    if not _active():
        return 0.0
    fingerprint = torch.stack([p.detach().double().sum() for p in model.parameters()])
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return float((high - low).abs().max().item())
