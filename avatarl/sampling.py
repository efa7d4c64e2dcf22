"""`avatarl sample`: text from a trained checkpoint (student or referee)."""

from __future__ import annotations

from pathlib import Path

import torch

from avatarl.checkpoint import load_checkpoint, resolve_checkpoint_arg
from avatarl.config import ConfigError
from avatarl.data import Vocab
from avatarl.distributed import resolve_device
from avatarl.model import GPT, GPTConfig


def load_model(path: Path, device: torch.device) -> tuple[GPT, Vocab]:
    saved = load_checkpoint(path, map_location=device)
    model = GPT(GPTConfig(**saved["model_config"])).to(device).eval()
    model.load_state_dict(saved["model"])
    return model, Vocab(tuple(saved.get("vocab") or saved["vocab_chars"]))


def sample_from_checkpoint(checkpoint: str, checkpoint_dir: Path, prompt: str, max_new_tokens: int,
                           temperature: float, top_k: int | None, num_samples: int, seed: int,
                           device_preference: str) -> list[str]:
    device = resolve_device(device_preference)
    model, vocab = load_model(resolve_checkpoint_arg(checkpoint, checkpoint_dir.expanduser()), device)
    try:
        ids = torch.tensor([vocab.encode(prompt)] * num_samples, device=device)
    except ValueError as err:
        raise ConfigError([f"--prompt: {err}; use characters of the training corpus."]) from None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return [vocab.decode(row) for row in out]
