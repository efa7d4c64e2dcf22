"""Export the trained referee: the newest referee-run checkpoint becomes REFEREE_PATH."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from avatarl.checkpoint import find_resume_checkpoint, load_checkpoint, write_checkpoint_file
from avatarl.config import Config
from avatarl.objectives import referee_path

log = logging.getLogger("avatarl")


def last_val_ce(metrics_path: Path) -> float | None:
    value = None
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            record = json.loads(line)
            value = record.get("val_ce", value)
    return value


def export_referee(cfg: Config) -> Path:
    """Write REFEREE_PATH (weights, model shape, vocabulary, context length, val CE) atomically."""
    run_dir = Path(cfg.checkpoint_dir).expanduser() / "referee"
    source = find_resume_checkpoint(run_dir)
    if source is None:
        raise FileNotFoundError(f"no referee checkpoint in {run_dir}")
    saved = load_checkpoint(source)
    val_ce = last_val_ce(run_dir / "metrics.jsonl")
    payload = {"model": saved["model"], "model_config": saved["model_config"], "vocab_chars": saved["vocab"],
               "context_len": saved["config"]["context_len"], "val_ce": val_ce, "iteration": saved["iteration"]}
    target = referee_path(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint_file(target, payload)
    print(f"[avatarl] referee saved to {target} (val CE {val_ce:.4f} nats/char)" if val_ce is not None
          else f"[avatarl] referee saved to {target}", flush=True)
    return target
