"""All torch.distributed plumbing lives here, so plain `python` and `torchrun` behave the same.

Single process (no RANK in the environment) is world size 1 and every helper is a no-op.
Under torchrun: NCCL on CUDA, gloo on CPU; rank 0 alone logs and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from avatarl.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_preference: str) -> DistInfo:
    """Join the torchrun process group when launched by torchrun; otherwise world size 1."""
    if not launched_by_torchrun():
        return DistInfo(0, 0, 1, resolve_device(device_preference))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, local_rank, world_size, device)


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
