"""The training loop shared by the RL student (GRPO or AvataRL) and the supervised referee.

    python -m avatarl train                                  # one process: CPU or one GPU
    torchrun --nproc-per-node=4 -m avatarl train             # DDP, NCCL on CUDA, gloo on CPU

`train()` sets the process up and turns failures into exit codes; `build()` makes a Run; `loop()` runs
`train_step()` (one optimizer step over BATCH contexts) and the periodic duties of periodic.py; what is
optimised lives in objectives.py.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from avatarl import distributed as D
from avatarl import exit_codes
from avatarl.checkpoint import CheckpointError, RunDirectoryBusy, RunLock, find_resume_checkpoint
from avatarl.config import Config, ConfigError
from avatarl.data.corpus import load_corpus
from avatarl.data.sampler import make_sampler
from avatarl.device import check_device, mixed_precision
from avatarl.faults import bad_iterations
from avatarl.model import GPT, GPTConfig
from avatarl.objectives import build_objective
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
from avatarl.resume import restore_run, save_run
from avatarl.rng import seed_everything
from avatarl.run import MetricBuffer, Run, RunState
from avatarl.run_dir import clear_run, prepare_run_dir
from avatarl.schedule import learning_rate
from avatarl.signals import StopSignal
from avatarl.tracking import make_logger, setup_logging

log = logging.getLogger("avatarl")


def model_config(cfg: Config, vocab_size: int, role: str = "student", valid_vocab_size: int = 0) -> GPTConfig:
    """The student's shape, or the referee's (REFEREE_N_*, each 0 = the student's); ids from valid_vocab_size
    up to vocab_size are padding (see GPTConfig)."""
    def pick(own: int, student: int) -> int:
        return own if role == "referee" and own > 0 else student

    return GPTConfig(vocab_size=vocab_size, block_size=cfg.seq_len, n_layer=pick(cfg.referee.referee_n_layer, cfg.model.n_layer),
                     n_head=pick(cfg.referee.referee_n_head, cfg.model.n_head), n_emb=pick(cfg.referee.referee_n_emb, cfg.model.n_emb),
                     use_flash_attn=cfg.model.use_flash_attn, valid_vocab_size=valid_vocab_size)


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.optim.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
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
    scaler = torch.amp.GradScaler(info.device.type, enabled=mixed_precision(cfg, info.device) == torch.float16)
    sampler = make_sampler(corpus.train, objective.window_len, cfg.run.seed, info.rank, info.device)
    D.print0(f"[avatarl] {role}: {raw_model.num_params() / 1e6:.2f}M parameters, attention via "
             f"{raw_model.attention_backend}, device {info.device}, world size {info.world_size}, "
             f"{cfg.optim.grad_accum_steps(info.world_size)} micro-batch(es) of {cfg.optim.micro_batch} per step")
    if cfg.model.use_cuda_graphs and objective.name == "grpo":
        where = "replayed from a CUDA graph" if info.device.type == "cuda" else "eager (CUDA graphs need CUDA)"
        D.print0(f"[avatarl] USE_CUDA_GRAPHS: rollout decode steps {where}")
    return Run(cfg, info, corpus, model, raw_model, optimizer, scaler, sampler, objective, run_dir, RunState(),
               MetricBuffer(info.device), bad_iterations=bad_iterations())


def train_step(run: Run) -> bool:
    """One optimizer step over BATCH contexts. Returns False when the step was skipped as non-finite."""
    cfg, state = run.cfg, run.state
    lr = learning_rate(state.iteration, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_iters, cfg.optim.total_iters,
                       cfg.optim.use_lr_decay, cfg.optim.lr_decay_type)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.objective.prepare_step(state.iteration, state.chars_seen)
    accum = cfg.optim.grad_accum_steps(run.info.world_size)
    dtype = mixed_precision(cfg, run.info.device)
    total_loss = torch.zeros((), device=run.info.device)
    for micro in range(accum):
        window = run.sampler.sample(cfg.optim.micro_batch)
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
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.optim.grad_clip or float("inf"))
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
        raise ConfigError([f"RESUME={cfg.run.resume!r}: no such checkpoint file (use auto, never or a path)."])
    return path


def agreed_resume_path(cfg: Config, run_dir: Path, info: D.DistInfo) -> Path | None:
    """resume_path as rank 0 sees it, on every rank: ranks that each picked their own newest checkpoint
    (another node's view of the directory lagging behind) would resume different iterations."""
    return D.decided_by_rank0(lambda: resume_path(cfg, run_dir), info, "the checkpoint to resume from")


def train(cfg: Config, role: str = "student") -> int:
    """Run training to TOTAL_ITERS (or a stop signal). Returns the process exit code."""
    info = D.init_distributed(cfg.run.device, cfg.distributed.dist_timeout_s)
    setup_logging(cfg.run.log_level, info.is_main)
    lock = RunLock(Path(cfg.run.checkpoint_dir))
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
            elif info.is_main and cfg.run.overwrite:
                clear_run(run_dir)
            code = loop(run, stop)
            # DDP's reducer keeps its last gloo/NCCL work, which holds tensors: release it while the process
            # group and the interpreter are alive, not during interpreter finalization (a rare abort at exit).
            del run
            gc.collect()
            return code
    except KeyboardInterrupt:
        D.print0("[avatarl] aborted by a second interrupt: the step in progress is lost, the newest checkpoint "
                 "on disk is intact.")
        return exit_codes.ABORTED
    except RunDirectoryBusy as err:
        D.print0(f"error: {err}")
        return exit_codes.BUSY
    except (ConfigError, CheckpointError) as err:
        for line in str(err).splitlines():
            D.print0(f"error: {line}")
        return exit_codes.CONFIG
    except torch.cuda.OutOfMemoryError:
        D.print0(f"error: CUDA out of memory with MICRO_BATCH={cfg.optim.micro_batch}: lower MICRO_BATCH (e.g. "
                 f"{max(1, cfg.optim.micro_batch // 2)}) and keep BATCH a multiple of MICRO_BATCH x world size.")
        return exit_codes.CONFIG
    except RuntimeError as err:  # torch.distributed's errors are RuntimeErrors too
        if not D.lost_a_peer(err):
            raise
        print(D.lost_peers_message(info, err), file=sys.stderr, flush=True)  # every survivor: its own view
        return exit_codes.FAILED
    finally:
        lock.release()
        D.cleanup()


def loop(run: Run, stop: StopSignal) -> int:
    """Steps until TOTAL_ITERS, a stop signal (checkpoint, exit 0) or MAX_BAD_STEPS (checkpoint, exit 3)."""
    cfg, state, info = run.cfg, run.state, run.info
    if D.any_rank(stop.requested, info.device):
        D.print0(f"[avatarl] stop requested before the first step: nothing new to save, exiting at iteration "
                 f"{state.iteration}.")
        return exit_codes.OK
    logger = make_logger(info.is_main, run.run_dir, cfg.run.use_wandb, cfg.run.wandb_project, cfg.run.wandb_name,
                         {**cfg.to_dict(), "model": asdict(run.raw_model.config)})
    progress = tqdm(total=cfg.optim.total_iters, initial=state.iteration, desc=run.objective.name, dynamic_ncols=True,
                    disable=not (info.is_main and sys.stderr.isatty()))
    throughput = Throughput()
    # In this order: a checkpoint holds the metric sums and KL controller as they are after the log.
    duties = [MetricsLog(logger, throughput, progress), Validation(logger, run), TextSamples(logger),
              Checkpoints(), Heartbeat(throughput)]
    for duty in duties:
        duty.at_start(run)
    throughput.start(run)
    outcome = COMPLETED
    while state.iteration < cfg.optim.total_iters:
        good = train_step(run)
        for duty in duties:
            duty.after_step(run, good)
        if state.bad_streak >= cfg.run.max_bad_steps:
            D.print0(f"error: {state.bad_streak} consecutive non-finite steps (MAX_BAD_STEPS={cfg.run.max_bad_steps}):"
                     " stopping with the last good weights saved.")
            outcome = BAD_STEPS
            break
        if D.any_rank(stop.requested, info.device):
            save_run(run)
            D.print0(f"[avatarl] stop requested: checkpoint saved at iteration {state.iteration}, exiting.")
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
    return exit_codes.BAD_STEPS if outcome == BAD_STEPS else exit_codes.OK
