"""Measurements of a model that never train it, on fixed validation windows: loss per token, bits per
byte, next-token accuracy, and the loss after fitting one temperature.

Why the last two: an exact-match reward is not a proper scoring rule. The policy that maximises it is
the argmax policy, whose cross-entropy is infinite on every miss, so raw cross-entropy judges an
accuracy-seeking RL student by its calibration. Accuracy is what the reward pays for; cross-entropy
after one fitted temperature says what the ranking of its logits is worth as a distribution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from avatarl.model import GPT

# Temperatures tried for the calibrated CE: log-spaced from 1/8 to 32 (ratio ~1.15), with 1 among them.
CALIBRATION_TEMPERATURES = torch.logspace(-3, 5, 41, base=2.0)


def nats_per_temperature(logits: Tensor, targets: Tensor, temperatures: Tensor) -> Tensor:
    """Summed -ln softmax(logits / t)[target] for each t: logits [N, V], targets [N] -> [len(temperatures)].

    One temperature at a time, so the memory is that of the logits, not S times it."""
    true = logits.gather(-1, targets[:, None]).squeeze(-1)  # [N]
    return torch.stack([(torch.logsumexp(logits / t, dim=-1) - true / t).sum().double().cpu()
                        for t in temperatures.tolist()])


def calibrated_ce(fit_nats: Tensor, fit_tokens: int, report_nats: Tensor, report_tokens: int,
                  temperatures: Tensor = CALIBRATION_TEMPERATURES) -> tuple[float, float]:
    """(CE on the report half at the temperature that minimises CE on the fit half, that temperature)."""
    best = int(torch.argmin(fit_nats / max(fit_tokens, 1)))
    return float(report_nats[best]) / max(report_tokens, 1), float(temperatures[best])


@torch.no_grad()
def validation_metrics(model: GPT, windows: torch.Tensor, token_bytes: torch.Tensor,
                       chunk: int = 256) -> dict[str, float]:
    """Next-token metrics over fixed validation windows [N, T + 1]:

    val_ce  = total nats / predicted tokens                       (nats/token; nats/char for a char run)
    val_bpb = total nats / (ln 2 x UTF-8 bytes of the predicted tokens), with token_bytes [vocab] the bytes
              each id stands for: the figure that compares runs of different tokenizers.
    val_acc = share of predicted tokens that are the model's argmax
    val_ce_calibrated, val_temperature = the CE on the second half of the windows at the one temperature
              (of CALIBRATION_TEMPERATURES) that minimises the CE on the first half, and that temperature;
              with a single window both halves are that window.
    """
    was_training = model.training
    model.eval()
    half = len(windows) // 2 if len(windows) > 1 else 1
    temperatures = CALIBRATION_TEMPERATURES
    sums = {part: torch.zeros(len(temperatures), dtype=torch.float64) for part in ("fit", "report")}
    counts = {"fit": 0, "report": 0}
    nats, tokens, utf8_bytes, hits = 0.0, 0, 0, 0
    for start in range(0, len(windows), chunk):
        batch = windows[start:start + chunk]
        targets = batch[:, 1:]
        logits = model(batch[:, :-1]).float()  # [n, T, V]
        nats += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        tokens += targets.numel()
        hits += int((logits.argmax(-1) == targets).sum().item())
        utf8_bytes += int(token_bytes[targets].sum().item())
        rows = torch.arange(start, start + len(batch), device=batch.device)
        for part, mask in (("fit", rows < half), ("report", rows >= half if len(windows) > 1 else rows < half)):
            if mask.any():
                sums[part] += nats_per_temperature(logits[mask].flatten(0, 1), targets[mask].flatten(),
                                                   temperatures)
                counts[part] += int(mask.sum()) * targets.size(1)
    model.train(was_training)
    ce_calibrated, temperature = calibrated_ce(sums["fit"], counts["fit"], sums["report"], counts["report"])
    return {"val_ce": nats / tokens, "val_bpb": nats / (math.log(2) * max(utf8_bytes, 1)),
            "val_acc": hits / tokens, "val_ce_calibrated": ce_calibrated, "val_temperature": temperature}
