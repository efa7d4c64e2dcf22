"""Windows of consecutive token ids: random ones for training (per rank, seeded, resumable) and fixed,
evenly spaced ones for validation, from a device tensor (a text corpus) or a memmap (a prepared directory)."""

from __future__ import annotations

import numpy as np
import torch

from avatarl.data.corpus import Ids


def rank_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """Each rank's own stream of window starts."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + 7919 * rank)
    return generator


class WindowSampler:
    """Random windows of `length` consecutive ids, drawn on the device from a seeded generator.

    Each rank gets its own stream (seed offset by rank); the generator state is the whole sampler
    position, so saving and restoring it continues the exact same sequence of batches.
    """

    def __init__(self, ids: torch.Tensor, length: int, seed: int, rank: int = 0):
        self.ids, self.length = ids, length
        self.generator = rank_generator(seed, rank, ids.device)
        self.offsets = torch.arange(length, device=ids.device)

    def sample(self, count: int) -> torch.Tensor:
        """[count, length] windows."""
        high = len(self.ids) - self.length + 1
        starts = torch.randint(0, high, (count,), device=self.ids.device, generator=self.generator)
        return self.ids[starts[:, None] + self.offsets]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"].cpu())


class MemmapSampler(WindowSampler):
    """The same windows from ids that stay on disk: starts drawn by a CPU generator, the windows gathered from
    the memmap (only those pages are read), pinned and copied to the device without blocking."""

    def __init__(self, ids: np.ndarray, length: int, seed: int, rank: int, device: torch.device):
        self.ids, self.length, self.device = ids, length, device
        self.generator = rank_generator(seed, rank, torch.device("cpu"))
        self.offsets_np = np.arange(length, dtype=np.int64)

    def sample(self, count: int) -> torch.Tensor:
        high = len(self.ids) - self.length + 1
        starts = torch.randint(0, high, (count,), generator=self.generator).numpy()
        return to_device(self.ids[starts[:, None] + self.offsets_np], self.device)


def to_device(windows: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint16/uint32 ids [N, T] as int64 on `device` (pinned and non-blocking on CUDA)."""
    batch = torch.from_numpy(windows.astype(np.int64))
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def make_sampler(ids: Ids, length: int, seed: int, rank: int, device: torch.device) -> WindowSampler:
    if isinstance(ids, np.ndarray):
        return MemmapSampler(ids, length, seed, rank, device)
    return WindowSampler(ids, length, seed, rank)


def eval_windows(val: Ids, context_len: int, count: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed, evenly spaced validation windows of context_len + 1 ids: [count, context_len + 1]."""
    length = context_len + 1
    count = min(count, len(val) - length + 1)
    if isinstance(val, np.ndarray):
        starts = np.linspace(0, len(val) - length, count).astype(np.int64)
        return to_device(val[starts[:, None] + np.arange(length)], device or torch.device("cpu"))
    starts = torch.linspace(0, len(val) - length, count, device=val.device).long()
    return val[starts[:, None] + torch.arange(length, device=val.device)]
