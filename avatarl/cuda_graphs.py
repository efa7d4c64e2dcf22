"""The rollout's decode steps, replayed from one captured CUDA graph (USE_CUDA_GRAPHS).

A decode step of the 19M-parameter student over a few thousand rows is a few hundred small kernels
whose launches cost more than their arithmetic on a large GPU. GPT.decode_at runs a step at a
position held in a device tensor, so every step has the same shapes and buffer addresses: one
captured graph, replayed once per step, launches them all at once. Sampling stays outside the
graph (eager, a handful of kernels), so any torch.Generator works and the random stream is the
one the uncaptured rollout uses.

The graph reads the model's weights where they live; the old policy is refreshed in place
(load_state_dict copies into the same tensors), so a replay always sees the current weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from avatarl.model import GPT, KVCache

WARMUP_STEPS = 3  # eager runs on the capture stream first, so lazy library set-up happens outside the capture


class Decoder:
    """Static buffers for decoding `rows` rows of `model`: a KV cache, the input token and the logits.

    With capture=True (CUDA only) the first use records one decode step into a CUDA graph and every
    step replays it; with capture=False the same static step runs eagerly, which is what a CPU can
    check.
    """

    def __init__(self, model: GPT, rows: int, max_len: int, cache_dtype: torch.dtype,
                 autocast_dtype: torch.dtype | None, capture: bool):
        self.model, self.autocast_dtype = model, autocast_dtype
        self.key = (rows, max_len, cache_dtype, autocast_dtype)
        self.cache = model.new_cache(rows, max_len, dtype=cache_dtype)
        device = self.cache.k.device
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        if capture:
            self._capture()

    def load_prefix(self, prefilled: KVCache, repeats: int) -> None:
        """Copy the first prefilled.pos positions of B rows to rows b*repeats .. b*repeats + repeats - 1."""
        n_layer, rows, _, n_head, head_dim = prefilled.k.shape
        n = prefilled.pos
        for mine, theirs in ((self.cache.k, prefilled.k), (self.cache.v, prefilled.v)):
            grouped = mine.view(n_layer, rows, repeats, self.cache.max_len, n_head, head_dim)
            grouped[:, :, :, :n].copy_(theirs[:, :, None, :n])

    def step(self, token: Tensor, pos: int) -> Tensor:
        """Logits [rows, vocab] after `token` [rows, 1] at position `pos`, its key/value cached there.

        The returned tensor is overwritten by the next step: use it before calling step again.
        """
        self.token.copy_(token)
        self.pos.fill_(pos)
        if self.graph is None:
            return self._decode()
        self.graph.replay()
        return self.logits

    def _decode(self) -> Tensor:
        # The autocast cache would keep weight casts from the capture; without it each replay casts
        # the current weights.
        with torch.autocast(self.cache.k.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            return self.model.decode_at(self.token, self.cache, self.pos)

    def _capture(self) -> None:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self._decode()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):  # the warm-up's stream: its library handles exist
                self.logits = self._decode()
        except RuntimeError as err:
            raise RuntimeError(f"USE_CUDA_GRAPHS: capturing the rollout's decode step failed ({err}); "
                               "set USE_CUDA_GRAPHS=false to decode eagerly") from err
        self.graph = graph


class GraphedDecoding:
    """The Decoder of one model, made (and captured) again only when the rollout's shape or dtype changes."""

    def __init__(self, model: GPT, capture: bool):
        self.model, self.capture = model, capture
        self.decoder: Decoder | None = None

    def prepare(self, prefilled: KVCache, repeats: int) -> Decoder:
        """A decoder for prefilled.batch_size * repeats rows, its cache holding the prefilled positions."""
        device_type = prefilled.k.device.type
        autocast_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                          else None)
        key = (prefilled.batch_size * repeats, prefilled.max_len, prefilled.k.dtype, autocast_dtype)
        if self.decoder is None or self.decoder.key != key:
            self.decoder = None  # free the old graph's memory before capturing the new one
            self.decoder = Decoder(self.model, *key, capture=self.capture)
        self.decoder.load_prefix(prefilled, repeats)
        return self.decoder
