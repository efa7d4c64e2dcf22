"""A small decoder-only GPT (nanoGPT style) with rotary positions and a KV cache.

token ids -> embedding -> n_layer x [x + attn(rmsnorm(x)); x + mlp(rmsnorm(x))] -> rmsnorm -> tied head.
Shapes: B batch, T tokens in this call, Tk keys visible (cache length), C = n_emb, H = n_head, D = C // H.
Attention runs on flash-attn when it is installed, asked for, and the call is CUDA fp16/bf16;
otherwise on PyTorch's scaled_dot_product_attention. Neither path has dropout or biases.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

FlashFn = Callable[..., Tensor]


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int  # longest sequence (context + horizon); rotary tables are sized to it
    n_layer: int
    n_head: int
    n_emb: int
    use_flash_attn: bool = True


def _load_flash_attn() -> FlashFn | None:
    """flash_attn.flash_attn_func, or None where flash-attn is missing or its binary fails to load."""
    try:
        from flash_attn import flash_attn_func
    except (ImportError, OSError):
        return None
    return flash_attn_func


def attention_backend_available() -> bool:
    """True when flash-attn imports and a CUDA device is present (so the trainer can log its choice once)."""
    return _load_flash_attn() is not None and torch.cuda.is_available()


class KVCache:
    """Preallocated keys/values of every layer, [n_layer, B, max_len, H, D], filled up to `pos`.

    Layers write their new keys at pos..pos+T-1 during a forward; the model advances `pos` by T
    once all layers have written, so every layer sees the same positions.
    """

    def __init__(self, batch_size: int, max_len: int, n_layer: int, n_head: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        self.batch_size, self.max_len = batch_size, max_len
        shape = (n_layer, batch_size, max_len, n_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0  # stale entries beyond pos are never read, so no need to zero them

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, T, H, D] at pos..pos+T-1 of `layer`; return keys/values [B, pos+T, H, D]."""
        end = self.pos + k.size(1)
        self.k[layer, :, self.pos:end] = k
        self.v[layer, :, self.pos:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in float32 for stability under bf16."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (x1_j, x2_j) pair of halves of the head dim by angle pos * theta_j.

    x [B, T, H, D]; cos, sin [T, D/2]. y1 = x1 cos - x2 sin, y2 = x1 sin + x2 cos, so that
    q_m . k_n depends on positions only through m - n.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, T, H, D/2] each
    cos, sin = cos[:, None, :].float(), sin[:, None, :].float()  # [T, 1, D/2] broadcasts over heads
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, flash_fn: FlashFn | None) -> Tensor:
    """Causal attention where query i (absolute position Tk - Tq + i) sees keys 0..Tk - Tq + i.

    q [B, Tq, H, D]; k, v [B, Tk, H, D] with Tk >= Tq (the cache holds the earlier keys) -> [B, Tq, H, D].
    """
    tq, tk = q.size(1), k.size(1)
    if flash_fn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_fn(q, k, v, causal=True)  # flash-attn >= 2.1 aligns the causal mask bottom-right
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D] for SDPA
    if tq == tk:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif tq == 1:  # one new token sees every cached key
        y = F.scaled_dot_product_attention(q, k, v)
    else:  # SDPA's is_causal is top-left aligned, wrong for Tq < Tk: build the bottom-right mask
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, flash_fn: FlashFn | None):
        super().__init__()
        self.n_head, self.layer_idx, self.flash_fn = config.n_head, layer_idx, flash_fn
        self.qkv = nn.Linear(config.n_emb, 3 * config.n_emb, bias=False)
        self.proj = nn.Linear(config.n_emb, config.n_emb, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(2)  # [B, T, H, D] each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Tk, H, D]
            k, v = k.to(q.dtype), v.to(q.dtype)  # no-op unless the cache was made in another dtype
        y = attention(q, k, v, self.flash_fn)  # [B, T, H, D]
        return self.proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_emb, 4 * config.n_emb, bias=False)
        self.proj = nn.Linear(4 * config.n_emb, config.n_emb, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, flash_fn: FlashFn | None):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(config.n_emb), RMSNorm(config.n_emb)
        self.attn = CausalSelfAttention(config, layer_idx, flash_fn)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_emb % config.n_head or (config.n_emb // config.n_head) % 2:
            raise ValueError(f"n_emb={config.n_emb} must split into {config.n_head} heads of even size")
        self.config = config
        flash_fn = _load_flash_attn() if config.use_flash_attn else None
        use_flash = flash_fn is not None and torch.cuda.is_available()
        self.attention_backend = "flash-attn" if use_flash else "sdpa"
        self.wte = nn.Embedding(config.vocab_size, config.n_emb)
        self.blocks = nn.ModuleList(Block(config, i, flash_fn) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.n_emb)
        self.lm_head = nn.Linear(config.n_emb, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix reads and writes tokens

        # theta_j = 10000^(-2j/D); angle[t, j] = t * theta_j. Non-persistent: rebuilt, never checkpointed.
        head_dim = config.n_emb // config.n_head
        theta = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [D/2]
        angle = torch.outer(torch.arange(config.block_size, dtype=torch.float32), theta)  # [block, D/2]
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

        self.apply(self._init_weights)
        for block in self.blocks:  # each residual branch adds variance; keep the stream's growth O(1)
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """idx [B, T] int64 -> logits [B, T, vocab].

        With a cache, idx holds the tokens at positions cache.pos .. cache.pos+T-1; their keys/values
        are appended and cache.pos advances by T.
        """
        B, T = idx.shape
        pos = 0 if cache is None else cache.pos
        if pos + T > self.config.block_size:
            raise ValueError(f"positions up to {pos + T} exceed block_size={self.config.block_size}")
        if cache is not None and (B != cache.batch_size or pos + T > cache.max_len):
            raise ValueError(f"cache of batch {cache.batch_size}, max_len {cache.max_len} cannot take "
                             f"{B} x {T} tokens at pos {pos}")
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]  # [T, D/2]
        x = self.wte(idx)  # [B, T, C]
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        return self.lm_head(self.norm_f(x))  # [B, T, vocab]

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache on the model's device, in the dtype the keys will be computed in."""
        weight = self.wte.weight
        if dtype is None:
            dtype = weight.dtype
            if torch.is_autocast_enabled(weight.device.type):
                dtype = torch.get_autocast_dtype(weight.device.type)
        c = self.config
        return KVCache(batch_size, max_len or c.block_size, c.n_layer, c.n_head, c.n_emb // c.n_head,
                       weight.device, dtype)

    def num_params(self) -> int:
        """Trainable parameters, the tied embedding/head counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at sequence length T = seq_len.

        6 N: every weight does one multiply-add (2 FLOPs) per token forward and two backward.
        12 L C T: per layer, q.k^T and att @ v are each 2 C T FLOPs per token forward, times 3 with backward.
        The causal mask's savings are ignored (the usual PaLM-style estimate).
        """
        c = self.config
        return 6.0 * self.num_params() + 12.0 * c.n_layer * c.n_emb * seq_len

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Append max_new_tokens sampled tokens to idx [B, T0] -> [B, T0 + max_new_tokens].

        Each token is drawn from softmax(logits / temperature) restricted to the top_k logits
        (temperature 0 = greedy), conditioned on the last block_size tokens, as a full recompute would.
        Decoding is KV-cached; only once the window is full does the cache get rebuilt from the cropped
        context, since rotary positions of a sliding window restart at 0.
        """
        block = self.config.block_size
        if max_new_tokens <= 0:
            return idx
        cache = self.new_cache(idx.size(0))
        logits = self(idx[:, -block:], cache)[:, -1]  # [B, vocab]
        for step in range(max_new_tokens):
            nxt = self._sample(logits, temperature, top_k, generator)  # [B, 1]
            idx = torch.cat((idx, nxt), dim=1)
            if step == max_new_tokens - 1:
                break
            if cache.pos < block:
                logits = self(nxt, cache)[:, -1]
            else:
                cache.reset()
                logits = self(idx[:, -block:], cache)[:, -1]
        return idx

    @staticmethod
    def _sample(logits: Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> Tensor:
        """One token per row [B, 1] from logits [B, vocab]."""
        if temperature == 0.0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.size(-1):
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
