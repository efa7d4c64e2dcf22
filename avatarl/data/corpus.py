"""The corpus: a text file (tokenized in memory) or a prepared directory (memmapped), split train/validation.

With DATA_PATH empty the corpus is Tiny Shakespeare, shipped inside the package (xz, sha256 checked on
read), so the default run needs no network; a download into DATA_CACHE_DIR is the fallback only where
the packaged copy is missing.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avatarl.config import Config, ConfigError
from avatarl.data.prepared import is_prepared_dir, open_prepared
from avatarl.data.tokenizers import CharTokenizer, Tokenizer, load_tokenizer
from avatarl.files import atomic_write, sha256_of

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9
PACKAGED_CORPUS = Path(__file__).resolve().parent / "tinyshakespeare.txt.xz"
REFERENCE_TOKENS = 4_000_000  # of a prepared directory, for GRPO's n-gram reference
VOCAB_MULTIPLE = 64  # BPE vocabularies are padded up to a multiple of this (nanoGPT's 50,304 for GPT-2)


def download_tiny_shakespeare(cache_dir: str | os.PathLike, url: str = TINY_SHAKESPEARE_URL) -> Path:
    """The default corpus, downloaded once into the cache and verified against its sha256."""
    target = Path(cache_dir).expanduser() / "tinyshakespeare.txt"
    if target.is_file() and sha256_of(target) == TINY_SHAKESPEARE_SHA256:
        return target
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            payload = response.read()
    except OSError as err:
        raise ConfigError([f"DATA_PATH is empty and Tiny Shakespeare could not be downloaded ({err}): "
                           "set DATA_PATH to a local UTF-8 text file."]) from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != TINY_SHAKESPEARE_SHA256:
        raise ConfigError([f"The downloaded corpus has sha256 {digest}, expected {TINY_SHAKESPEARE_SHA256}: "
                           "set DATA_PATH to a trusted copy."])
    atomic_write(target, [payload])
    return target


def packaged_tiny_shakespeare() -> str | None:
    """The Tiny Shakespeare shipped in the package, or None when it is missing or does not verify."""
    try:
        payload = lzma.decompress(PACKAGED_CORPUS.read_bytes())
    except (OSError, lzma.LZMAError):
        return None
    return payload.decode("utf-8") if hashlib.sha256(payload).hexdigest() == TINY_SHAKESPEARE_SHA256 else None


def read_text_corpus(cfg: Config) -> str:
    """The training text of DATA_PATH (a UTF-8 file) or the default corpus, checked before any model
    is built."""
    if not cfg.data.data_path:
        packaged = packaged_tiny_shakespeare()
        if packaged is not None:
            return packaged
    if cfg.data.data_path:
        path = Path(cfg.data.data_path).expanduser()
    else:
        path = download_tiny_shakespeare(cfg.data.data_cache_dir)
    if not path.is_file():
        raise ConfigError([f"DATA_PATH={cfg.data.data_path!r}: no such file or prepared directory. "
                           "Point it at a UTF-8 text file or a directory made by `avatarl prepare`."])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError([f"DATA_PATH={str(path)!r} is not UTF-8 text (byte {err.start}): "
                           "convert it to UTF-8."]) from None
    if not text:
        raise ConfigError([f"DATA_PATH={str(path)!r} is empty: it needs text to train on."])
    return text


def check_length(cfg: Config, tokens: int, unit: str) -> None:
    """Both splits must hold windows of CONTEXT_LEN + HORIZON tokens."""
    needed = 2 * (cfg.seq_len + 1) / (1 - TRAIN_FRACTION)
    if tokens < needed:
        raise ConfigError([f"DATA_PATH={cfg.data.data_path or 'Tiny Shakespeare'!r} has {tokens} {unit}: "
                           f"too few for CONTEXT_LEN + HORIZON = {cfg.seq_len} in both splits; it needs at "
                           f"least {int(needed) + 1}."])


Ids = torch.Tensor | np.ndarray  # a device tensor (a text corpus) or a memmap (a prepared directory)


def model_vocab_size(tokenizer: Tokenizer) -> int:
    """The model's vocabulary: the tokenizer's, padded up to a multiple of 64 for a BPE."""
    size = tokenizer.size
    return size if isinstance(tokenizer, CharTokenizer) else -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


@dataclass
class Corpus:
    tokenizer: Tokenizer
    train: Ids   # [N_train] token ids: int64 on the training device, or uint16/uint32 memmapped on disk
    val: Ids     # [N_val]
    token_bytes: torch.Tensor  # [model vocab] int64: UTF-8 bytes of each id (0 for padding and special ids)

    @property
    def model_vocab_size(self) -> int:
        return len(self.token_bytes)


def make_corpus(tokenizer: Tokenizer, train: Ids, val: Ids, device: torch.device) -> Corpus:
    sizes = torch.zeros(model_vocab_size(tokenizer), dtype=torch.long)
    sizes[:tokenizer.size] = torch.from_numpy(tokenizer.token_bytes())
    return Corpus(tokenizer, train, val, sizes.to(device))


def load_corpus(cfg: Config, device: torch.device) -> Corpus:
    """DATA_PATH as token ids: a prepared directory stays on disk, a text file is tokenized onto `device`."""
    if cfg.data.data_path and is_prepared_dir(Path(cfg.data.data_path).expanduser()):
        data, tokenizer = open_prepared(Path(cfg.data.data_path).expanduser(), cfg.data.tokenizer)
        check_length(cfg, len(data.train) + len(data.val), "tokens")
        return make_corpus(tokenizer, data.train, data.val, device)
    text = read_text_corpus(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer, text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    check_length(cfg, len(ids), "characters" if isinstance(tokenizer, CharTokenizer) else "tokens")
    split = int(len(ids) * TRAIN_FRACTION)
    return make_corpus(tokenizer, ids[:split].to(device), ids[split:].to(device), device)


def reference_ids(ids: Ids, limit: int = REFERENCE_TOKENS) -> torch.Tensor:
    """The training ids an n-gram reference is counted on: all of a text corpus, the first `limit` of a
    prepared directory (reading 9B tokens to count a bigram would take longer than the run)."""
    if isinstance(ids, np.ndarray):
        return torch.from_numpy(np.asarray(ids[:limit]).astype(np.int64))
    return ids
