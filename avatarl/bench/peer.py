"""The peer row of `avatarl bench throughput`: the supervised step on a Hugging Face GPT-2 of our shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from avatarl.config import Config
from avatarl.data.sampler import WindowSampler
from avatarl.device import mixed_precision
from avatarl.trainer import make_optimizer

PEER_MODEL = "transformers.GPT2LMHeadModel"


def build_peer(cfg: Config, vocab_size: int, device: torch.device) -> tuple[nn.Module, dict[str, Any]] | str:
    """(GPT2LMHeadModel of our n_layer / n_head / n_emb / vocab / SEQ_LEN, its description), built from a
    GPT2Config with dropout 0 and SDPA attention where supported (nothing downloaded); or, when
    transformers cannot be imported, the reason as a string.
    """
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as exc:  # an optional extra: the row is skipped, the rest of the bench runs
        return f"transformers is not importable ({exc})"
    shape = dict(vocab_size=vocab_size, n_positions=cfg.seq_len, n_embd=cfg.model.n_emb,
                 n_layer=cfg.model.n_layer, n_head=cfg.model.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0, use_cache=False, bos_token_id=None, eos_token_id=None)
    try:
        config = GPT2Config(**shape, attn_implementation="sdpa")
        model = GPT2LMHeadModel(config)
    except (TypeError, ValueError, ImportError):  # an old transformers without SDPA for GPT-2
        config = GPT2Config(**shape)
        model = GPT2LMHeadModel(config)
    model = model.to(device).train()
    info = {"model": PEER_MODEL, "transformers": transformers.__version__,
            "attention": getattr(model.config, "_attn_implementation", None) or "eager",
            "params": sum(p.numel() for p in model.parameters())}
    return model, info


def peer_step_fn(cfg: Config, model: nn.Module, sampler: WindowSampler, device: torch.device
                 ) -> tuple[Callable[[], None], list[torch.Tensor]]:
    """(step, losses): one call of step = the `supervised_step` row's work on the peer: B x K fresh windows
    of C + H + 1 ids from `sampler` (C + H inputs and the next id of each), forward, next-token cross-entropy
    (float32, mean), backward, grad-norm clip, AdamW with the trainer's groups and betas, one host sync (the
    finite check), grads set to None. Each call appends its detached loss to losses (NaN when skipped).
    """
    rows = cfg.optim.micro_batch * cfg.grpo.k_samples
    optimizer = make_optimizer(model, cfg, device)
    dtype = mixed_precision(cfg, device)
    forward = torch.compile(model) if cfg.model.use_torch_compile else model
    params = list(model.parameters())
    losses: list[torch.Tensor] = []

    def step() -> None:
        window = sampler.sample(rows)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = forward(input_ids=window[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), window[:, 1:].reshape(-1))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
        finite = bool(torch.isfinite(grad_norm) & torch.isfinite(loss))
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach() if finite else torch.full_like(loss.detach(), float("nan")))

    return step, losses
