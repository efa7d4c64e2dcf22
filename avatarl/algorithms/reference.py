"""Reference models for GRPO: partial credit for generated chars, and the KL anchor of the student.

`NgramReference` is a smoothed char n-gram counted on the training split and held on the device as
dense tables; it provides both full next-char distributions (for the KL) and per-char probabilities
(for the credit). `HFReference` scores generated text with a Hugging Face causal LM (e.g. gpt2) and
provides per-char credit only; the KL then stays with the n-gram. `load_frozen_causal_lm` loads such an LM
for scoring only; AvataRL's Hugging Face referee is loaded with it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_TABLE_ENTRIES = 1 << 26  # ~64M floats per table (256 MiB): order 4 at V=65 fits, order 5 does not


def ngram_table_problem(order: int, vocab_size: int) -> str | None:
    """Why an n-gram of this order cannot be tabled for this vocabulary, or None when it fits."""
    if vocab_size ** order <= MAX_TABLE_ENTRIES:
        return None
    return (f"NGRAM_ORDER={order} needs a table of {vocab_size}^{order} = {vocab_size ** order:,} entries for a "
            f"vocabulary of {vocab_size} (limit {MAX_TABLE_ENTRIES:,}): lower NGRAM_ORDER, or use REFERENCE=gpt2 "
            "for credit.")


class NgramReference:
    """Char n-gram of order n with interpolated add-alpha smoothing, counted on the training ids.

    p_1(c) = (N(c) + alpha) / (N + alpha V)                          (add-alpha unigram)
    p_k(c | h) = (N(h c) + alpha V p_{k-1}(c | h')) / (N(h) + alpha V)   for k = 2..n,
    where h holds the k-1 previous chars, h' drops its oldest char, and N counts occurrences in the
    training split. This is add-alpha smoothing whose alpha V pseudo-counts are spread by the
    lower-order model instead of uniformly, so a rarely seen history falls back to p_{k-1} rather
    than to uniform; every probability is positive, which keeps the KL finite.
    Table k is [V^(k-1), V] of log-probs, rows indexed by h read as a base-V number (oldest char
    most significant). Deterministic: the same ids give the same tables, so there is no state to save.
    """

    def __init__(self, order: int, vocab_size: int, train_ids: Tensor, device: torch.device | str,
                 alpha: float = 0.1):
        if order < 1:
            raise ValueError(f"n-gram order must be at least 1, got {order}")
        if alpha <= 0:
            raise ValueError(f"smoothing alpha must be positive, got {alpha}")
        if problem := ngram_table_problem(order, vocab_size):
            raise ValueError(problem)
        ids = train_ids.detach().to("cpu", torch.long).flatten()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"train ids must lie in [0, {vocab_size})")
        self.order, self.vocab_size, self.alpha = order, vocab_size, alpha
        V = vocab_size
        tables: list[Tensor] = []
        prob = torch.full((1, V), 1.0 / V, dtype=torch.float64)  # p_0: uniform, the prior of the unigram
        for k in range(1, order + 1):
            counts = torch.zeros(V ** k, dtype=torch.float64)
            if ids.numel() >= k:
                powers = V ** torch.arange(k - 1, -1, -1)
                counts += torch.bincount((ids.unfold(0, k, 1) * powers).sum(1), minlength=V ** k)
            counts = counts.view(V ** (k - 1), V)
            prior = prob.repeat(V, 1) if k > 1 else prob  # row h reads p_{k-1}(. | h mod V^(k-2))
            prob = (counts + alpha * V * prior) / (counts.sum(1, keepdim=True) + alpha * V)
            tables.append(prob.log().float().to(device))
        self.tables = tables

    @property
    def device(self) -> torch.device:
        return self.tables[0].device

    def _index(self, history: Tensor, width: int, count: int) -> Tensor:
        """Base-V index of the `width` chars starting at j, for j < count: [..., L] -> [..., count]."""
        index = torch.zeros_like(history[..., :count])
        for j in range(width):
            index = index * self.vocab_size + history[..., j:j + count]
        return index

    def log_probs(self, history: Tensor) -> Tensor:
        """Next-char log-distribution after every position: history [..., L] -> [..., L, V].

        Row i is log p(. | history[..., :i+1]) from the last n-1 chars. The first n-2 positions have
        only i+1 < n-1 chars before the next one; they back off to the order-(i+2) table.
        """
        n, V = self.order, self.vocab_size
        history = history.to(self.device, torch.long)
        L = history.size(-1)
        if n == 1:
            return self.tables[0][0].expand(*history.shape, V).contiguous()
        out = torch.empty(*history.shape, V, device=self.device, dtype=torch.float32)
        if L >= n - 1:
            out[..., n - 2:, :] = self.tables[n - 1][self._index(history, n - 1, L - n + 2)]
        for i in range(min(n - 2, L)):
            out[..., i, :] = self.tables[i + 1][self._index(history, i + 1, 1)[..., 0]]
        return out

    def log_probs_from(self, history: Tensor, first: int) -> Tensor:
        """log_probs(history)[..., first:, :], computed from only the chars that reach those rows: [..., L - first, V].

        Row i needs the n-1 chars up to i, so the older ones are dropped before the tables are read; at
        CONTEXT_LEN 1024 and GPT-2's 50k ids the whole-history tensor would be [rows, 1024, 50k].
        """
        start = max(0, first - (self.order - 2)) if self.order > 1 else first
        return self.log_probs(history[..., start:])[..., first - start:, :]

    def token_probs(self, ctx: Tensor, samples: Tensor) -> Tensor:
        """p(samples[:, h] | ctx, samples[:, :h]) for ctx [N, C] and samples [N, H] -> [N, H]."""
        C = ctx.size(1)
        seq = torch.cat((ctx, samples), dim=1).to(self.device, torch.long)
        logp = self.log_probs_from(seq[:, :-1], C - 1)  # [N, H, V]
        return logp.gather(-1, seq[:, C:, None]).squeeze(-1).exp()


def load_frozen_causal_lm(name_or_path: str, device: torch.device | str, dtype: torch.dtype = torch.float32,
                          revision: str | None = None, quantization_config: Any = None) -> nn.Module:
    """A Hugging Face causal LM that only scores: `AutoModelForCausalLM` from a hub name or a local directory,
    eval mode, no gradients, on `device` in `dtype`; with a bitsandbytes `quantization_config` its weights are
    quantised while loading and placed on `device` by transformers (a quantised model cannot be moved)."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise ImportError("a Hugging Face causal LM needs the transformers library: pip install 'avatarl[gpt2]'") \
            from err
    # Loaded in `dtype` (transformers 5 calls the argument dtype, 4.x torch_dtype): what bitsandbytes leaves
    # unquantised (embeddings, norms) stays in it too, and a large model never exists in float32 on the host.
    dtype_argument = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    options: dict[str, Any] = {"revision": revision or None, dtype_argument: dtype}
    if quantization_config is None:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **options).to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, quantization_config=quantization_config,
                                                     device_map={"": str(torch.device(device))}, **options)
    model.eval()
    model.requires_grad_(False)
    return model


class HFReference:
    """Credit from a Hugging Face causal LM (REFERENCE=gpt2), scored on the decoded text.

    Each row's context + sample chars are decoded to a string, tokenized with the LM's tokenizer
    (a BOS/EOS token prepended so the first token is scored too) and run through the LM. A token t
    with log-prob l_t covering n_t chars gives each of its chars the credit exp(l_t / n_t), its
    geometric-mean per-char probability. This is the one split under which the credits of a token's
    chars multiply back to the token's probability, and it keeps credit local: a wrong char lowers
    only the chars of the tokens it lands in, not the whole continuation. A token straddling the
    context boundary shares its log-prob the same way. Chars a tokenizer leaves outside every
    token's offsets (e.g. trimmed spaces) take the credit of the next token, else the previous one.
    """

    def __init__(self, model_name_or_path: str, vocab_chars: Sequence[str], device: torch.device | str,
                 dtype: torch.dtype = torch.float32):
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ImportError("REFERENCE=gpt2 needs the transformers library: pip install 'avatarl[gpt2]'") \
                from err
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{model_name_or_path}: the reference needs a fast tokenizer (char offsets)")
        self.model = load_frozen_causal_lm(model_name_or_path, device, dtype)
        self.vocab_chars = list(vocab_chars)
        self.device = torch.device(device)
        tok = self.tokenizer
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @staticmethod
    def _char_tokens(offsets: list[tuple[int, int]], n_chars: int) -> list[int]:
        """Index of the token that covers each char of a string of n_chars."""
        owner = [-1] * n_chars
        for t, (s, e) in enumerate(offsets):
            for c in range(s, min(e, n_chars)):
                owner[c] = t
        following = -1
        for c in range(n_chars - 1, -1, -1):  # a gap takes the next token ...
            following = owner[c] if owner[c] >= 0 else following
            owner[c] = following if owner[c] < 0 else owner[c]
        preceding = 0
        for c in range(n_chars):  # ... or, at the end of the string, the previous one
            preceding = owner[c] if owner[c] >= 0 else preceding
            owner[c] = preceding if owner[c] < 0 else owner[c]
        return owner

    @torch.no_grad()
    def token_probs(self, ctx: Tensor, samples: Tensor) -> Tensor:
        """Per-char credit exp(l_t / n_t) of each generated char: ctx [N, C], samples [N, H] -> [N, H]."""
        N, C = ctx.shape
        H = samples.size(1)
        rows = torch.cat((ctx, samples), dim=1).tolist()  # tokenization is host work: one sync here
        texts = ["".join(self.vocab_chars[i] for i in row) for row in rows]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        prefix = [] if self.bos_id is None else [self.bos_id]
        seqs = [prefix + ids for ids in enc["input_ids"]]
        width = max(len(s) for s in seqs)
        input_ids = torch.zeros(N, width, dtype=torch.long)
        mask = torch.zeros(N, width, dtype=torch.long)
        owners, shares = [], []
        for n, (seq, offsets) in enumerate(zip(seqs, enc["offset_mapping"], strict=True)):
            input_ids[n, :len(seq)] = torch.tensor(seq)
            mask[n, :len(seq)] = 1
            owner = self._char_tokens([tuple(o) for o in offsets], C + H)
            owners.append([t + len(prefix) for t in owner[C:]])
            shares.append([owner.count(t) for t in owner[C:]])
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()  # [N, width, V_lm]
        token_logp = torch.zeros(N, width, device=self.device)  # the first token, unconditioned, gets 0
        next_logp = F.log_softmax(logits[:, :-1], dim=-1)  # position j scores token j + 1
        token_logp[:, 1:] = next_logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        owner_t = torch.tensor(owners, device=self.device)
        share_t = torch.tensor(shares, device=self.device, dtype=torch.float32)
        return (token_logp.gather(1, owner_t) / share_t).exp().to(samples.device)


def build_reference(kind: str, ngram_order: int, model_name_or_path: str, vocab_size: int,
                    vocab_chars: Sequence[str], train_ids: Tensor, device: torch.device | str
                    ) -> tuple[NgramReference | HFReference, NgramReference]:
    """(credit_reference, kl_reference): the NGRAM_ORDER n-gram over `vocab_size` ids always anchors the KL;
    REFERENCE=ngram|gpt2 picks the credit (the same n-gram, or the causal LM REFERENCE_MODEL, which scores the
    decoded `vocab_chars` of a char run: ValueError without them)."""
    kl_reference = NgramReference(ngram_order, vocab_size, train_ids, device)
    if kind == "gpt2":
        if not vocab_chars:
            raise ValueError("REFERENCE=gpt2 scores decoded characters: it needs TOKENIZER=char (with a BPE "
                             "student use REFERENCE=ngram)")
        return HFReference(model_name_or_path, vocab_chars, device), kl_reference
    return kl_reference, kl_reference
