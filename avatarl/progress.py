"""How far and how fast a run goes: the ETA, MFU and peak GPU memory of each training log line, the
FLOPs one sampled context costs each objective, GPUs' peak FLOP/s, and the tqdm bar on a terminal
(without one, in compose, Kubernetes or Modal logs, the log line itself is the progress line).

MFU = achieved FLOP/s per GPU / the GPU's peak dense bf16 FLOP/s, the achieved FLOP/s being the measured
tokens/s times the FLOPs per corpus token of the objective (forward and backward of the student from
GPT.flops_per_token, plus the forward of an AvataRL referee); a REFERENCE=gpt2 credit model is not counted.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from avatarl.objectives.base import Method

if TYPE_CHECKING:
    from avatarl.run import Run

# Peak dense bf16 tensor-core TFLOP/s (no sparsity) from the vendors' datasheets; T4 has no bf16: its fp16
# peak.
PEAK_BF16_TFLOPS = {"B200": 2250.0, "H200": 989.0, "H100": 989.0, "H100 PCIe": 756.0, "A100": 312.0,
                    "A100-80GB": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "T4": 65.0}
# Measurements of the process rather than of the run: a resumed run logs other values for them.
PROCESS_METRICS = ("tokens_per_s", "eta_s", "mfu", "peak_rss_mib", "peak_gpu_memory_mib")


def gpu_peak_tflops(device_name: str, gpu_type: str) -> tuple[str, float]:
    """(GPU type, peak bf16 dense TFLOP/s): recognised in the CUDA device name, else GPU_TYPE."""
    name = device_name.upper()
    if "H100" in name and "PCIE" in name:
        return "H100 PCIe", PEAK_BF16_TFLOPS["H100 PCIe"]
    for kind in ("B200", "H200", "H100", "A100", "L40S", "A10G", "L4", "T4"):
        if kind in name:
            return kind, PEAK_BF16_TFLOPS[kind]
    return gpu_type, PEAK_BF16_TFLOPS[gpu_type]


def forward_flops_per_token(module: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token: a third of GPT.flops_per_token (forward + backward); for another model
    (a Hugging Face referee) a multiply-add per weight, 2 N."""
    flops = getattr(module, "flops_per_token", None)
    if callable(flops):
        return flops(seq_len) / 3.0
    return 2.0 * sum(p.numel() for p in module.parameters())


def grpo_context_flops(student: nn.Module, context_len: int, k_samples: int, horizon: int) -> float:
    """Autoregressive GRPO, one context: the rollout (a forward) and the update (forward + backward) each
    run the context once and each of the K samples over its own H-1 tokens, C + K (H-1) tokens at
    sequence length S = C + H - 1: 4/3 F(S) per token."""
    seq_len = context_len + horizon - 1
    return student.flops_per_token(seq_len) * (context_len + k_samples * (horizon - 1)) * 4.0 / 3.0


def next_token_context_flops(student: nn.Module, context_len: int, referee: nn.Module | None = None) -> float:
    """One context of C positions trained at every position (teacher-forced GRPO, AvataRL, the referee's
    own training): F(C) per position, plus the referee's forward for AvataRL."""
    per_token = student.flops_per_token(context_len)
    if referee is not None:
        per_token += forward_flops_per_token(referee, context_len)
    return per_token * context_len


def flops_per_token(run: Run) -> float:
    """FLOPs of training on one corpus token (one of the tokens_seen) with this run's objective; a method
    without rollouts trains every position of its window, as next_token_context_flops counts."""
    cfg = run.cfg
    context_len = cfg.model.context_len
    if run.objective.method == Method.GRPO:
        per_context = grpo_context_flops(run.raw_model, context_len, cfg.grpo.k_samples, cfg.grpo.horizon)
    else:
        referee = getattr(run.objective, "referee", None)
        per_context = next_token_context_flops(run.raw_model, context_len, referee)
    return per_context / run.objective.window_len


class Progress:
    """Rank 0's view of the run's pace since `start` (the loop's first step of this process): the ETA from
    the iterations per second so far; on CUDA the MFU and the peak memory; a tqdm bar when `bar`."""

    def __init__(self, run: Run, bar: bool):
        self.total = run.cfg.optim.total_iters
        self.bar = tqdm(total=self.total, initial=run.state.iteration, desc=str(run.objective.method),
                        dynamic_ncols=True) if bar else None
        self.device, self.world_size = run.info.device, run.info.world_size
        self.cuda = self.device.type == "cuda"
        self.flops_per_token = flops_per_token(run)
        self.peak_flops = 0.0
        if self.cuda:
            _, tflops = gpu_peak_tflops(torch.cuda.get_device_name(self.device), run.cfg.launch.gpu_type)
            self.peak_flops = tflops * 1e12
        self.started, self.iter_at_start = time.perf_counter(), run.state.iteration

    def start(self, run: Run) -> None:
        self.started, self.iter_at_start = time.perf_counter(), run.state.iteration

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def measure(self, iteration: int, tokens_per_s: float) -> dict[str, float]:
        """eta_s, and on CUDA mfu (per GPU) and peak_gpu_memory_mib (this rank's, since the process began)."""
        done = iteration - self.iter_at_start
        rate = done / max(1e-9, time.perf_counter() - self.started)
        measured = {"eta_s": (self.total - iteration) / rate if rate > 0 else float("inf")}
        if self.cuda:
            measured["mfu"] = tokens_per_s * self.flops_per_token / (self.world_size * self.peak_flops)
            measured["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return measured

    def show(self, metrics: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "entropy", "reward_mean")
                                  if k in metrics})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
