"""`avatarl bench throughput`: what one learning step costs on this device, supervised versus RL.

Every number comes from the trainer's own code (`trainer.build`, `trainer.train_step`) on one
micro-batch per iteration (BATCH = MICRO_BATCH, B contexts), timed after warm-up with CUDA events
on a GPU and perf_counter on a CPU, the rows taking turns; each row reports the median over the
timed iterations.

    supervised step    next-char cross-entropy, fwd + bwd + AdamW, on B x K windows of C + H input
                       chars: the same model and token count the GRPO update trains on, the floor
    GRPO iteration     rollout + rewards + advantages + old log-probs + update of B contexts
      rollout          the KV-cached rollout alone (B contexts prefilled, B x K rows decoded)
      scoring          reference log-probs, rewards and group advantages alone
      update           the iteration minus rollout and scoring
    GRPO iteration, full rows  the same step with an update that runs all B x K rows of context +
                       samples (the straightforward way) instead of each context once for its K samples
    rollout, recompute the same sampling, re-running the whole prefix at every step (no KV cache)
    AvataRL iteration  referee forward + student update on B contexts of C chars, with a random-init
                       referee of the configured size (timing does not need a trained one)
    peer step          the supervised step's work on a Hugging Face GPT2LMHeadModel of the same shape
                       (bench/peer.py); skipped, with a note, when transformers is not importable

ratios: grpo_over_supervised = GRPO iteration / supervised step, kv_cache_speedup = recompute /
KV-cached rollout, shared_prefix_speedup = full-rows / shared-prefix GRPO iteration,
supervised_over_peer = supervised step / peer step (with the peer row), and on CUDA mfu = FLOP/s of the
GRPO iteration / the GPU's peak bf16 dense FLOP/s.

`--quick`: `--preset bench-quick` (2 x 64; flags still win) and 2 timed iterations unless `--iters` is
given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from avatarl import distributed as D
from avatarl import exit_codes
from avatarl.algorithms.grpo import Rollout, draw_tempered, rollout, score_rollout
from avatarl.bench.peer import build_peer, peer_step_fn
from avatarl.bench.per_token import draws, teacher_forced_runs
from avatarl.bench.throughput_report import format_table, summarise
from avatarl.config import Config
from avatarl.data.sampler import make_sampler
from avatarl.device import mixed_precision, resolve_device
from avatarl.model import GPT, attention_backend_available, frozen_copy
from avatarl.objectives import AvataRLObjective, SupervisedObjective
from avatarl.referee import Referee, referee_dtype
from avatarl.run import MetricBuffer, Run, RunState
from avatarl.trainer import build, model_config, train_step


@dataclasses.dataclass
class Timing:
    times_s: list[float]                  # wall clock (CUDA events on a GPU)
    peak_memory_mib: float | None = None  # CUDA only
    cpu_times_s: list[float] | None = None  # CPU only: this process's CPU time, summed over its threads

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def cpu_median_s(self) -> float | None:
        return statistics.median(self.cpu_times_s) if self.cpu_times_s else None

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median_s, "min_s": min(self.times_s),
                "mean_s": statistics.fmean(self.times_s),
                "times_s": self.times_s, "peak_memory_mib": self.peak_memory_mib,
                "cpu_median_s": self.cpu_median_s, "cpu_times_s": self.cpu_times_s}


def time_interleaved(calls: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                     iters: int) -> dict[str, Timing]:
    """Warm each call up `warmup` times (its peak CUDA memory is read then), then run `iters` rounds that
    time every call once each, in turn: a slow spell of a shared machine then hits all rows alike,
    which keeps their ratios honest.
    """
    cuda = device.type == "cuda"
    peaks: dict[str, float | None] = {}
    for name, fn in calls.items():
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            fn()
        peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    times: dict[str, list[float]] = {name: [] for name in calls}
    cpu_times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                started, cpu_started = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - started)
                cpu_times[name].append(time.process_time() - cpu_started)
    return {name: Timing(times[name], peaks[name], None if cuda else cpu_times[name]) for name in calls}


@torch.no_grad()
def rollout_recompute(policy: nn.Module, ctx: Tensor, k: int, horizon: int, temperature: float,
                      generator: torch.Generator | None = None) -> Rollout:
    """The rollout of `grpo.rollout` without a KV cache: every step re-runs the whole prefix.

    Like the cached rollout, the first step runs each context once for its K samples. Same draws
    from the same random stream (exponential race over pi_T = softmax(logits / T)), so with equal
    generators both return the same samples: only the cost differs.
    """
    B = ctx.size(0)
    seq = ctx.repeat_interleave(k, dim=0)  # [B*K, C]
    logps = []
    for h in range(horizon):
        logits = policy(ctx)[:, -1].repeat_interleave(k, dim=0) if h == 0 else policy(seq)[:, -1]
        token, logp = draw_tempered(logits, temperature, generator)
        logps.append(logp)
        seq = torch.cat((seq, token), dim=1)
    samples = seq[:, ctx.size(1):]
    return Rollout(samples.reshape(B, k, horizon), torch.cat(logps, 1).view(B, k, horizon))


class FullRowsStudent(nn.Module):
    """The student as a straightforward update calls it: every sample row runs its whole context.

    forward(samples, prefix=ctx) concatenates each context in front of each of its K rows and keeps
    the logits from position C - 1 on: the same numbers as GPT's shared-prefix forward, at the cost
    of B x K (C + H - 1) tokens instead of B (C + K (H - 1)).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: Tensor, prefix: Tensor) -> Tensor:
        group = idx.size(0) // prefix.size(0)
        rows = torch.cat((prefix.repeat_interleave(group, dim=0), idx), dim=1)
        return self.model(rows)[:, prefix.size(1) - 1:]


def derived_runs(grpo: Run) -> tuple[Run, Run]:
    """(supervised, avatarl) runs sharing the GRPO run's model and optimizer, each with its own sampler."""
    cfg, device = grpo.cfg, grpo.info.device
    # C + H input chars, then the next one, in B x K windows
    rows = cfg.optim.micro_batch * cfg.grpo.k_samples
    sup_cfg = cfg.replace(context_len=cfg.seq_len, micro_batch=rows, batch=rows)
    supervised = dataclasses.replace(
        grpo, cfg=sup_cfg, objective=SupervisedObjective(sup_cfg), state=RunState(),
        metrics=MetricBuffer(device),
        sampler=make_sampler(grpo.corpus.train, sup_cfg.model.context_len + 1, cfg.run.seed, 0, device))
    referee = GPT(model_config(cfg, grpo.corpus.model_vocab_size, "referee"))
    referee = referee.to(device, referee_dtype(mixed_precision(cfg, device)))  # as open_referee loads one
    av_cfg = cfg.replace(algorithm="avatarl")
    referee = frozen_copy(referee)
    avatarl = dataclasses.replace(
        grpo, cfg=av_cfg, objective=AvataRLObjective(av_cfg, Referee(referee, {})),
        state=RunState(), metrics=MetricBuffer(device),
        sampler=make_sampler(grpo.corpus.train, cfg.model.context_len + 1, cfg.run.seed, 0, device))
    return supervised, avatarl


def score(grpo: Run, ctx: Tensor, ro: Rollout, truth: Tensor) -> Tensor:
    """The scoring phase of a GRPO step: reference log-probs, credit, rewards, advantages."""
    objective = grpo.objective
    scored = score_rollout(ro, ctx, truth, objective.kl_reference, objective.settings, objective.credit)
    return scored.advantages


def measure(cfg: Config, device: torch.device, warmup: int, iters: int, full: bool = True) -> dict[str, Any]:
    """Time the rows of the module docstring for one configuration; `full=False` times only the two steps."""
    peer: dict[str, Any] | None = None
    cfg = cfg.replace(batch=cfg.optim.micro_batch, algorithm="grpo")
    with tempfile.TemporaryDirectory(prefix="avatarl-bench-") as tmp:
        cfg = cfg.replace(checkpoint_dir=tmp)
        grpo = build(cfg, D.DistInfo(0, 0, 1, device), "student", Path(tmp))
    supervised, avatarl = derived_runs(grpo)
    forced = teacher_forced_runs(grpo) if full else {}
    B, C, K, H = cfg.optim.micro_batch, cfg.model.context_len, cfg.grpo.k_samples, cfg.grpo.horizon
    dtype = mixed_precision(cfg, device)
    window = grpo.sampler.sample(B)
    ctx, truth = window[:, :C], window[:, C:]
    old, graphs, T = grpo.objective.old_policy, grpo.objective.graphs, cfg.grpo.temperature

    def amp(fn: Callable[..., Any], *args: Any) -> Any:
        """`fn` in the rollout's context in the trainer: autocast, no grad."""
        autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
        with torch.no_grad(), autocast:
            return fn(*args)

    ro = amp(rollout, old, ctx, K, H, T, None, graphs)
    full_rows = dataclasses.replace(grpo, model=FullRowsStudent(grpo.model), state=RunState(),
                                    metrics=MetricBuffer(device))
    calls: dict[str, Callable[[], object]] = {"supervised_step": lambda: train_step(supervised),
                                              "grpo_iteration": lambda: train_step(grpo)}
    if full:
        calls.update(rollout_kv_cache=lambda: amp(rollout, old, ctx, K, H, T, None, graphs),
                     grpo_scoring=lambda: amp(score, grpo, ctx, ro, truth),
                     rollout_recompute=lambda: amp(rollout_recompute, old, ctx, K, H, T),
                     grpo_full_rows=lambda: train_step(full_rows),
                     avatarl_iteration=lambda: train_step(avatarl))
        calls.update({name: (lambda run=run: train_step(run)) for name, run in forced.items()})
        built = build_peer(cfg, grpo.corpus.model_vocab_size, device)
        if isinstance(built, str):
            peer = {"skipped": built}
        else:
            peer = built[1]
            # C + H + 1 ids per window, as the supervised row's
            windows = make_sampler(grpo.corpus.train, cfg.seq_len + 1, cfg.run.seed + 1, 0, device)
            calls["peer_step"], peer_losses = peer_step_fn(cfg, built[0], windows, device)
    timings = time_interleaved(calls, device, warmup, iters)
    finite = all(math.isfinite(value) for run in (supervised, grpo, full_rows, avatarl, *forced.values())
                 for value in run.metrics.drain().values())
    if "peer_step" in calls:
        finite = finite and bool(torch.isfinite(torch.stack(peer_losses)).all())
    return {"timings": timings, "finite": finite, "params": grpo.raw_model.num_params(),
            "attention": grpo.raw_model.attention_backend, "model": grpo.raw_model,
            "cuda_graphs": graphs is not None,
            "referee": avatarl.objective.referee, "peer": peer, "teacher_forced_k": draws(forced)}


def backend_comparison(cfg: Config, device: torch.device, main: dict[str, Any], warmup: int,
                       iters: int) -> dict[str, dict[str, float]]:
    """Supervised step and GRPO iteration under both attention backends (CUDA with flash-attn only)."""
    rows = {main["attention"]: {"supervised_step_s": main["timings"]["supervised_step"].median_s,
                                "grpo_iteration_s": main["timings"]["grpo_iteration"].median_s}}
    other = measure(cfg.replace(use_flash_attn=main["attention"] != "flash-attn"), device,
                    warmup, iters, full=False)
    rows[other["attention"]] = {"supervised_step_s": other["timings"]["supervised_step"].median_s,
                                "grpo_iteration_s": other["timings"]["grpo_iteration"].median_s}
    return rows


def run_throughput_bench(cfg: Config, args: argparse.Namespace) -> int:
    """Measure, print the table, write JSON to args.json_path when given. Exit 1 on non-finite metrics."""
    device = resolve_device(cfg.run.device)
    cuda = device.type == "cuda"
    warmup = (5 if cuda else 1) + (2 if cfg.model.use_torch_compile else 0)
    iters = args.iters or (2 if args.quick else 20 if cuda else 5)
    result = measure(cfg, device, warmup, iters)
    report = summarise(cfg, device, result, warmup, iters)
    if cuda and attention_backend_available() and not cfg.model.use_torch_compile:  # compiling twice is slow
        report["attention_backends"] = backend_comparison(cfg, device, result, warmup, iters)
    report["argv"] = sys.argv[1:]
    print(format_table(report), flush=True)
    if args.json_path:
        path = Path(args.json_path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    if not report["finite"]:
        print("error: a benchmarked step produced non-finite metrics", file=sys.stderr)
        return exit_codes.FAILED
    return exit_codes.OK
