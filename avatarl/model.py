"""A small decoder-only GPT (nanoGPT style) with rotary positions and a KV cache.

token ids -> embedding -> n_layer x [x + attn(rmsnorm(x)); x + mlp(rmsnorm(x))] -> rmsnorm -> tied head.
Shapes: B batch, T tokens in this call, Tk keys visible (cache length), C = n_emb, H = n_head, D = C // H.
Attention runs on flash-attn when it is installed, asked for, and the call is CUDA fp16/bf16;
otherwise on PyTorch's scaled_dot_product_attention. Neither path has dropout or biases.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

FlashFn = Callable[..., Tensor]
# Logit of padding ids: exp() is exactly 0 in float32 and bfloat16, yet p log p stays 0 (no -inf * 0).
PAD_LOGIT = -1e4


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int  # longest sequence (context + horizon); rotary tables are sized to it
    n_layer: int
    n_head: int
    n_emb: int
    use_flash_attn: bool = True
    # Ids the tokenizer produces (0 = all of vocab_size): the ids above, padding that rounds a BPE vocabulary
    # up to a multiple of 64, get logit PAD_LOGIT, so sampling, rewards, losses and entropy never see them.
    valid_vocab_size: int = 0


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
        self.key_mask: Tensor | None = None  # every returned key is visible up to the causal mask

    def reset(self) -> None:
        self.pos = 0  # stale entries beyond pos are never read, so no need to zero them

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, T, H, D] at pos..pos+T-1 of `layer`; return keys/values [B, pos+T, H, D]."""
        end = self.pos + k.size(1)
        self.k[layer, :, self.pos:end] = k
        self.v[layer, :, self.pos:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]


class DecodeAt:
    """One decode step's view of a KVCache at a position held in a device tensor.

    The step writes its key/value at `pos` and attends over the whole buffer, with the keys after
    `pos` masked out. Shapes and addresses are the same at every position and nothing is read back
    to the host, so one captured CUDA graph replays every decode step (see avatarl.cuda_graphs).
    """

    def __init__(self, cache: KVCache, pos: Tensor):
        self.cache, self.index = cache, pos.view(1)
        self.key_mask = (torch.arange(cache.max_len, device=pos.device) <= pos)[None]  # [1 query, max_len]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, 1, H, D] at `pos` of `layer`; return the whole buffers [B, max_len, H, D]."""
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys.index_copy_(1, self.index, k.to(keys.dtype))
        values.index_copy_(1, self.index, v.to(values.dtype))
        return keys, values


class SharedPrefixKV:
    """Differentiable keys/values of prefixes that groups of rows continue (the training twin of KVCache).

    The first forward (B prefix rows) stores each layer's keys/values; the second (B * group rows,
    row b * group + j continuing prefix b) sees them repeated to its rows in front of its own. Nothing
    is written in place, so autograd carries the continuations' gradients back into the shared prefix.
    """

    def __init__(self, group: int):
        self.group, self.pos = group, 0
        self.key_mask: Tensor | None = None
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Prefix pass: remember k, v [B, P, H, D]. Continuation pass: [B*group, P + T, H, D]."""
        if layer not in self.k:
            self.k[layer], self.v[layer] = k, v
            return k, v
        prefix_k = self.k[layer].repeat_interleave(self.group, dim=0)
        prefix_v = self.v[layer].repeat_interleave(self.group, dim=0)
        return torch.cat((prefix_k, k), dim=1), torch.cat((prefix_v, v), dim=1)


AnyCache = KVCache | DecodeAt | SharedPrefixKV


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in float32 for stability under bf16."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(F, "rms_norm"):  # torch >= 2.4, fused: in float32 the same bits as the formula below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (x1_j, x2_j) pair of halves of the head dim by angle pos * theta_j.

    x [B, T, H, D]; cos, sin [T, H, D] = (cos, cos), (-sin, sin) of the angles (GPT's tables), used in x's
    dtype. y1 = x1 cos - x2 sin, y2 = x1 sin + x2 cos, so that q_m . k_n depends on positions only through
    m - n; as x * cos + (x2, x1) * sin: whole-tensor products, in float32 the same bits as the halves.
    """
    return x * cos.to(x.dtype) + x.roll(x.size(-1) // 2, -1) * sin.to(x.dtype)  # roll by D/2: (x2, x1)


def attention(q: Tensor, k: Tensor, v: Tensor, flash_fn: FlashFn | None, key_mask: Tensor | None = None
              ) -> Tensor:
    """Causal attention where query i (absolute position Tk - Tq + i) sees keys 0..Tk - Tq + i.

    q [B, Tq, H, D]; k, v [B, Tk, H, D] with Tk >= Tq (the cache holds the earlier keys) -> [B, Tq, H, D].
    With key_mask [1, Tk] (one query, a DecodeAt step), the query sees exactly the keys where it is True.
    """
    tq, tk = q.size(1), k.size(1)
    if key_mask is None and flash_fn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_fn(q, k, v, causal=True)  # flash-attn >= 2.1 aligns the causal mask bottom-right
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D] for SDPA
    if key_mask is not None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    elif tq == tk:
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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: AnyCache | None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(2)  # [B, T, H, D] each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        key_mask = None
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Tk, H, D]
            k, v = k.to(q.dtype), v.to(q.dtype)  # no-op unless the cache was made in another dtype
            key_mask = cache.key_mask
        y = attention(q, k, v, self.flash_fn, key_mask)  # [B, T, H, D]
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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: AnyCache | None) -> Tensor:
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

        # apply_rotary's [block, H, D] tables, angle[t, j] = t * 10000^(-2j/D); never checkpointed.
        head_dim = config.n_emb // config.n_head
        theta = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [D/2]
        angle = torch.outer(torch.arange(config.block_size, dtype=torch.float32), theta)  # [block, D/2]
        cos, sin = (torch.cat(pair, -1)[:, None].expand(-1, config.n_head, -1).contiguous()
                    for pair in ((angle.cos(), angle.cos()), (-angle.sin(), angle.sin())))
        valid = config.valid_vocab_size
        pad = torch.arange(config.vocab_size) >= valid if 0 < valid < config.vocab_size else None
        self.register_buffer("pad_mask", pad, persistent=False)  # [vocab] bool, or None without padding
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

        self.apply(self._init_weights)
        for block in self.blocks:  # each residual branch adds variance; keep the stream's growth O(1)
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def from_saved(cls, saved: dict, device: torch.device | str) -> GPT:
        """The model of a checkpoint or exported referee: its `model_config` shape and `model` weights."""
        model = cls(GPTConfig(**saved["model_config"])).to(device)
        model.load_state_dict(saved["model"])
        return model

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, cache: KVCache | None = None, prefix: Tensor | None = None) -> Tensor:
        """idx [B, T] int64 -> logits [B, T, vocab].

        With a cache, idx holds the tokens at positions cache.pos .. cache.pos+T-1; their keys/values
        are appended and cache.pos advances by T.

        With prefix [P_rows, P] (P_rows dividing B), row b of idx continues prefix row b // (B / P_rows),
        and the logits are [B, 1 + T, vocab]: the prediction after the prefix, then after each idx token.
        That equals the forward of the concatenated rows from position P - 1 on, but every prefix is
        computed once for its whole group (the GRPO update, where K samples share a context).
        """
        if prefix is not None:
            return self._forward_shared_prefix(prefix, idx)
        B, T = idx.shape
        pos = 0 if cache is None else cache.pos
        if cache is not None and (B != cache.batch_size or pos + T > cache.max_len):
            raise ValueError(f"cache of batch {cache.batch_size}, max_len {cache.max_len} cannot take "
                             f"{B} x {T} tokens at pos {pos}")
        return self._head(self._hidden(idx, cache))  # [B, T, vocab]

    def _head(self, x: Tensor) -> Tensor:
        """Final hidden states [..., C] -> logits [..., vocab], the padding ids masked to PAD_LOGIT."""
        logits = self.lm_head(self.norm_f(x))
        if self.pad_mask is not None:
            logits = logits.masked_fill(self.pad_mask, PAD_LOGIT)
        return logits

    def _hidden(self, idx: Tensor, cache: KVCache | SharedPrefixKV | None) -> Tensor:
        """idx [B, T] at positions cache.pos .. (0 .. without a cache) -> final hidden states [B, T, C]."""
        T = idx.size(1)
        pos = 0 if cache is None else cache.pos
        if pos + T > self.config.block_size:
            raise ValueError(f"positions up to {pos + T} exceed block_size={self.config.block_size}")
        x = self._blocks(idx, self.cos[pos:pos + T], self.sin[pos:pos + T], cache)  # [B, T, C]
        if cache is not None:
            cache.pos += T
        return x

    def _blocks(self, idx: Tensor, cos: Tensor, sin: Tensor, cache: AnyCache | None) -> Tensor:
        """Embed idx [B, T] and run every block with rotary tables cos, sin [T, H, D] -> [B, T, C]."""
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        return x

    def _forward_shared_prefix(self, prefix: Tensor, idx: Tensor) -> Tensor:
        """prefix [P_rows, P], idx [P_rows * group, T] -> logits [P_rows * group, 1 + T, vocab]."""
        if prefix.size(0) == 0 or idx.size(0) % prefix.size(0):
            raise ValueError(f"{idx.size(0)} continuation rows do not split into groups over "
                             f"{prefix.size(0)} prefix rows")
        group = idx.size(0) // prefix.size(0)
        shared = SharedPrefixKV(group)
        last = self._hidden(prefix, shared)[:, -1:].repeat_interleave(group, dim=0)  # [B, 1, C]
        x = last if idx.size(1) == 0 else torch.cat((last, self._hidden(idx, shared)), dim=1)  # [B, 1 + T, C]
        return self._head(x)

    def decode_at(self, token: Tensor, cache: KVCache, pos: Tensor) -> Tensor:
        """One cached decode step at a device-tensor position: token [B, 1] at pos -> logits [B, vocab].

        The same numbers as self(token, cache) with cache.pos == pos, without host syncs or shapes
        that depend on pos (CUDA-graph capturable). cache.pos is not advanced; the caller keeps
        0 <= pos < cache.max_len, which is not checked here because checking would sync.
        """
        index = pos.view(1)
        x = self._blocks(token, self.cos[index], self.sin[index], DecodeAt(cache, pos))  # [B, 1, C]
        return self._head(x)[:, -1]

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


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode without gradients: an old policy, or a referee that only scores."""
    twin = copy.deepcopy(model).eval()
    twin.requires_grad_(False)
    return twin
