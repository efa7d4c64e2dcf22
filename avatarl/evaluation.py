"""Measurements of a model that never train it: validation loss per token and bits per byte on fixed windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from avatarl.model import GPT


@torch.no_grad()
def validation_metrics(model: GPT, windows: torch.Tensor, token_bytes: torch.Tensor,
                       chunk: int = 256) -> dict[str, float]:
    """Next-token loss over fixed validation windows [N, T + 1]:

    val_ce  = total nats / predicted tokens                       (nats/token; nats/char for a char run)
    val_bpb = total nats / (ln 2 x UTF-8 bytes of the predicted tokens), with token_bytes [vocab] the bytes
              each id stands for: the figure that compares runs of different tokenizers.
    """
    was_training = model.training
    model.eval()
    nats, tokens, utf8_bytes = 0.0, 0, 0
    for start in range(0, len(windows), chunk):
        batch = windows[start:start + chunk]
        targets = batch[:, 1:]
        logits = model(batch[:, :-1]).float()  # [n, T, V]
        nats += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        tokens += targets.numel()
        utf8_bytes += int(token_bytes[targets].sum().item())
    model.train(was_training)
    return {"val_ce": nats / tokens, "val_bpb": nats / (math.log(2) * max(utf8_bytes, 1))}

