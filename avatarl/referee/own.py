"""A referee file of `avatarl train-referee`: exporting the referee run's newest checkpoint into it, and
loading it frozen for a student run once its tokenizer and context are checked against the student's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from avatarl.checkpoint import CheckpointError, find_resume_checkpoint, load_checkpoint, write_checkpoint_file
from avatarl.config import Config, ConfigError
from avatarl.data.tokenizers import Tokenizer, vocabulary_difference
from avatarl.files import sha256_of
from avatarl.model import GPT, frozen_copy
from avatarl.run_dir import METRICS, referee_path, run_dir
from avatarl.tracking import read_metrics


class RefereeFile:
    """An exported referee (weights, model shape, tokenizer, context length, val CE) as REFEREE_PATH."""

    kind = "avatarl"
    quantizable = False  # bitsandbytes quantises Hugging Face models while they load

    def __init__(self, path: Path):
        self.path, self.source = path, str(path)

    def identity(self) -> dict[str, str]:
        return {"kind": self.kind, "source": self.source, "revision": "", "sha256": sha256_of(self.path)}

    def load(self, tokenizer: Tokenizer, vocab_size: int, context_len: int, dtype: torch.dtype,
             device: torch.device) -> tuple[nn.Module, dict[str, str]]:
        """The frozen GPT of the file, checked against this run's tokenizer and context. `vocab_size` is not
        needed: the file's model pads the same tokenizer as the student's does."""
        identity = self.identity()
        try:
            saved = load_checkpoint(self.path, map_location=device)
            check_referee_compatible(saved, tokenizer, context_len)
        except (CheckpointError, ValueError) as err:
            raise ConfigError([f"REFEREE_PATH={self.source!r}: {err}"]) from None
        return frozen_copy(GPT.from_saved(saved, device).to(dtype)), identity


def check_referee_compatible(referee_meta: dict, tokenizer: Tokenizer, context_len: int) -> None:
    """Raise ValueError when a referee file cannot score this run's student.

    `referee_meta` holds `tokenizer` (its identity) or, for a char referee, `vocab_chars` (its symbols in
    token order), and `context_len` (the longest context it was trained for). Token ids must mean the same
    in both (data/tokenizers.py's one check) and the referee's context must be at least the student's.
    Messages do not name the path; the caller prefixes it.
    """
    missing = [key for key in ("vocab_chars", "context_len") if key not in referee_meta
               and not (key == "vocab_chars" and referee_meta.get("tokenizer"))]
    if missing:
        raise ValueError(f"not a referee checkpoint: its metadata lacks {', '.join(missing)}; "
                         "train one with `avatarl train-referee`.")
    difference = vocabulary_difference(referee_meta, tokenizer)
    if difference:
        raise ValueError(f"vocabulary differs ({difference}): the referee was trained on other data; "
                         "retrain it on this DATA_PATH and TOKENIZER with `avatarl train-referee`.")
    if int(referee_meta["context_len"]) < context_len:
        raise ValueError(f"context length too short: the referee was trained with CONTEXT_LEN="
                         f"{referee_meta['context_len']} but the student uses CONTEXT_LEN={context_len}; "
                         "retrain it with `avatarl train-referee` at this CONTEXT_LEN, or lower CONTEXT_LEN.")


def last_val_ce(metrics_path: Path) -> float | None:
    """The newest validation CE a run logged, or None when it logged none."""
    values = [record["val_ce"] for record in read_metrics(metrics_path) if "val_ce" in record]
    return values[-1] if values else None


def export_referee(cfg: Config) -> Path:
    """Write REFEREE_PATH (weights, model shape, vocabulary, context length, val CE) atomically from the
    newest checkpoint of the referee run (CHECKPOINT_DIR/RUN_NAME/referee)."""
    directory = run_dir(cfg, "referee")
    source = find_resume_checkpoint(directory)
    if source is None:
        raise FileNotFoundError(f"no referee checkpoint in {directory}")
    saved = load_checkpoint(source)
    val_ce = last_val_ce(directory / METRICS)
    payload: dict[str, Any] = {"model": saved["model"], "model_config": saved["model_config"],
                               "vocab_chars": saved["vocab"], "tokenizer": saved.get("tokenizer"),
                               "context_len": saved["config"]["context_len"],
                               "val_ce": val_ce, "iteration": saved["iteration"]}
    target = referee_path(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint_file(target, payload)
    print(f"[avatarl] referee saved to {target} (val CE {val_ce:.4f} nats/char)" if val_ce is not None
          else f"[avatarl] referee saved to {target}", flush=True)
    return target
