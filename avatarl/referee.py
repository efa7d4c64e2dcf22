"""The AvataRL referee: where it comes from, loading it frozen for a student run, its memory, and exporting one.

REFEREE_PATH names one of
    an avatarl referee file     `avatarl train-referee` writes it (CHECKPOINT_DIR/referee.pt when REFEREE_PATH is
                                empty): `export_referee` turns that run's newest checkpoint into it
    a Hugging Face causal LM    a save_pretrained directory (config.json) or a hub name (at REFEREE_REVISION),
                                loaded with `AutoModelForCausalLM`: bf16 on CUDA, float32 on a CPU, or quantised
                                while loading (REFEREE_QUANTIZE=int8|nf4, bitsandbytes, CUDA only)
Its token ids must mean what the student's mean (the same tokenizer: a mismatch is refused naming both) and
its context must cover CONTEXT_LEN; its logits are laid onto the student's padded vocabulary, so padding ids
never get reward or probability. One referee per process, frozen (eval, no gradients) and never wrapped in
DDP: it has no gradients to reduce. Its identity (kind, source, revision, sha256) goes into every student
checkpoint (the objective's state) and `avatarl config` prints it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatarl import distributed as D
from avatarl.algorithms.reference import load_frozen_causal_lm
from avatarl.checkpoint import CheckpointError, find_resume_checkpoint, load_checkpoint, write_checkpoint_file
from avatarl.config import Config, ConfigError
from avatarl.data.tokenizers import (
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    hf_tokenizer_file,
    pieces_sha256,
    vocabulary_difference,
)
from avatarl.files import sha256_of
from avatarl.model import GPT, PAD_LOGIT, frozen_copy
from avatarl.run_dir import METRICS, referee_path, run_dir
from avatarl.tracking import read_metrics

log = logging.getLogger("avatarl")

AVATARL, HF_LOCAL, HF_HUB = "avatarl", "huggingface", "huggingface-hub"  # the kinds of referee
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gpt2", "openai-community/gpt2"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")  # what a save_pretrained directory's identity is hashed from


@dataclass
class Referee:
    module: nn.Module          # token ids [B, T] -> logits [B, T, student vocab], eval mode, no gradients
    identity: dict[str, str]   # kind, source, revision, sha256 (and quantize for a Hugging Face LM)
    memory_bytes: int = field(init=False)  # of its parameters and buffers as stored (module_bytes)

    def __post_init__(self) -> None:
        self.memory_bytes = module_bytes(self.module)


def referee_kind(cfg: Config) -> tuple[str, str]:
    """(kind, source) of REFEREE_PATH: an avatarl file, a local Hugging Face directory, or a hub name."""
    path = referee_path(cfg)
    if path.is_file():
        return AVATARL, str(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return HF_LOCAL, str(path.resolve())
        raise ConfigError([f"REFEREE_PATH={cfg.referee.referee_path!r} is a directory without config.json: use a Hugging "
                           "Face save_pretrained directory, a hub name, or a file from `avatarl train-referee`."])
    if cfg.referee.referee_path and HUB_NAME.match(cfg.referee.referee_path) and path.suffix != ".pt":
        return HF_HUB, cfg.referee.referee_path
    raise ConfigError([f"REFEREE_PATH={str(path)!r}: no referee there. Train one first with "
                       "`avatarl train-referee` (same DATA_PATH and CONTEXT_LEN), or set REFEREE_PATH to it or to "
                       "a Hugging Face causal LM with the student's tokenizer."])


def check_referee_quantize(cfg: Config) -> None:
    """One ConfigError line when REFEREE_QUANTIZE=int8|nf4 cannot run here: cheap, so the CLI calls it before any
    model is built. bitsandbytes' 8-bit and 4-bit kernels need CUDA, and it quantises a Hugging Face model
    while transformers loads it."""
    if cfg.run.algorithm != "avatarl" or cfg.referee.referee_quantize == "none":
        return
    name = f"REFEREE_QUANTIZE={cfg.referee.referee_quantize}"
    if cfg.run.device == "cpu" or not torch.cuda.is_available():
        where = "DEVICE=cpu" if cfg.run.device == "cpu" else "this machine has no CUDA device"
        raise ConfigError([f"{name} needs CUDA (bitsandbytes' 8-bit / 4-bit kernels) but {where}: set "
                           "REFEREE_QUANTIZE=none (the referee then runs in float32 on a CPU, bf16 on CUDA)."])
    missing = [module for module in ("transformers", "accelerate", "bitsandbytes")
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError([f"{name} needs {', '.join(missing)}: pip install 'avatarl[quant]', or set "
                           "REFEREE_QUANTIZE=none."])
    if referee_kind(cfg)[0] == AVATARL:
        raise ConfigError([f"{name} quantises a Hugging Face referee while loading it, and REFEREE_PATH="
                           f"{str(referee_path(cfg))!r} is an `avatarl train-referee` file: set REFEREE_QUANTIZE=none"
                           ", or REFEREE_PATH to a Hugging Face causal LM."])


def directory_sha256(directory: Path) -> str:
    """sha256 over the name and sha256 of each weight and config file of a save_pretrained directory."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        digest.update(f"{path.name}\0{sha256_of(path)}\n".encode())
    return digest.hexdigest()


def referee_identity(cfg: Config) -> dict[str, str]:
    """What REFEREE_PATH is, without loading it: kind, source, revision (a hub name's, resolved to its commit
    when the model loads) and sha256 (of the file, or of a local directory's weight and config files)."""
    kind, source = referee_kind(cfg)
    if kind == AVATARL:
        return {"kind": kind, "source": source, "revision": "", "sha256": sha256_of(Path(source))}
    identity = {"kind": kind, "source": source, "revision": cfg.referee.referee_revision, "sha256": "",
                "quantize": cfg.referee.referee_quantize}
    if kind == HF_LOCAL:
        identity["sha256"] = directory_sha256(Path(source))
    return identity


def describe_identity(identity: dict[str, str]) -> str:
    text = f"{identity['kind']} {identity['source']!r}"
    if identity.get("revision"):
        text += f" revision {identity['revision']}"
    if identity.get("sha256"):
        text += f" sha256 {identity['sha256'][:12]}"
    if identity.get("quantize", "none") != "none":
        text += f" quantized {identity['quantize']}"
    return text


def describe_referee(cfg: Config) -> str:
    """The `avatarl config` line: the identity of the referee a student run would load."""
    try:
        return f"referee: {describe_identity(referee_identity(cfg))}"
    except ConfigError as err:
        return f"referee: none usable yet ({err.problems[0]})"


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (bitsandbytes' packed 8-bit / 4-bit weights at
    their packed size), plus the quantisation constants bitsandbytes keeps beside them (each 4-bit block's
    absmax, nested or not, and the int8 row scales). Tied tensors count once."""
    tensors = [*module.parameters(), *module.buffers()]
    for param in module.parameters():
        state = getattr(param, "quant_state", None)
        while state is not None:
            tensors += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None))
                        if isinstance(t, Tensor)]
            state = getattr(state, "state2", None)
        scales = getattr(param, "SCB", None)
        if isinstance(scales, Tensor):
            tensors.append(scales)
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def token_table_sha256(tokenizer: Tokenizer) -> str | None:
    """sha256 of the bytes each id stands for, in id order (as TiktokenTokenizer's identity hashes them), so a
    tiktoken and a Hugging Face byte-level tokenizer with the same table compare equal (GPT-2 in both forms);
    None for a tokenizer whose ids are not byte strings (chars, a tokenizer that is not byte-level)."""
    if isinstance(tokenizer, TiktokenTokenizer):
        return tokenizer.identity.sha256
    if not isinstance(tokenizer, HFTokenizer) or not tokenizer.byte_level:
        return None
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte <-> printable char table

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}

    def piece(i: int) -> bytes:
        token = tokenizer.tokenizer.id_to_token(i) or ""
        if token in tokenizer.special or any(char not in byte_of for char in token):
            return token.encode("utf-8")
        return bytes(byte_of[char] for char in token)

    return pieces_sha256(piece(i) for i in range(tokenizer.size))


def check_referee_tokenizer(theirs: Tokenizer, mine: Tokenizer, source: str) -> None:
    """One ConfigError line naming both tokenizers unless their ids mean the same: the same identity (kind and
    sha256 of the definition) or the same table of token bytes."""
    if theirs.identity == mine.identity:
        return
    table = token_table_sha256(mine)
    if table is not None and table == token_table_sha256(theirs):
        return
    raise ConfigError([f"REFEREE_PATH={source!r}: tokenizer mismatch: the referee's is {theirs.identity.describe()}, "
                       f"the student's is {mine.identity.describe()}; use a referee with the student's tokenizer, or "
                       "set TOKENIZER (and prepare DATA_PATH) with the referee's."])


def align_vocabulary(logits: Tensor, valid_vocab: int, vocab_size: int) -> Tensor:
    """A referee's logits [..., V_ref] on the student's padded vocabulary [..., vocab_size].

    Ids below valid_vocab (the shared tokenizer's) keep their logit; the referee's own ids from valid_vocab
    on (its padding) are dropped; the student's padding ids valid_vocab .. vocab_size - 1 get PAD_LOGIT, as
    the student's own logits do, so no reward or probability reaches them.
    """
    if logits.size(-1) < valid_vocab:
        raise ValueError(f"the referee scores {logits.size(-1)} ids, fewer than the tokenizer's {valid_vocab}")
    return F.pad(logits[..., :valid_vocab], (0, vocab_size - valid_vocab), value=PAD_LOGIT)


class HFRefereeLM(nn.Module):
    """A Hugging Face causal LM as referee: token ids [B, T] -> logits [B, T, vocab_size] (`align_vocabulary`)."""

    def __init__(self, lm: nn.Module, valid_vocab: int, vocab_size: int):
        super().__init__()
        self.lm, self.valid_vocab, self.vocab_size = lm, valid_vocab, vocab_size

    def forward(self, idx: Tensor) -> Tensor:
        logits = self.lm(input_ids=idx, use_cache=False).logits  # [B, T, V_ref]
        return align_vocabulary(logits, self.valid_vocab, self.vocab_size)


def hf_referee_tokenizer(kind: str, source: str, revision: str) -> HFTokenizer:
    """The tokenizer.json beside a Hugging Face referee (a local directory's, or the hub repository's)."""
    if kind == HF_LOCAL:
        found = hf_tokenizer_file(Path(source))
    else:
        try:
            from huggingface_hub import hf_hub_download

            found = Path(hf_hub_download(source, "tokenizer.json", revision=revision or None))
        except Exception as err:  # noqa: BLE001 - hub errors (offline, not found, gated) have many types
            raise ConfigError([f"REFEREE_PATH={source!r}: no local file or directory, and no tokenizer.json from the "
                               f"Hugging Face hub ({type(err).__name__}): check the name, the network or HF_TOKEN, "
                               "or point REFEREE_PATH at a local save_pretrained directory."]) from None
    if found is None:
        raise ConfigError([f"REFEREE_PATH={source!r}: no tokenizer.json beside the model, so its tokenizer cannot be "
                           "compared with the student's: save the model's fast tokenizer there (save_pretrained)."])
    return HFTokenizer(found, source)


def quantization_config(quantize: str) -> Any:
    """bitsandbytes' settings for REFEREE_QUANTIZE (None for none): 8-bit LLM.int8(), or 4-bit NF4 blocks that
    compute in bf16."""
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def load_hf_referee(cfg: Config, identity: dict[str, str], tokenizer: Tokenizer, vocab_size: int,
                    device: torch.device) -> tuple[nn.Module, dict[str, str]]:
    """A Hugging Face causal LM as referee, checked (tokenizer, vocabulary, context) before its weights load."""
    kind, source = identity["kind"], identity["source"]
    check_referee_tokenizer(hf_referee_tokenizer(kind, source, cfg.referee.referee_revision), tokenizer, source)
    from transformers import AutoConfig

    lm_config = AutoConfig.from_pretrained(source, revision=cfg.referee.referee_revision or None)
    if getattr(lm_config, "vocab_size", tokenizer.size) < tokenizer.size:
        raise ConfigError([f"REFEREE_PATH={source!r}: the model scores {lm_config.vocab_size} ids, fewer than its "
                           f"tokenizer's {tokenizer.size}: it is not a language model of that tokenizer."])
    positions = getattr(lm_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions < cfg.model.context_len:
        raise ConfigError([f"REFEREE_PATH={source!r}: the model reads at most {positions} positions but the student "
                           f"uses CONTEXT_LEN={cfg.model.context_len}: lower CONTEXT_LEN or use a longer-context referee."])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm = load_frozen_causal_lm(source, device, dtype, cfg.referee.referee_revision, quantization_config(cfg.referee.referee_quantize))
    if kind == HF_HUB:
        identity = {**identity, "revision": getattr(lm.config, "_commit_hash", None) or cfg.referee.referee_revision}
    referee = HFRefereeLM(lm, tokenizer.size, vocab_size).eval()
    referee.requires_grad_(False)
    return referee, identity


def open_referee(cfg: Config, tokenizer: Tokenizer, vocab_size: int, device: torch.device) -> Referee:
    """The frozen referee of an ALGORITHM=avatarl run on `device`, its identity and memory, logged once."""
    check_referee_quantize(cfg)
    identity = referee_identity(cfg)
    if identity["kind"] == AVATARL:
        module = load_referee(cfg, tokenizer, device)
    else:
        module, identity = load_hf_referee(cfg, identity, tokenizer, vocab_size, device)
    referee = Referee(module, identity)
    memory = referee.memory_bytes
    dtypes = ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()}))
    D.print0(f"[avatarl] referee: {describe_identity(identity)}; {memory:,} bytes ({memory / 2**20:.1f} MiB) of "
             f"parameters and buffers ({dtypes}) on {device}")
    return referee


def check_referee_compatible(referee_meta: dict, tokenizer: Tokenizer, context_len: int) -> None:
    """Raise ValueError when a referee file cannot score this run's student.

    `referee_meta` holds `tokenizer` (its identity) or, for a char referee, `vocab_chars` (its symbols in
    token order), and `context_len` (the longest context it was trained for). Token ids must mean the same
    in both (same tokenizer; for chars the same symbols in the same order) and the referee's context must
    be at least the student's. Messages do not name the path; the caller prefixes it.
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


def load_referee(cfg: Config, tokenizer: Tokenizer, device: torch.device) -> nn.Module:
    """The frozen avatarl referee file of REFEREE_PATH, checked against this run's tokenizer and context."""
    path = referee_path(cfg)  # a file: referee_kind has checked it
    try:
        saved = load_checkpoint(path, map_location=device)
        check_referee_compatible(saved, tokenizer, cfg.model.context_len)
    except (CheckpointError, ValueError) as err:
        raise ConfigError([f"REFEREE_PATH={str(path)!r}: {err}"]) from None
    referee = GPT.from_saved(saved, device)
    if device.type == "cuda" and cfg.optim.use_amp and cfg.optim.amp_dtype == "bfloat16":
        referee = referee.to(torch.bfloat16)
    return frozen_copy(referee)


def last_val_ce(metrics_path: Path) -> float | None:
    """The newest validation CE a run logged, or None when it logged none."""
    values = [record["val_ce"] for record in read_metrics(metrics_path) if "val_ce" in record]
    return values[-1] if values else None


def export_referee(cfg: Config) -> Path:
    """Write REFEREE_PATH (weights, model shape, vocabulary, context length, val CE) atomically."""
    directory = run_dir(cfg.run.checkpoint_dir, "referee")
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
