"""The training loop's duties around the optimizer steps: log metrics, validate, print text samples,
beat the heart, save checkpoints. Each decides for itself when it is due, so the loop only calls them.

    at_start(run)            once, before the first step of this process
    after_step(run, good)    after every optimizer step (good: the step was finite and applied)
    at_end(run, outcome)     once, when the loop ends: COMPLETED, STOPPED (by a signal) or BAD_STEPS
"""

from __future__ import annotations

import logging
import math
import resource
import time

from avatarl import distributed as D
from avatarl.data.sampler import eval_windows
from avatarl.evaluation import validation_metrics
from avatarl.generate import format_samples, training_samples
from avatarl.health import degeneracy_warning, sample_health
from avatarl.progress import Progress
from avatarl.resume import save_run
from avatarl.run import Run
from avatarl.run_dir import write_heartbeat
from avatarl.tracking import NullLogger

log = logging.getLogger(__name__)

COMPLETED, STOPPED, BAD_STEPS = "completed", "stopped", "bad_steps"


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def every(interval: int, run: Run) -> bool:
    """Due every `interval` iterations and at the last one."""
    return run.state.iteration % interval == 0 or run.state.iteration == run.cfg.optim.total_iters


class Duty:
    """A duty that does nothing; subclasses override the moments they care about."""

    def at_start(self, run: Run) -> None:
        pass

    def after_step(self, run: Run, good: bool) -> None:
        pass

    def at_end(self, run: Run, outcome: str) -> None:
        pass


class Throughput:
    """Corpus tokens per second since `start` (called once the loop's first step is next; a resumed run
    counts afresh)."""

    def __init__(self) -> None:
        self.started, self.tokens_at_start = time.perf_counter(), 0

    def start(self, run: Run) -> None:
        self.started, self.tokens_at_start = time.perf_counter(), run.state.tokens_seen

    def tokens_per_s(self, run: Run) -> float:
        return (run.state.tokens_seen - self.tokens_at_start) / max(1e-9, time.perf_counter() - self.started)


class MetricsLog(Duty):
    """Every LOG_INTERVAL: drain the on-device metrics (one all-reduce) and log them with
    the run's pace (tokens/s, ETA; on CUDA MFU and peak GPU memory: progress.Progress)."""

    def __init__(self, logger: NullLogger, throughput: Throughput, progress: Progress):
        self.logger, self.throughput, self.progress = logger, throughput, progress

    def after_step(self, run: Run, good: bool) -> None:
        self.progress.step()
        if not every(run.cfg.run.log_interval, run):
            return
        metrics = run.metrics.drain()
        metrics.update(run.objective.host_metrics())
        rate = self.throughput.tokens_per_s(run)
        metrics.update(tokens_seen=run.state.tokens_seen, tokens_per_s=rate,
                       bad_steps_total=run.state.bad_total, peak_rss_mib=peak_rss_mib())
        metrics.update(self.progress.measure(run.state.iteration, rate))
        self.logger.log(metrics, run.state.iteration)
        self.progress.show(metrics)
        if "entropy" in metrics and metrics["entropy"] < run.cfg.run.entropy_warn:
            log.warning("Policy entropy %.3f nats/char is below ENTROPY_WARN=%s: the policy is collapsing.",
                        metrics["entropy"], run.cfg.run.entropy_warn)


class Validation(Duty):
    """At iteration 0 and every EVAL_INTERVAL: evaluation.validation_metrics (val_ce, val_bpb, val_acc, the
    calibrated CE and its temperature) on EVAL_WINDOWS fixed validation windows."""

    def __init__(self, logger: NullLogger, run: Run):
        self.logger = logger
        self.windows = eval_windows(run.corpus.val, run.cfg.model.context_len, run.cfg.run.eval_windows,
                                    run.info.device)

    def _measure(self, run: Run) -> dict[str, float]:
        return validation_metrics(run.raw_model, self.windows, run.corpus.token_bytes)

    def at_start(self, run: Run) -> None:
        if run.state.iteration == 0:
            self.logger.log({**self._measure(run), "tokens_seen": 0}, 0)

    def after_step(self, run: Run, good: bool) -> None:
        if every(run.cfg.run.eval_interval, run):
            measured = self._measure(run)
            self.logger.log({**measured, "val_ppl": math.exp(min(measured["val_ce"], 50.0)),
                             "tokens_seen": run.state.tokens_seen}, run.state.iteration)


class TextSamples(Duty):
    """Rank 0, every SAMPLE_INTERVAL (0 = never) and when the run completes: a few generated lines,
    and their degeneracy (distinct-n, longest run of one token) as metrics, with a warning past
    DEGENERACY_WARN."""

    def __init__(self, logger: NullLogger):
        self.logger = logger

    def _log(self, run: Run) -> None:
        samples = training_samples(run.raw_model, run.corpus.tokenizer, run.info.device,
                                   run.cfg.run.seed + run.state.iteration)
        self.logger.log_text("samples", format_samples(samples), run.state.iteration)
        health = sample_health([sample.ids for sample in samples])
        self.logger.log({**health, "tokens_seen": run.state.tokens_seen}, run.state.iteration)
        warning = degeneracy_warning(health, run.cfg.run.degeneracy_warn)
        if warning:
            log.warning(warning)

    def after_step(self, run: Run, good: bool) -> None:
        interval = run.cfg.run.sample_interval
        if run.info.is_main and interval and run.state.iteration % interval == 0:
            self._log(run)

    def at_end(self, run: Run, outcome: str) -> None:
        if run.info.is_main and outcome == COMPLETED:
            self._log(run)


# Listed after Checkpoints: a run is marked finished only once its last checkpoint is saved.
class Heartbeat(Duty):
    """Rank 0, every HEARTBEAT_INTERVAL seconds: heartbeat.json; at the end, whether the run completed."""

    def __init__(self, throughput: Throughput):
        self.throughput, self.last_beat = throughput, 0.0

    def after_step(self, run: Run, good: bool) -> None:
        if run.info.is_main and time.monotonic() - self.last_beat >= run.cfg.run.heartbeat_interval:
            self.last_beat = time.monotonic()
            write_heartbeat(run.run_dir, run.state.iteration, run.cfg.optim.total_iters,
                            self.throughput.tokens_per_s(run))

    def at_end(self, run: Run, outcome: str) -> None:
        if run.info.is_main:
            write_heartbeat(run.run_dir, run.state.iteration, run.cfg.optim.total_iters, 0.0,
                            finished=outcome == COMPLETED)


class Checkpoints(Duty):
    """Every save of a run: every CHECKPOINT_INTERVAL after a good step, and at the end after a stop signal
    (always: the run continues from it), MAX_BAD_STEPS (the last good weights) or the last step (with
    SAVE_FINAL_CHECKPOINT). save_run skips an iteration already on disk."""

    def after_step(self, run: Run, good: bool) -> None:
        settings = run.cfg.run
        if settings.save_intermediate_checkpoints and good and \
                run.state.iteration % settings.checkpoint_interval == 0:
            save_run(run)

    def at_end(self, run: Run, outcome: str) -> None:
        if outcome in (STOPPED, BAD_STEPS) or (outcome == COMPLETED and run.cfg.run.save_final_checkpoint):
            save_run(run)
        if outcome == STOPPED:
            D.print0(f"[avatarl] stop requested: checkpoint saved at iteration {run.state.iteration}, "
                     "exiting.")
