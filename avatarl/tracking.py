"""Where metrics go: stdout, CHECKPOINT_DIR/metrics.jsonl (and how to read it back), optionally wandb.

One logger is chosen once at start-up; ranks other than 0 get a logger that does nothing,
so the training loop never asks "should I log?".
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from avatarl.config import is_secret
from avatarl.run_dir import METRICS

log = logging.getLogger("avatarl")


def setup_logging(level: str, is_main: bool) -> None:
    logging.basicConfig(level=getattr(logging, level) if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)


def scrub_secrets(text: str) -> str:
    """Replace the value of every secret-looking environment variable found in `text`."""
    for name, value in os.environ.items():
        if is_secret(name) and len(value) >= 4 and value in text:
            text = text.replace(value, "****")
    return text


class NullLogger:
    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_text(self, name: str, text: str, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class RunLogger(NullLogger):
    """Rank 0's logger: a JSON line per call in metrics.jsonl, a compact stdout line, wandb if enabled."""

    def __init__(self, run_dir: Path, wandb_run: Any | None = None):
        self.metrics_path = run_dir / METRICS
        self.wandb_run = wandb_run

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"iter": step, **metrics}
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, allow_nan=True) + "\n")
        except OSError as err:  # e.g. a full disk: losing a metrics line must not lose the run
            log.warning("Could not append to %s (%s); training continues.", self.metrics_path, err.strerror)
        log.info(scrub_secrets(format_metrics(record)))
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_text(self, name: str, text: str, step: int) -> None:
        log.info("%s @ iter %d:\n%s", name, step, scrub_secrets(text))
        if self.wandb_run is not None:
            self.wandb_run.log({name: text}, step=step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def format_metrics(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}" if math.isfinite(value) else f"{key}={value}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def start_wandb(project: str, name: str, run_config: dict[str, Any], run_dir: Path) -> Any | None:
    """A wandb run, or None with a warning when wandb is missing or unreachable; never raises."""
    try:
        import wandb
    except ImportError:
        log.warning("USE_WANDB=true but wandb is not installed (pip install 'avatarl[wandb]'): "
                    "logging to metrics.jsonl only.")
        return None
    try:
        return wandb.init(project=project, name=name or None, config=run_config, dir=str(run_dir),
                          settings=wandb.Settings(init_timeout=60))
    except Exception as err:  # noqa: BLE001 - an unreachable tracker must never stop training
        log.warning("wandb could not start (%s): logging to metrics.jsonl only.", err)
        return None


def make_logger(is_main: bool, run_dir: Path, use_wandb: bool, project: str, name: str,
                run_config: dict[str, Any]) -> NullLogger:
    if not is_main:
        return NullLogger()
    wandb_run = start_wandb(project, name, run_config, run_dir) if use_wandb else None
    return RunLogger(run_dir, wandb_run)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order; none when the file does not exist."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
