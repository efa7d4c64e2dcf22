"""Corpus, character vocabulary, train/validation split and the device-resident window sampler."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from avatarl.checkpoint import atomic_write
from avatarl.config import Config, ConfigError

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


@dataclass(frozen=True)
class Vocab:
    chars: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls(tuple(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        index = {ch: i for i, ch in enumerate(self.chars)}
        unknown = sorted({ch for ch in text if ch not in index})
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {''.join(unknown)!r}")
        return [index[ch] for ch in text]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self.chars[i] for i in values)


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


class WindowSampler:
    """Random windows of `length` consecutive chars, drawn on the device from a seeded generator.

    Each rank gets its own stream (seed offset by rank); the generator state is the whole sampler
    position, so saving and restoring it continues the exact same sequence of batches.
    """

    def __init__(self, ids: torch.Tensor, length: int, seed: int, rank: int = 0):
        self.ids, self.length = ids, length
        self.generator = torch.Generator(device=ids.device)
        self.generator.manual_seed(seed + 7919 * rank)
        self.offsets = torch.arange(length, device=ids.device)

    def sample(self, count: int) -> torch.Tensor:
        """[count, length] windows."""
        high = len(self.ids) - self.length + 1
        starts = torch.randint(0, high, (count,), device=self.ids.device, generator=self.generator)
        return self.ids[starts[:, None] + self.offsets]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"].cpu())


def eval_windows(val: torch.Tensor, context_len: int, count: int) -> torch.Tensor:
    """Fixed, evenly spaced validation windows of context_len + 1 chars: [count, context_len + 1]."""
    length = context_len + 1
    count = min(count, len(val) - length + 1)
    starts = torch.linspace(0, len(val) - length, count, device=val.device).long()
    return val[starts[:, None] + torch.arange(length, device=val.device)]
