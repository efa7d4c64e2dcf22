"""Measurements of a model that never train it: validation cross-entropy on fixed windows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avatarl.model import GPT


@torch.no_grad()
def validation_ce(model: GPT, windows: torch.Tensor, chunk: int = 256) -> float:
    """Mean next-char cross-entropy (nats/char) over fixed validation windows [N, T + 1]."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), chunk):
        batch = windows[start:start + chunk]
        logits = model(batch[:, :-1]).float()  # [n, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + batch[:, 1:].numel()
    model.train(was_training)
    return total / count
