"""Learning-rate schedule: linear warmup, then cosine, linear or exponential decay to MIN_LR."""

from __future__ import annotations

import math


def learning_rate(iteration: int, lr: float, min_lr: float, warmup_iters: int, total_iters: int,
                  decay: bool, decay_type: str) -> float:
    """LR for optimizer step `iteration` (0-based).

    warmup:      lr * (iteration + 1) / warmup_iters            for iteration < warmup_iters
    progress p = (iteration - warmup_iters) / (total_iters - warmup_iters), clamped to [0, 1]
    cosine:      min_lr + (lr - min_lr) * (1 + cos(pi p)) / 2
    linear:      lr + (min_lr - lr) * p
    exponential: lr * (min_lr / lr) ** p
    """
    if iteration < warmup_iters:
        return lr * (iteration + 1) / warmup_iters
    if not decay:
        return lr
    span = max(1, total_iters - warmup_iters)
    progress = min(1.0, max(0.0, (iteration - warmup_iters) / span))
    if decay_type == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay_type == "linear":
        return lr + (min_lr - lr) * progress
    if decay_type == "exponential":
        return lr * (max(min_lr, 1e-12) / lr) ** progress
    raise ValueError(f"unknown LR_DECAY_TYPE {decay_type!r}")
