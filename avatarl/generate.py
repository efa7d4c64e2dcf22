"""Text generation: `avatarl sample` from a saved checkpoint, and the samples a run logs as it trains."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from avatarl.checkpoint import load_checkpoint, resolve_checkpoint_arg
from avatarl.config import ConfigError
from avatarl.data.tokenizers import CharTokenizer, Tokenizer, TokenizerIdentity, tokenizer_from_identity
from avatarl.device import resolve_device
from avatarl.model import GPT

TRAINING_PROMPTS = ("ROMEO:", "First Citizen:\n", "\n")


def load_model(path: Path, device: torch.device) -> tuple[GPT, Tokenizer]:
    """The model of a student or referee checkpoint, in eval mode, with its tokenizer (refused when the
    tokenizer it names is no longer the one it was trained with)."""
    saved = load_checkpoint(path, map_location=device)
    model = GPT.from_saved(saved, device).eval()
    chars = saved.get("vocab") or saved.get("vocab_chars")
    if not saved.get("tokenizer"):  # a char checkpoint from before tokenizers were recorded
        return model, CharTokenizer(tuple(chars))
    return model, tokenizer_from_identity(TokenizerIdentity.from_dict(saved["tokenizer"]), chars)


def sample_from_checkpoint(checkpoint: str, checkpoint_dir: Path, prompt: str, max_new_tokens: int,
                           temperature: float, top_k: int | None, num_samples: int, seed: int,
                           device_preference: str) -> list[str]:
    """`num_samples` continuations of `prompt` from a checkpoint file, or `latest` in checkpoint_dir."""
    device = resolve_device(device_preference)
    model, tokenizer = load_model(resolve_checkpoint_arg(checkpoint, checkpoint_dir.expanduser()), device)
    try:
        ids = torch.tensor([tokenizer.encode(prompt)] * num_samples, device=device)
    except ValueError as err:
        raise ConfigError([f"--prompt: {err}; use characters of the training corpus."]) from None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return [tokenizer.decode(row) for row in out]


class Sample(NamedTuple):
    prompt: str
    ids: list[int]   # the generated continuation only, without the prompt
    text: str        # its decoded text


def training_samples(model: GPT, tokenizer: Tokenizer, device: torch.device, seed: int,
                     max_new_tokens: int = 120) -> list[Sample]:
    """One continuation per training prompt the corpus can encode, drawn from an own generator so that
    sampling never shifts the training RNG."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    # a corpus whose alphabet spells none of the prompts starts from its first token
    prompts = [p for p in TRAINING_PROMPTS if tokenizer.can_encode(p)] or [tokenizer.decode([0])]
    samples = []
    for prompt in prompts:
        prompt_ids = tokenizer.encode(prompt)
        ids = torch.tensor([prompt_ids], device=device)
        new_ids = model.generate(ids, max_new_tokens, temperature=0.8, top_k=None, generator=generator)[0]
        new_ids = new_ids[len(prompt_ids):].tolist()
        samples.append(Sample(prompt, new_ids, tokenizer.decode(new_ids)))
    return samples


def format_samples(samples: list[Sample]) -> str:
    """One repr()'d sample (prompt and continuation) per line, as the run logs them."""
    return "\n".join(repr(sample.prompt + sample.text) for sample in samples)
