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
from torch import Tensor, nn

# Temperatures tried for the calibrated CE: log-spaced from 1/8 to 32 (ratio ~1.15), with 1 among them.
CALIBRATION_TEMPERATURES = torch.logspace(-3, 5, 41, base=2.0)
LOGIT_ELEMENTS = 1 << 27  # logits per forward chunk (512 MiB in float32): GPT-2's 50k ids x 1024 -> 2 windows


def nats_per_temperature(logits: Tensor, targets: Tensor, temperatures: Tensor) -> Tensor:
    """Summed -ln softmax(logits / t)[target] for each t: logits [N, V], targets [N] -> [len(temperatures)].

    One temperature at a time, so the memory is that of the logits, not S times it."""
    true = logits.gather(-1, targets[:, None]).squeeze(-1)  # [N]
    return torch.stack([(torch.logsumexp(logits / t, dim=-1) - true / t).sum().double()
                        for t in temperatures.tolist()]).cpu()  # one device-to-host copy, not one per t


def best_temperature(fit_ce: Tensor, temperatures: Tensor) -> int:
    """Index of the temperature with the lowest CE; among ties (a flat curve) the one closest to 1."""
    lowest = float(fit_ce.min())
    tied = [i for i, ce in enumerate(fit_ce.tolist()) if ce <= lowest + 1e-9 * max(1.0, abs(lowest))]
    return min(tied, key=lambda i: abs(math.log(float(temperatures[i]))))


def validation_chunks(count: int, rows: int) -> list[tuple[str, int, int]]:
    """(part, start, stop) row ranges of at most `rows` windows: the first half of `count` windows is the
    "fit" part, the rest the "report" part, and no chunk straddles the two; one window is both parts."""
    if count == 1:
        return [("both", 0, 1)]
    half = count // 2
    halves = (("fit", 0, half), ("report", half, count))
    return [(part, start, min(start + rows, stop)) for part, lo, stop in halves
            for start in range(lo, stop, rows)]


@torch.no_grad()
def validation_metrics(model: nn.Module, windows: Tensor, token_bytes: Tensor) -> dict[str, float]:
    """Next-token metrics over fixed validation windows [N, T + 1]:

    val_ce  = total nats / predicted tokens                       (nats/token; nats/char for a char run)
    val_bpb = total nats / (ln 2 x UTF-8 bytes of the predicted tokens), with token_bytes [vocab] the bytes
              each id stands for: the figure that compares runs of different tokenizers.
    val_acc = share of predicted tokens that are the model's argmax
    val_ce_calibrated, val_temperature = the CE on the second half of the windows at the one temperature
              (of CALIBRATION_TEMPERATURES) that minimises the CE on the first half, and that temperature;
    val_ce_second_half = the CE at temperature 1 on that second half, the figure to compare the calibrated
              one with; with a single window both halves are that window.
    """
    was_training = model.training
    model.eval()
    temperatures = CALIBRATION_TEMPERATURES
    sums = {part: torch.zeros(len(temperatures), dtype=torch.float64) for part in ("fit", "report")}
    counts = {"fit": 0, "report": 0}
    nats, tokens, utf8_bytes, hits = 0.0, 0, 0, 0
    rows = max(1, LOGIT_ELEMENTS // (max(1, windows.size(1) - 1) * len(token_bytes)))
    for part, start, stop in validation_chunks(len(windows), rows):
        batch = windows[start:stop]
        targets = batch[:, 1:]
        logits = model(batch[:, :-1]).float()  # [n, T, V]
        nats += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        tokens += targets.numel()
        hits += int((logits.argmax(-1) == targets).sum().item())
        utf8_bytes += int(token_bytes[targets].sum().item())
        scored = nats_per_temperature(logits.flatten(0, 1), targets.flatten(), temperatures)
        del logits
        for name in (("fit", "report") if part == "both" else (part,)):
            sums[name] += scored
            counts[name] += targets.numel()
    model.train(was_training)
    best = best_temperature(sums["fit"] / max(counts["fit"], 1), temperatures)
    unit = int(torch.argmin((temperatures - 1.0).abs()))
    report_tokens = max(counts["report"], 1)
    return {"val_ce": nats / tokens, "val_bpb": nats / (math.log(2) * max(utf8_bytes, 1)),
            "val_acc": hits / tokens, "val_ce_calibrated": float(sums["report"][best]) / report_tokens,
            "val_temperature": float(temperatures[best]),
            "val_ce_second_half": float(sums["report"][unit]) / report_tokens}
