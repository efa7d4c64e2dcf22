"""The AvataRL referee: what REFEREE_PATH names, loaded frozen for a student run, its identity and memory.

REFEREE_PATH names one kind of referee, each a class behind `RefereeSource`:
    `RefereeFile` (own.py)       a file `avatarl train-referee` writes (CHECKPOINT_DIR/referee.pt when
                                 REFEREE_PATH is empty): `export_referee` turns that run's newest checkpoint
                                 into it
    `HuggingFaceLM` (hugging_face.py)
                                 a Hugging Face causal LM: a save_pretrained directory (config.json), or
                                 `HuggingFaceHubLM` for a hub name (at REFEREE_REVISION), loaded with
                                 `AutoModelForCausalLM`, optionally quantised while loading
                                 (REFEREE_QUANTIZE=int8|nf4, bitsandbytes, CUDA only)
Either way its token ids must mean what the student's mean (data/tokenizers.py's one check: a mismatch is
refused naming both), its context must cover CONTEXT_LEN, and it holds its weights in `referee_dtype`. One
referee per process, frozen (eval, no gradients) and never wrapped in DDP: it has no gradients to reduce.
Its identity (kind, source, revision, sha256) goes into every student checkpoint (the objective's state)
and `avatarl config` prints it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from avatarl import distributed as D
from avatarl.config import Config, ConfigError
from avatarl.config_schema import Algorithm, DeviceKind, Quantize
from avatarl.config_sections import RefereeSettings
from avatarl.data.tokenizers import Tokenizer
from avatarl.device import mixed_precision
from avatarl.referee.hugging_face import HuggingFaceHubLM, HuggingFaceLM, align_vocabulary, is_hub_name
from avatarl.referee.own import RefereeFile, check_referee_compatible, export_referee
from avatarl.run_dir import referee_path

__all__ = ["Referee", "RefereeSource", "align_vocabulary", "check_referee_compatible",
           "check_referee_quantize", "describe_identity", "describe_referee", "export_referee",
           "find_referee", "module_bytes", "open_referee", "referee_dtype"]


class RefereeSource(Protocol):
    """A referee that REFEREE_PATH names, not loaded yet."""

    kind: str            # recorded in the identity: "avatarl", "huggingface" or "huggingface-hub"
    source: str          # the file, the directory (absolute) or the hub name
    quantizable: bool    # whether REFEREE_QUANTIZE can apply to it

    def identity(self) -> dict[str, str]:
        """kind, source, revision, sha256 (and quantize for a Hugging Face LM), without loading weights."""
        ...

    def load(self, tokenizer: Tokenizer, vocab_size: int, context_len: int, dtype: torch.dtype,
             device: torch.device) -> tuple[nn.Module, dict[str, str]]:
        """(module, identity): token ids [B, T] -> logits [B, T, vocab_size], frozen on `device` in `dtype`,
        refused with one ConfigError line when its tokenizer or context does not fit the student's."""
        ...


@dataclass
class Referee:
    module: nn.Module          # token ids [B, T] -> logits [B, T, student vocab], eval mode, no gradients
    identity: dict[str, str]   # kind, source, revision, sha256 (and quantize for a Hugging Face LM)
    memory_bytes: int = field(init=False)  # of its parameters and buffers as stored (module_bytes)

    def __post_init__(self) -> None:
        self.memory_bytes = module_bytes(self.module)


def find_referee(settings: RefereeSettings, path: Path) -> RefereeSource:
    """The kind of referee at `path` (REFEREE_PATH, or its default): an avatarl file, a local Hugging Face
    directory, or a hub name; one ConfigError line when it is none of them."""
    if path.is_file():
        return RefereeFile(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return HuggingFaceLM(str(path.resolve()), settings.referee_revision, settings.referee_quantize)
        raise ConfigError([f"REFEREE_PATH={settings.referee_path!r} is a directory without config.json: use "
                           "a Hugging Face save_pretrained directory, a hub name, or a file from "
                           "`avatarl train-referee`."])
    if is_hub_name(settings.referee_path) and path.suffix != ".pt":
        return HuggingFaceHubLM(settings.referee_path, settings.referee_revision, settings.referee_quantize)
    raise ConfigError([f"REFEREE_PATH={str(path)!r}: no referee there. Train one first with "
                       "`avatarl train-referee` (same DATA_PATH and CONTEXT_LEN), or set REFEREE_PATH to it "
                       "or to a Hugging Face causal LM with the student's tokenizer."])


def referee_dtype(autocast: torch.dtype | None) -> torch.dtype:
    """The one dtype rule of a referee's weights (either kind): bf16 when the run autocasts to bf16 (CUDA with
    USE_AMP and AMP_DTYPE=bfloat16, `device.mixed_precision`), float32 otherwise (every CPU run)."""
    return torch.bfloat16 if autocast == torch.bfloat16 else torch.float32


def check_referee_quantize(cfg: Config) -> None:
    """One ConfigError line when REFEREE_QUANTIZE=int8|nf4 cannot run here: cheap, so the CLI calls it before
    any model is built. bitsandbytes' 8-bit and 4-bit kernels need CUDA, and it quantises a Hugging Face
    model while transformers loads it."""
    if cfg.run.algorithm != Algorithm.AVATARL or cfg.referee.referee_quantize == Quantize.NONE:
        return
    name = f"REFEREE_QUANTIZE={cfg.referee.referee_quantize}"
    if cfg.run.device == DeviceKind.CPU or not torch.cuda.is_available():
        where = "DEVICE=cpu" if cfg.run.device == DeviceKind.CPU else "this machine has no CUDA device"
        raise ConfigError([f"{name} needs CUDA (bitsandbytes' 8-bit / 4-bit kernels) but {where}: set "
                           "REFEREE_QUANTIZE=none (the referee then runs in float32 on a CPU, in bf16 on "
                           "CUDA with AMP_DTYPE=bfloat16)."])
    missing = [module for module in ("transformers", "accelerate", "bitsandbytes")
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError([f"{name} needs {', '.join(missing)}: pip install 'avatarl[quant]', or set "
                           "REFEREE_QUANTIZE=none."])
    found = find_referee(cfg.referee, referee_path(cfg))
    if not found.quantizable:
        raise ConfigError([f"{name} quantises a Hugging Face referee while loading it, and REFEREE_PATH="
                           f"{found.source!r} is an `avatarl train-referee` file: set REFEREE_QUANTIZE=none, "
                           "or REFEREE_PATH to a Hugging Face causal LM."])


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
        return f"referee: {describe_identity(find_referee(cfg.referee, referee_path(cfg)).identity())}"
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


def open_referee(cfg: Config, tokenizer: Tokenizer, vocab_size: int, device: torch.device) -> Referee:
    """The frozen referee of an ALGORITHM=avatarl run on `device`, its identity and memory, logged once."""
    check_referee_quantize(cfg)
    found = find_referee(cfg.referee, referee_path(cfg))
    module, identity = found.load(tokenizer, vocab_size, cfg.model.context_len,
                                  referee_dtype(mixed_precision(cfg, device)), device)
    referee = Referee(module, identity)
    memory = referee.memory_bytes
    dtypes = ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()}))
    D.print0(f"[avatarl] referee: {describe_identity(identity)}; {memory:,} bytes ({memory / 2**20:.1f} MiB) "
             f"of parameters and buffers ({dtypes}) on {device}")
    return referee
