"""Windows of consecutive token ids: random ones for training (per rank, seeded, resumable) and fixed,
evenly spaced ones for validation."""

from __future__ import annotations

import torch


class WindowSampler:
    """Random windows of `length` consecutive ids, drawn on the device from a seeded generator.

    Each rank gets its own stream (seed offset by rank); the generator state is the whole sampler
    position, so saving and restoring it continues the exact same sequence of batches.
    """

    def __init__(self, ids: torch.Tensor, length: int, seed: int, rank: int = 0):
        self.ids, self.length = ids, length
        self.generator = torch.Generator(device=ids.device)
        self.generator.manual_seed(seed + 7919 * rank)
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


def eval_windows(val: torch.Tensor, context_len: int, count: int) -> torch.Tensor:
    """Fixed, evenly spaced validation windows of context_len + 1 ids: [count, context_len + 1]."""
    length = context_len + 1
    count = min(count, len(val) - length + 1)
    starts = torch.linspace(0, len(val) - length, count, device=val.device).long()
    return val[starts[:, None] + torch.arange(length, device=val.device)]
