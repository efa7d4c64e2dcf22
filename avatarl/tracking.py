"""Where metrics go: the log (one line per record, led by the run's progress), the run directory's
metrics.jsonl (and how to read it back), optionally wandb (one wandb run per run directory, resumed by
every restart, never a login prompt).

One logger is chosen once at start-up; ranks other than 0 get a logger that does nothing,
so the training loop never asks "should I log?".
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from avatarl.config import Config, is_secret
from avatarl.errors import first_line
from avatarl.files import atomic_write
from avatarl.run_dir import METRICS, WANDB_ID

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")


def setup_logging(level: str, is_main: bool) -> None:
    """Configure the root logger, so every module's `logging.getLogger(__name__)` (avatarl.trainer, ...)
    prints through one handler in one format that leaves the logger's name out."""
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
    """Rank 0's logger: a JSON line per call in metrics.jsonl, a log line (format_metrics), wandb if on."""

    def __init__(self, run_dir: Path, wandb_run: Any | None = None, total_iters: int = 0):
        self.metrics_path = run_dir / METRICS
        self.wandb_run, self.total_iters = wandb_run, total_iters

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"iter": step, **metrics}
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, allow_nan=True) + "\n")
        except OSError as err:  # e.g. a full disk: losing a metrics line must not lose the run
            log.warning("Could not append to %s (%s); training continues.", self.metrics_path, err.strerror)
        log.info(scrub_secrets(format_metrics(record, self.total_iters)))
        if self.wandb_run is not None:
            self.wandb_run.log(record)

    def log_text(self, name: str, text: str, step: int) -> None:
        log.info("%s @ iter %d:\n%s", name, step, scrub_secrets(text))
        if self.wandb_run is not None:
            self.wandb_run.log({"iter": step, name: text})

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def duration(seconds: float) -> str:
    """2h05m, 4m07s, 12s: an ETA at the precision a person reads it."""
    if not math.isfinite(seconds):
        return "unknown"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_metrics(record: dict[str, Any], total_iters: int = 0) -> str:
    """One log line: `iter I/TOTAL`, then what the run's speed says (tokens/s, ETA, MFU, peak GPU memory)
    when the record has it, then every other metric as key=value."""
    record = dict(record)
    head = [f"iter {record.pop('iter')}/{total_iters}" if total_iters else f"iter {record.pop('iter')}"]
    for key, text in (("tokens_per_s", "{:,.0f} tokens/s"), ("eta_s", "ETA {}"), ("mfu", "MFU {:.1%}"),
                      ("peak_gpu_memory_mib", "GPU memory {:,.0f} MiB")):
        if key in record:
            value = record.pop(key)
            head.append(text.format(duration(value) if key == "eta_s" else value))
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}" if math.isfinite(value) else f"{key}={value}")
        else:
            parts.append(f"{key}={value}")
    return " | ".join(head) + (" | " + " ".join(parts) if parts else "")


def wandb_run_name(cfg: Config, role: str) -> str:
    """WANDB_NAME, else RUN_NAME (empty: wandb generates one); a referee run's name ends in -referee."""
    name = cfg.run.wandb_name or cfg.run.run_name
    return f"{name}-referee" if name and role == "referee" else name


def wandb_blocker() -> str | None:
    """Why wandb cannot log here without asking for a login, or None when it can: WANDB_MODE=offline or
    disabled never asks; online needs WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE or a `wandb login` netrc entry
    for WANDB_BASE_URL's host (the sources wandb reads before it prompts)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode and mode not in WANDB_MODES:
        return f"WANDB_MODE={mode!r} is not a wandb mode (use one of {', '.join(WANDB_MODES)})"
    if mode in ("offline", "dryrun", "disabled") or os.environ.get("WANDB_API_KEY") \
            or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:  # a container user without a home directory makes expanduser raise RuntimeError
        if netrc.netrc(Path(os.environ.get("NETRC") or "~/.netrc").expanduser()).authenticators(host):
            return None
    except (OSError, RuntimeError, netrc.NetrcParseError):
        pass  # no readable netrc: no login
    return "no wandb login (set WANDB_API_KEY, run `wandb login`, or WANDB_MODE=offline to sync later)"


def new_wandb_id() -> str:
    """8 random lowercase letters and digits, the form of wandb's own run ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_run_id(run_dir: Path, new_id: Callable[[], str] = new_wandb_id) -> str:
    """The run's wandb id, kept in the run directory so that every restart and retry of the run continues
    one wandb run; a new id (saved before wandb starts) when the directory has none."""
    path = run_dir / WANDB_ID
    try:
        saved = path.read_text(encoding="utf-8").strip()
    except OSError:
        saved = ""
    if saved:
        return saved
    run_id = new_id()
    try:
        atomic_write(path, [run_id.encode()])
    except OSError as err:  # the run still logs, only a restart would open a new wandb run
        log.warning("Could not write %s (%s): a restart will open a new wandb run.", path, err.strerror)
    return run_id


def start_wandb(project: str, name: str, run_config: dict[str, Any], run_dir: Path) -> Any | None:
    """The run directory's wandb run (resumed when it exists), or None with one warning line when wandb
    is missing, would need a login or is unreachable; never prompts, never raises."""
    try:
        import wandb
    except ImportError:
        log.warning("USE_WANDB=true but wandb is not installed (pip install 'avatarl[wandb]'): "
                    "logging to metrics.jsonl only.")
        return None
    if os.environ.get("WANDB_MODE") == "":  # an empty `WANDB_MODE=` line means unset; wandb rejects ""
        del os.environ["WANDB_MODE"]
    blocker = wandb_blocker()
    if blocker is not None:
        log.warning("USE_WANDB=true but %s: logging to metrics.jsonl only.", blocker)
        return None
    try:
        run_id = wandb_run_id(run_dir)
        wandb_run = wandb.init(project=project, name=name or None, config=run_config, dir=str(run_dir),
                               id=run_id, resume="allow", settings=wandb.Settings(init_timeout=60))
        # x axis = the iteration, logged as a value: a restart re-logs the steps after its checkpoint, which
        # wandb's own step counter (monotonic) would drop.
        wandb_run.define_metric("iter")
        wandb_run.define_metric("*", step_metric="iter")
        return wandb_run
    except Exception as err:  # noqa: BLE001 - an unreachable tracker must never stop training
        log.warning("wandb could not start (%s): logging to metrics.jsonl only.", first_line(err))
        return None


def make_logger(is_main: bool, run_dir: Path, use_wandb: bool, project: str, name: str,
                run_config: dict[str, Any], total_iters: int = 0) -> NullLogger:
    if not is_main:
        return NullLogger()
    wandb_run = start_wandb(project, name, run_config, run_dir) if use_wandb else None
    return RunLogger(run_dir, wandb_run, total_iters)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order; none when the file does not exist."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
