"""A Hugging Face causal LM as AvataRL referee, and the one loader of a frozen Hugging Face causal LM.

`load_frozen_causal_lm` (also GRPO's REFERENCE=gpt2 credit model) loads `AutoModelForCausalLM` for
scoring only, optionally quantised by bitsandbytes while loading. `HuggingFaceLM` is a save_pretrained
directory as referee, `HuggingFaceHubLM` a hub name: both check the tokenizer.json beside the model (the
one check of data/tokenizers.py), its vocabulary and its context before the weights load, and lay its
logits onto the student's padded vocabulary (`align_vocabulary`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatarl.config import ConfigError
from avatarl.config_schema import Quantize
from avatarl.data.tokenizers import HFTokenizer, Tokenizer, hf_tokenizer_file, tokenizer_difference
from avatarl.files import sha256_of
from avatarl.model import PAD_LOGIT

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gpt2", "openai-community/gpt2"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")  # a save_pretrained directory's identity hashes these


def is_hub_name(text: str) -> bool:
    """Whether REFEREE_PATH reads as a hub model name ("gpt2", "openai-community/gpt2")."""
    return bool(text) and HUB_NAME.match(text) is not None


def quantization_config(quantize: Quantize, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes' settings for REFEREE_QUANTIZE (None for none): 8-bit LLM.int8(), or 4-bit NF4 blocks
    that compute in `compute_dtype` (the referee's dtype)."""
    if quantize == Quantize.NONE:
        return None
    from transformers import BitsAndBytesConfig

    if quantize == Quantize.INT8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute_dtype)


def load_frozen_causal_lm(name_or_path: str, device: torch.device | str, dtype: torch.dtype = torch.float32,
                          revision: str = "", quantize: Quantize = Quantize.NONE) -> nn.Module:
    """A Hugging Face causal LM that only scores: `AutoModelForCausalLM` from a hub name or a local directory,
    eval mode, no gradients, on `device` in `dtype`; quantised by bitsandbytes while loading (int8, nf4),
    it is placed on `device` by transformers (a quantised model cannot be moved)."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise ImportError("a Hugging Face causal LM needs the transformers library: "
                          "pip install 'avatarl[gpt2]'") from err
    # Loaded in `dtype` (transformers 5 calls the argument dtype, 4.x torch_dtype): what bitsandbytes leaves
    # unquantised (embeddings, norms) stays in it too, and a large model never exists in float32 on the host.
    dtype_argument = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    options: dict[str, Any] = {"revision": revision or None, dtype_argument: dtype}
    settings = quantization_config(quantize, dtype)
    if settings is None:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **options).to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, quantization_config=settings,
                                                     device_map={"": str(torch.device(device))}, **options)
    model.eval()
    model.requires_grad_(False)
    return model


def directory_sha256(directory: Path) -> str:
    """sha256 over the name and sha256 of each weight and config file of a save_pretrained directory."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        digest.update(f"{path.name}\0{sha256_of(path)}\n".encode())
    return digest.hexdigest()


def align_vocabulary(logits: Tensor, valid_vocab: int, vocab_size: int) -> Tensor:
    """A referee's logits [..., V_ref] on the student's padded vocabulary [..., vocab_size].

    Ids below valid_vocab (the shared tokenizer's) keep their logit; the referee's own ids from valid_vocab
    on (its padding) are dropped; the student's padding ids valid_vocab .. vocab_size - 1 get PAD_LOGIT, as
    the student's own logits do, so no reward or probability reaches them.
    """
    if logits.size(-1) < valid_vocab:
        raise ValueError(f"the referee scores {logits.size(-1)} ids, fewer than the tokenizer's "
                         f"{valid_vocab}")
    return F.pad(logits[..., :valid_vocab], (0, vocab_size - valid_vocab), value=PAD_LOGIT)


class HFRefereeLM(nn.Module):
    """A Hugging Face causal LM as referee: token ids [B, T] -> logits [B, T, vocab_size], aligned."""

    def __init__(self, lm: nn.Module, valid_vocab: int, vocab_size: int):
        super().__init__()
        self.lm, self.valid_vocab, self.vocab_size = lm, valid_vocab, vocab_size

    def forward(self, idx: Tensor) -> Tensor:
        logits = self.lm(input_ids=idx, use_cache=False).logits  # [B, T, V_ref]
        return align_vocabulary(logits, self.valid_vocab, self.vocab_size)


class HuggingFaceLM:
    """A save_pretrained directory (config.json, weights, tokenizer.json) as referee."""

    kind = "huggingface"
    quantizable = True

    def __init__(self, source: str, revision: str, quantize: Quantize):
        self.source, self.revision, self.quantize = source, revision, quantize

    def sha256(self) -> str:
        return directory_sha256(Path(self.source))

    def identity(self) -> dict[str, str]:
        return {"kind": self.kind, "source": self.source, "revision": self.revision, "sha256": self.sha256(),
                "quantize": str(self.quantize)}

    def tokenizer_file(self) -> Path | None:
        return hf_tokenizer_file(Path(self.source))

    def loaded_revision(self, lm: nn.Module) -> str:
        """The revision the identity records once the weights are loaded."""
        return self.revision

    def load(self, tokenizer: Tokenizer, vocab_size: int, context_len: int, dtype: torch.dtype,
             device: torch.device) -> tuple[nn.Module, dict[str, str]]:
        """The causal LM, checked (tokenizer, vocabulary, context) before its weights load, and its
        identity."""
        identity = self.identity()
        self.check_tokenizer(tokenizer)
        from transformers import AutoConfig

        lm_config = AutoConfig.from_pretrained(self.source, revision=self.revision or None)
        if getattr(lm_config, "vocab_size", tokenizer.size) < tokenizer.size:
            raise ConfigError([f"REFEREE_PATH={self.source!r}: the model scores {lm_config.vocab_size} ids, "
                               f"fewer than its tokenizer's {tokenizer.size}: it is not a language model of "
                               "that tokenizer."])
        positions = getattr(lm_config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions < context_len:
            raise ConfigError([f"REFEREE_PATH={self.source!r}: the model reads at most {positions} positions "
                               f"but the student uses CONTEXT_LEN={context_len}: lower CONTEXT_LEN or use a "
                               "longer-context referee."])
        lm = load_frozen_causal_lm(self.source, device, dtype, self.revision, self.quantize)
        referee = HFRefereeLM(lm, tokenizer.size, vocab_size).eval()
        referee.requires_grad_(False)
        return referee, {**identity, "revision": self.loaded_revision(lm)}

    def check_tokenizer(self, mine: Tokenizer) -> None:
        """One ConfigError line naming both tokenizers unless the referee's ids mean the student's."""
        found = self.tokenizer_file()
        if found is None:
            raise ConfigError([f"REFEREE_PATH={self.source!r}: no tokenizer.json beside the model, so its "
                               "tokenizer cannot be compared with the student's: save the model's fast "
                               "tokenizer there (save_pretrained)."])
        theirs = HFTokenizer(found, self.source)
        if tokenizer_difference(theirs, mine) is not None:
            raise ConfigError([f"REFEREE_PATH={self.source!r}: tokenizer mismatch: the referee's is "
                               f"{theirs.identity.describe()}, the student's is {mine.identity.describe()}; "
                               "use a referee with the student's tokenizer, or set TOKENIZER (and prepare "
                               "DATA_PATH) with the referee's."])


class HuggingFaceHubLM(HuggingFaceLM):
    """A hub model name (at REFEREE_REVISION) as referee; its identity records the commit that loaded."""

    kind = "huggingface-hub"

    def sha256(self) -> str:
        return ""  # the resolved commit names the weights instead

    def tokenizer_file(self) -> Path | None:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(self.source, "tokenizer.json", revision=self.revision or None))
        except Exception as err:  # noqa: BLE001 - hub errors (offline, not found, gated) have many types
            raise ConfigError([f"REFEREE_PATH={self.source!r}: no local file or directory, and no "
                               f"tokenizer.json from the Hugging Face hub ({type(err).__name__}): check the "
                               "name, the network or HF_TOKEN, or point REFEREE_PATH at a local "
                               "save_pretrained directory."]) from None

    def loaded_revision(self, lm: nn.Module) -> str:
        return getattr(lm.config, "_commit_hash", None) or self.revision
