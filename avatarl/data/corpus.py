"""The corpus: read (or downloaded once and verified), checked, encoded and split into train/validation."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from avatarl.checkpoint import atomic_write
from avatarl.config import Config, ConfigError
from avatarl.data.vocab import Vocab

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def read_corpus(cfg: Config) -> str:
    """The training text, checked before any model is built."""
    path = Path(cfg.data_path).expanduser() if cfg.data_path else download_tiny_shakespeare(cfg.data_cache_dir)
    if not path.is_file():
        raise ConfigError([f"DATA_PATH={cfg.data_path!r}: no such file. Point it at a UTF-8 text file."])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError([f"DATA_PATH={str(path)!r} is not UTF-8 text (byte {err.start}): convert it to UTF-8."]) \
            from None
    needed = 2 * (cfg.seq_len + 1)
    if not text:
        raise ConfigError([f"DATA_PATH={str(path)!r} is empty: it needs text to train on."])
    if len(text) < needed / (1 - TRAIN_FRACTION):
        raise ConfigError([f"DATA_PATH={str(path)!r} has {len(text)} characters: too few for CONTEXT_LEN + HORIZON"
                           f" = {cfg.seq_len} in both splits; it needs at least "
                           f"{int(needed / (1 - TRAIN_FRACTION)) + 1}."])
    return text


@dataclass
class Corpus:
    vocab: Vocab
    train: torch.Tensor  # [N_train] int64, on the training device
    val: torch.Tensor    # [N_val] int64, on the training device


def load_corpus(cfg: Config, device: torch.device) -> Corpus:
    text = read_corpus(cfg)
    vocab = Vocab.from_text(text)
    ids = torch.tensor(vocab.encode(text), dtype=torch.long)
    split = int(len(ids) * TRAIN_FRACTION)
    return Corpus(vocab, ids[:split].to(device), ids[split:].to(device))
