"""The training loop shared by the RL student (GRPO or AvataRL) and the supervised referee.

    python -m avatarl train                                  # one process: CPU or one GPU
    torchrun --nproc-per-node=4 -m avatarl train             # DDP, NCCL on CUDA, gloo on CPU

`train()` sets the process up and raises the errors of errors.py for what ends a run badly; `build()`
makes a Run; `loop()` runs `train_step()` (one optimizer step over BATCH contexts) and the periodic duties
of periodic.py, whose Checkpoints duty makes every save; what is optimised lives in objectives/.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from avatarl import distributed as D
from avatarl.checkpoint import RunLock, find_resume_checkpoint
from avatarl.config import Config, ConfigError
from avatarl.data.corpus import load_corpus
from avatarl.data.sampler import make_sampler
from avatarl.device import check_device, mixed_precision
from avatarl.errors import Aborted, AvatarlError, NonFiniteSteps, PeerLost
from avatarl.model import GPT, GPTConfig
from avatarl.objectives import Method, build_objective
from avatarl.periodic import (
    BAD_STEPS,
    COMPLETED,
    STOPPED,
    Checkpoints,
    Heartbeat,
    MetricsLog,
    TextSamples,
    Throughput,
    Validation,
)
from avatarl.progress import Progress
from avatarl.resume import report_finished, restore_run
from avatarl.rng import seed_everything
from avatarl.run import MetricBuffer, Run, RunState
from avatarl.run_dir import clear_run, describe_run, prepare_run_dir, run_directory
from avatarl.schedule import learning_rate
from avatarl.signals import StopSignal
from avatarl.tracking import make_logger, setup_logging, wandb_run_name

log = logging.getLogger(__name__)


def model_config(cfg: Config, vocab_size: int, role: str = "student", valid_vocab_size: int = 0) -> GPTConfig:
    """The student's shape, or the referee's (REFEREE_N_*, each 0 = the student's); ids from valid_vocab_size
    up to vocab_size are padding (see GPTConfig)."""
    def pick(own: int, student: int) -> int:
        return own if role == "referee" and own > 0 else student

    referee, model = cfg.referee, cfg.model
    return GPTConfig(vocab_size=vocab_size, block_size=cfg.seq_len,
                     n_layer=pick(referee.referee_n_layer, model.n_layer),
                     n_head=pick(referee.referee_n_head, model.n_head),
                     n_emb=pick(referee.referee_n_emb, model.n_emb),
                     use_flash_attn=model.use_flash_attn, valid_vocab_size=valid_vocab_size)


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.optim.weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def build(cfg: Config, info: D.DistInfo, role: str, run_dir: Path) -> Run:
    """Everything a run needs, in the order that fails fastest: data, objective, model, optimizer."""
    seed_everything(cfg.run.seed + info.rank)
    corpus = load_corpus(cfg, info.device)
    raw_model = GPT(model_config(cfg, corpus.model_vocab_size, role, corpus.tokenizer.size)).to(info.device)
    objective = build_objective(cfg, role, corpus, raw_model, info.device)
    model = torch.compile(raw_model) if cfg.model.use_torch_compile else raw_model
    model = D.wrap_ddp(model, info, cfg.distributed.bucket_size_mb)
    optimizer = make_optimizer(raw_model, cfg, info.device)
    fp16 = mixed_precision(cfg, info.device) == torch.float16
    scaler = torch.amp.GradScaler(info.device.type, enabled=fp16)
    sampler = make_sampler(corpus.train, objective.window_len, cfg.run.seed, info.rank, info.device)
    D.print0(f"[avatarl] {role}: {raw_model.num_params() / 1e6:.2f}M parameters, attention via "
             f"{raw_model.attention_backend}, device {info.device}, world size {info.world_size}, "
             f"{cfg.optim.grad_accum_steps(info.world_size)} micro-batch(es) of {cfg.optim.micro_batch} "
             "per step")
    if cfg.model.use_cuda_graphs and objective.method == Method.GRPO:
        where = ("replayed from a CUDA graph" if info.device.type == "cuda"
                 else "eager (CUDA graphs need CUDA)")
        D.print0(f"[avatarl] USE_CUDA_GRAPHS: rollout decode steps {where}")
    return Run(cfg, info, corpus, model, raw_model, optimizer, scaler, sampler, objective, run_dir,
               RunState(), MetricBuffer(info.device))


def train_step(run: Run) -> bool:
    """One optimizer step over BATCH contexts. Returns False when the step was skipped as non-finite."""
    cfg, state = run.cfg, run.state
    optim = cfg.optim
    lr = learning_rate(state.iteration, optim.lr, optim.min_lr, optim.warmup_iters, optim.total_iters,
                       optim.use_lr_decay, optim.lr_decay_type)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.objective.prepare_step(state.iteration, state.tokens_seen)
    accum = cfg.optim.grad_accum_steps(run.info.world_size)
    dtype = mixed_precision(cfg, run.info.device)
    total_loss = torch.zeros((), device=run.info.device)
    for micro in range(accum):
        window = run.sampler.sample(cfg.optim.micro_batch)
        sync = micro == accum - 1 or not run.info.is_distributed
        with contextlib.nullcontext() if sync else run.model.no_sync(), \
                torch.autocast(run.info.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, metrics = run.objective.micro_step(run.model, window)
            run.scaler.scale(loss / accum).backward()
        total_loss += loss.detach()
        run.metrics.add(metrics)
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(),
                                               cfg.optim.grad_clip or float("inf"))
    # the one host sync per step
    locally_finite = bool(torch.isfinite(grad_norm) & torch.isfinite(total_loss))
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
    state.record_step(finite, cfg.optim.batch * run.objective.window_len)
    return finite


def resume_path(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint RESUME names: the newest valid one (auto), none (never), or a file."""
    if cfg.run.resume == "never":
        return None
    if cfg.run.resume == "auto":
        return find_resume_checkpoint(run_dir)
    path = Path(cfg.run.resume).expanduser()
    if not path.is_file():
        raise ConfigError([f"RESUME={cfg.run.resume!r}: no such checkpoint file "
                           "(use auto, never or a path)."])
    return path


def agreed_resume_path(cfg: Config, run_dir: Path, info: D.DistInfo) -> Path | None:
    """resume_path as rank 0 sees it, on every rank: ranks that each picked their own newest checkpoint
    (another node's view of the directory lagging behind) would resume different iterations."""
    return D.decided_by_rank0(lambda: resume_path(cfg, run_dir), info, "the checkpoint to resume from")


def train(cfg: Config, role: str = "student") -> str:
    """Run training to TOTAL_ITERS or a stop signal; returns how the loop ended, COMPLETED or STOPPED
    (the checkpoint saved). What ends it otherwise raises an AvatarlError (errors.py): bad settings or
    checkpoint, CHECKPOINT_DIR in use, MAX_BAD_STEPS non-finite steps, a lost rank, a second Ctrl-C."""
    info = D.init_distributed(cfg.run.device, cfg.distributed.dist_timeout_s)
    setup_logging(cfg.run.log_level, info.is_main)
    lock = RunLock(run_directory(cfg.run.checkpoint_dir, cfg.run.run_name))  # a referee run's too
    stop = StopSignal()
    try:
        with stop:  # from here on, SIGTERM/SIGINT mean "stop cleanly", even while the model is being built
            cfg.optim.check_world_size(info.world_size)
            check_device(cfg, info.device, info.world_size)
            run_dir = prepare_run_dir(cfg, role)
            D.check_shared_directory(run_dir, info)
            if info.is_main:
                lock.acquire()
            run = build(cfg, info, role, run_dir)
            checkpoint = agreed_resume_path(cfg, run_dir, info)
            if checkpoint is not None:
                restore_run(run, checkpoint)
            else:
                if info.is_main and cfg.run.overwrite:
                    clear_run(run_dir)
                D.print0(f"[avatarl] {describe_run(cfg, run_dir)} starts at iteration 0")
            finished = run.state.iteration >= cfg.optim.total_iters
            if finished:
                report_finished(run)
            outcome = COMPLETED if finished else loop(run, stop)
            streak = run.state.bad_streak
            # DDP's reducer keeps its last gloo/NCCL work, which holds tensors: release it while the process
            # group and the interpreter are alive, not during interpreter finalization (a rare abort at exit).
            del run
            gc.collect()
    except KeyboardInterrupt:
        raise Aborted("aborted by a second interrupt: the step in progress is lost, the newest checkpoint on "
                      "disk is intact.") from None
    except torch.cuda.OutOfMemoryError:
        micro = cfg.optim.micro_batch
        raise ConfigError([f"CUDA out of memory with MICRO_BATCH={micro}: lower MICRO_BATCH (e.g. "
                           f"{max(1, micro // 2)}) and keep BATCH a multiple of MICRO_BATCH x world "
                           "size."]) from None
    except RuntimeError as err:  # torch.distributed's errors are RuntimeErrors too
        if isinstance(err, AvatarlError) or not D.lost_a_peer(err):
            raise
        raise PeerLost(D.lost_peers_message(info, err)) from None  # every survivor: its own view
    finally:
        lock.release()
        D.cleanup()
    if outcome == BAD_STEPS:
        raise NonFiniteSteps(f"{streak} consecutive non-finite steps (MAX_BAD_STEPS={cfg.run.max_bad_steps}):"
                             " stopped with the last good weights saved.")
    return outcome


def loop(run: Run, stop: StopSignal) -> str:
    """Steps until TOTAL_ITERS (COMPLETED), a stop signal (STOPPED) or MAX_BAD_STEPS non-finite steps in a
    row (BAD_STEPS); the duties' at_end then save what the outcome needs (periodic.Checkpoints)."""
    cfg, state, info = run.cfg, run.state, run.info
    if D.any_rank(stop.requested, info.device):
        D.print0(f"[avatarl] stop requested before the first step: nothing new to save, exiting at iteration "
                 f"{state.iteration}.")
        return STOPPED
    role = "referee" if run.objective.method == Method.SUPERVISED else "student"
    logger = make_logger(info.is_main, run.run_dir, cfg.run.use_wandb, cfg.run.wandb_project,
                         wandb_run_name(cfg, role), {**cfg.to_dict(), "model": asdict(run.raw_model.config)},
                         cfg.optim.total_iters)
    # A bar only on a terminal; in container logs every LOG_INTERVAL line carries iter/total, speed and ETA.
    progress = Progress(run, bar=info.is_main and sys.stderr.isatty())
    throughput = Throughput()
    # In this order: a checkpoint holds the metric sums and KL controller as they are after the log.
    duties = [MetricsLog(logger, throughput, progress), Validation(logger, run), TextSamples(logger),
              Checkpoints(), Heartbeat(throughput)]
    for duty in duties:
        duty.at_start(run)
    throughput.start(run)
    progress.start(run)
    outcome = COMPLETED
    while state.iteration < cfg.optim.total_iters:
        good = train_step(run)
        for duty in duties:
            duty.after_step(run, good)
        if state.bad_streak >= cfg.run.max_bad_steps:
            outcome = BAD_STEPS
            break
        if D.any_rank(stop.requested, info.device):
            outcome = STOPPED
            break
    for duty in duties:
        duty.at_end(run, outcome)
    divergence = D.replica_divergence(run.raw_model)
    if info.is_distributed:
        logger.log({"replica_divergence": divergence, "world_size": info.world_size}, state.iteration)
    progress.close()
    logger.finish()
    D.barrier()  # no rank tears the process group down while rank 0 is still writing
    return outcome
