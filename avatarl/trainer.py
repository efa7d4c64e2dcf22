"""The training loop shared by the RL student (GRPO or AvataRL) and the supervised referee.

    python -m avatarl train                                  # one process: CPU or one GPU
    torchrun --nproc-per-node=4 -m avatarl train             # DDP, NCCL on CUDA, gloo on CPU

`train()` wires things together; `train_step()` is one optimizer step over BATCH contexts;
what is optimised lives in `objectives.py`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from avatarl import distributed as D
from avatarl.checkpoint import CheckpointError, RunDirectoryBusy, RunLock, find_resume_checkpoint, list_checkpoints
from avatarl.config import Config, ConfigError
from avatarl.data import Corpus, WindowSampler, eval_windows, load_corpus
from avatarl.model import GPT, GPTConfig
from avatarl.objectives import Objective, build_objective
from avatarl.resume import RunState, restore_run, save_run, write_heartbeat
from avatarl.runtime import StopSignal, bad_iterations_from_env, check_runtime, mixed_precision, seed_everything
from avatarl.schedule import learning_rate
from avatarl.tracking import make_logger, setup_logging

log = logging.getLogger("avatarl")

EXIT_OK, EXIT_CONFIG, EXIT_BAD_STEPS, EXIT_BUSY, EXIT_ABORTED = 0, 2, 3, 75, 130
SAMPLE_PROMPTS = ("ROMEO:", "First Citizen:\n", "\n")


@dataclass
class MetricBuffer:
    """On-device running sums of metrics, each with its own count; one host sync per log interval."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
            self.counts[name] = self.counts.get(name, 0) + 1

    def drain(self) -> dict[str, float]:
        means = D.mean_over_ranks({name: total / self.counts[name] for name, total in self.sums.items()})
        self.sums, self.counts = {}, {}
        return means


@dataclass
class Run:
    cfg: Config
    info: D.DistInfo
    corpus: Corpus
    model: torch.nn.Module       # what forward/backward go through (DDP and/or compiled)
    raw_model: GPT               # the plain module whose weights we save
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: WindowSampler
    objective: Objective
    run_dir: Path
    state: RunState
    metrics: MetricBuffer = field(default_factory=MetricBuffer)
    bad_iterations: frozenset[int] = frozenset()


def model_config(cfg: Config, vocab_size: int, role: str = "student") -> GPTConfig:
    def pick(own: int, student: int) -> int:
        return own if role == "referee" and own > 0 else student

    return GPTConfig(vocab_size=vocab_size, block_size=cfg.seq_len, n_layer=pick(cfg.referee_n_layer, cfg.n_layer),
                     n_head=pick(cfg.referee_n_head, cfg.n_head), n_emb=pick(cfg.referee_n_emb, cfg.n_emb),
                     use_flash_attn=cfg.use_flash_attn)


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def build(cfg: Config, info: D.DistInfo, role: str, run_dir: Path) -> Run:
    """Everything a run needs, in the order that fails fastest: data, objective, model, optimizer."""
    seed_everything(cfg.seed + info.rank)
    corpus = load_corpus(cfg, info.device)
    raw_model = GPT(model_config(cfg, corpus.vocab.size, role)).to(info.device)
    objective = build_objective(cfg, role, corpus, raw_model, info.device)
    model = torch.compile(raw_model) if cfg.use_torch_compile else raw_model
    model = D.wrap_ddp(model, info, cfg.bucket_size_mb)
    optimizer = make_optimizer(raw_model, cfg, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=mixed_precision(cfg, info.device) == torch.float16)
    sampler = WindowSampler(corpus.train, objective.window_len, cfg.seed, info.rank)
    D.print0(f"[avatarl] {role}: {raw_model.num_params() / 1e6:.2f}M parameters, attention via "
             f"{raw_model.attention_backend}, device {info.device}, world size {info.world_size}, "
             f"{cfg.grad_accum_steps(info.world_size)} micro-batch(es) of {cfg.micro_batch} per step")
    if cfg.use_cuda_graphs and objective.name == "grpo":
        where = "replayed from a CUDA graph" if info.device.type == "cuda" else "eager (CUDA graphs need CUDA)"
        D.print0(f"[avatarl] USE_CUDA_GRAPHS: rollout decode steps {where}")
    return Run(cfg, info, corpus, model, raw_model, optimizer, scaler, sampler, objective, run_dir, RunState(),
               bad_iterations=bad_iterations_from_env())


def train_step(run: Run) -> bool:
    """One optimizer step over BATCH contexts. Returns False when the step was skipped as non-finite."""
    cfg, state = run.cfg, run.state
    lr = learning_rate(state.iteration, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.total_iters,
                       cfg.use_lr_decay, cfg.lr_decay_type)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.objective.prepare_step(state.iteration, state.chars_seen)
    accum = cfg.grad_accum_steps(run.info.world_size)
    dtype = mixed_precision(cfg, run.info.device)
    total_loss = torch.zeros((), device=run.info.device)
    for micro in range(accum):
        window = run.sampler.sample(cfg.micro_batch)
        sync = micro == accum - 1 or not run.info.is_distributed
        with contextlib.nullcontext() if sync else run.model.no_sync(), \
                torch.autocast(run.info.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, metrics = run.objective.micro_step(run.model, window)
            if state.iteration in run.bad_iterations:
                loss = loss * float("nan")
            run.scaler.scale(loss / accum).backward()
        total_loss += loss.detach()
        run.metrics.add(metrics)
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip or float("inf"))
    locally_finite = bool(torch.isfinite(grad_norm) & torch.isfinite(total_loss))  # the one host sync per step
    finite = not D.any_rank(not locally_finite, run.info.device)  # ranks must agree on skipping
    if finite:
        run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    device = run.info.device  # host values as device tensors: drain() stacks all metrics on one device
    step_metrics = {"lr": torch.full((), lr, device=device),
                    "skipped": torch.full((), float(not finite), device=device)}
    if finite:  # a skipped step has no loss or norm worth averaging in
        step_metrics.update(loss=total_loss / accum, grad_norm=grad_norm)
    run.metrics.add(step_metrics)
    state.iteration += 1
    state.chars_seen += cfg.batch * run.objective.window_len
    state.bad_streak = 0 if finite else state.bad_streak + 1
    state.bad_total += 0 if finite else 1
    return finite


@torch.no_grad()
def validation_ce(model: GPT, windows: torch.Tensor, chunk: int = 256) -> float:
    """Mean next-char cross-entropy (nats/char) over fixed validation windows: a measurement only."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), chunk):
        batch = windows[start:start + chunk]
        logits = model(batch[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + batch[:, 1:].numel()
    model.train(was_training)
    return total / count


def text_samples(run: Run, max_new_tokens: int = 120) -> str:
    vocab, generator = run.corpus.vocab, torch.Generator(device=run.info.device)
    generator.manual_seed(run.cfg.seed + run.state.iteration)  # own stream: sampling never shifts training RNG
    outputs = []
    known = set(vocab.chars)
    prompts = [p for p in SAMPLE_PROMPTS if set(p) <= known] or [vocab.chars[0]]  # any corpus, any alphabet
    for prompt in prompts:
        ids = torch.tensor([vocab.encode(prompt)], device=run.info.device)
        out = run.raw_model.generate(ids, max_new_tokens, temperature=0.8, top_k=None, generator=generator)
        outputs.append(repr(vocab.decode(out[0])))
    return "\n".join(outputs)


def log_interval_metrics(run: Run, logger: Any, started: float, chars_at_start: int) -> dict[str, float]:
    metrics = run.metrics.drain()
    run.objective.after_log(metrics)
    elapsed = max(1e-9, time.perf_counter() - started)
    metrics.update(run.objective.host_metrics())
    metrics.update(chars_seen=run.state.chars_seen, chars_per_s=(run.state.chars_seen - chars_at_start) / elapsed,
                   bad_steps_total=run.state.bad_total)
    logger.log(metrics, run.state.iteration)
    if "entropy" in metrics and metrics["entropy"] < run.cfg.entropy_warn:
        log.warning("Policy entropy %.3f nats/char is below ENTROPY_WARN=%s: the policy is collapsing.",
                    metrics["entropy"], run.cfg.entropy_warn)
    return metrics


def prepare_run_dir(cfg: Config, role: str) -> Path:
    run_dir = Path(cfg.checkpoint_dir).expanduser() / ("referee" if role == "referee" else "")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError([f"CHECKPOINT_DIR={cfg.checkpoint_dir!r} is not writable ({err.strerror}): "
                           "choose a directory you can write to."]) from None
    if cfg.resume == "never" and list_checkpoints(run_dir) and not cfg.overwrite:
        raise ConfigError([f"RESUME=never but {run_dir} already holds a run ({list_checkpoints(run_dir)[0].name}): "
                           "set RESUME=auto to continue it, OVERWRITE=true to start over, or another "
                           "CHECKPOINT_DIR."])
    return run_dir


def resume_path(cfg: Config, run_dir: Path) -> Path | None:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return find_resume_checkpoint(run_dir)
    path = Path(cfg.resume).expanduser()
    if not path.is_file():
        raise ConfigError([f"RESUME={cfg.resume!r}: no such checkpoint file (use auto, never or a path)."])
    return path


def train(cfg: Config, role: str = "student") -> int:
    """Run training to TOTAL_ITERS (or a stop signal). Returns the process exit code."""
    info = D.init_distributed(cfg.device)
    setup_logging(cfg.log_level, info.is_main)
    lock = RunLock(Path(cfg.checkpoint_dir))
    stop = StopSignal()
    try:
        with stop:  # from here on, SIGTERM/SIGINT mean "stop cleanly", even while the model is being built
            cfg.check_world_size(info.world_size)
            check_runtime(cfg, info)
            run_dir = prepare_run_dir(cfg, role)
            if info.is_main:
                lock.acquire()
            run = build(cfg, info, role, run_dir)
            checkpoint = resume_path(cfg, run_dir)
            if checkpoint is not None:
                restore_run(run, checkpoint)
            elif info.is_main and cfg.overwrite:
                for stale in list_checkpoints(run_dir):
                    stale.unlink()
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            return loop(run, stop)
    except KeyboardInterrupt:
        D.print0("[avatarl] aborted by a second interrupt: the step in progress is lost, the newest checkpoint "
                 "on disk is intact.")
        return EXIT_ABORTED
    except RunDirectoryBusy as err:
        D.print0(f"error: {err}")
        return EXIT_BUSY
    except (ConfigError, CheckpointError) as err:
        for line in str(err).splitlines():
            D.print0(f"error: {line}")
        return EXIT_CONFIG
    except torch.cuda.OutOfMemoryError:
        D.print0(f"error: CUDA out of memory with MICRO_BATCH={cfg.micro_batch}: lower MICRO_BATCH (e.g. "
                 f"{max(1, cfg.micro_batch // 2)}) and keep BATCH a multiple of MICRO_BATCH x world size.")
        return EXIT_CONFIG
    finally:
        lock.release()
        D.cleanup()


def loop(run: Run, stop: StopSignal) -> int:
    cfg, state, info = run.cfg, run.state, run.info
    if D.any_rank(stop.requested, info.device):
        D.print0(f"[avatarl] stop requested before the first step: nothing new to save, exiting at iteration "
                 f"{state.iteration}.")
        return EXIT_OK
    logger = make_logger(info.is_main, run.run_dir, cfg.use_wandb, cfg.wandb_project, cfg.wandb_name,
                         {**cfg.to_dict(), "model": asdict(run.raw_model.config)})
    windows = eval_windows(run.corpus.val, cfg.context_len, cfg.eval_windows)
    if state.iteration == 0:
        logger.log({"val_ce": validation_ce(run.raw_model, windows), "chars_seen": 0}, 0)
    started, chars_at_start, last_beat = time.perf_counter(), state.chars_seen, 0.0
    bar = tqdm(total=cfg.total_iters, initial=state.iteration, disable=not (info.is_main and sys.stderr.isatty()),
               desc=run.objective.name, dynamic_ncols=True)
    exit_code = EXIT_OK
    while state.iteration < cfg.total_iters:
        good = train_step(run)
        bar.update(1)
        it = state.iteration
        if it % cfg.log_interval == 0 or it == cfg.total_iters:
            metrics = log_interval_metrics(run, logger, started, chars_at_start)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "entropy", "reward_mean") if k in metrics})
        if it % cfg.eval_interval == 0 or it == cfg.total_iters:
            val_ce = validation_ce(run.raw_model, windows)
            logger.log({"val_ce": val_ce, "val_ppl": math.exp(min(val_ce, 50.0)), "chars_seen": state.chars_seen},
                       it)
        if info.is_main and cfg.sample_interval and it % cfg.sample_interval == 0:
            logger.log_text("samples", text_samples(run), it)
        if info.is_main and time.monotonic() - last_beat >= cfg.heartbeat_interval:
            last_beat = time.monotonic()
            write_heartbeat(run, (state.chars_seen - chars_at_start) / (time.perf_counter() - started))
        if state.bad_streak >= cfg.max_bad_steps:
            D.print0(f"error: {state.bad_streak} consecutive non-finite steps (MAX_BAD_STEPS={cfg.max_bad_steps}):"
                     " stopping with the last good weights saved.")
            exit_code = EXIT_BAD_STEPS
            break
        if cfg.save_intermediate_checkpoints and it % cfg.checkpoint_interval == 0 and good:
            save_run(run)
        if D.any_rank(stop.requested, info.device):
            save_run(run)
            D.print0(f"[avatarl] stop requested: checkpoint saved at iteration {it}, exiting.")
            break
    else:
        if cfg.save_final_checkpoint:
            save_run(run)
        if info.is_main:
            logger.log_text("samples", text_samples(run), state.iteration)
    if exit_code == EXIT_BAD_STEPS:
        save_run(run)
    divergence = D.replica_divergence(run.raw_model)
    if info.is_distributed:
        logger.log({"replica_divergence": divergence, "world_size": info.world_size}, state.iteration)
    bar.close()
    logger.finish()
    if info.is_main:
        write_heartbeat(run, 0.0, finished=True)
    D.barrier()  # no rank tears the process group down while rank 0 is still writing
    return exit_code
