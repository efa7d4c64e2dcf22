"""Reference models for GRPO: partial credit for generated tokens, and the KL anchor of the student.

`NgramReference` is a smoothed n-gram counted on the training split. It stores only the contexts that occur
there (sparse counts: memory grows with the corpus, not with vocabulary^order) and builds full next-token
distributions on the device (for the KL, and for the credit); where every context's row fits in
DENSE_TABLE_ENTRIES (chars, a bigram of a small BPE) they are built once into tables, which is faster.
`HFReference` scores generated text with a Hugging Face causal LM (e.g. gpt2) and provides per-char credit
only; the KL then stays with the n-gram. It loads its LM with the one Hugging Face loader, AvataRL's
referee's (referee/hugging_face.py), in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

DENSE_TABLE_ENTRIES = 1 << 24  # V^order floats (64 MiB) or fewer: rows of every context are tabled once
ROW_CHUNK_ELEMENTS = 1 << 24  # [positions, V] floats built at once (64 MiB), and so at most as many scattered


@dataclass
class _Level:
    """The contexts of m tokens seen in the training ids, and their successors: order m + 1 of the n-gram.

    A context is numbered by its rank in `keys`, which are sorted; its key is (number of its m - 1 newest
    tokens at level m - 1) x V + its oldest token, so contexts nest the way the back-off drops tokens and no
    key outgrows int64. Number M (one past the last) means "not seen": its entries of keep, first and degree
    (1, 0, 0) leave a row to the lower order. The successors of context h are tokens[first[h]:][:degree[h]].
    """

    keys: Tensor    # [M] int64, sorted
    keep: Tensor    # [M + 1] float32: alpha V / (N(h) + alpha V), the weight left to the lower order
    first: Tensor   # [M + 1] int64
    degree: Tensor  # [M + 1] int64: distinct successors of h
    tokens: Tensor  # [E] int32, ascending within each context
    weight: Tensor  # [E] float32: N(h c) / (N(h) + alpha V)

    def to(self, device: torch.device | str) -> _Level:
        return _Level(*(getattr(self, f.name).to(device) for f in fields(self)))

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


def _count_level(parent: Tensor, oldest: Tensor, following: Tensor, V: int,
                 alpha_v: float) -> tuple[_Level, Tensor]:
    """The level whose contexts are (parent context, oldest token) at each training position, followed by
    `following`; returns it and each position's context number."""
    keys, number = torch.unique(parent * V + oldest, sorted=True, return_inverse=True)
    pairs, counts = torch.unique(number * V + following, sorted=True, return_counts=True)
    totals = torch.bincount(number, minlength=len(keys)).double() + alpha_v
    degree = torch.bincount(pairs // V, minlength=len(keys))
    unseen = torch.zeros(1, dtype=torch.long)  # number M: keep 1, no successors
    level = _Level(keys, torch.cat(((alpha_v / totals).float(), torch.ones(1))),
                   torch.cat((degree.cumsum(0) - degree, unseen)), torch.cat((degree, unseen)),
                   (pairs % V).int(), (counts / totals[pairs // V]).float())
    return level, number


class NgramReference:
    """n-gram of order n with interpolated add-alpha smoothing, counted on the training ids.

    p_1(c) = (N(c) + alpha) / (N + alpha V)                          (add-alpha unigram)
    p_k(c | h) = (N(h c) + alpha V p_{k-1}(c | h')) / (N(h) + alpha V)   for k = 2..n,
    where h holds the k-1 previous tokens, h' drops its oldest token, and N counts occurrences in the
    training split. This is add-alpha smoothing whose alpha V pseudo-counts are spread by the
    lower-order model instead of uniformly, so a rarely seen history falls back to p_{k-1} rather
    than to uniform, and a history never seen is exactly p_{k-1}; every probability is positive, which
    keeps the KL finite. Only the histories that occur are stored (`memory_bytes` grows with the training
    ids, whatever V is); a row p_n(. | h) is p_1 scaled and added to, order by order, with the counts of h's
    suffixes. With V^n <= dense_limit the rows of every history are built once into tables (table k is
    [V^(k-1), V] log-probs, row h read as a base-V number, oldest token most significant), else on demand.
    Deterministic: the same ids give the same counts, so there is no state to save.
    """

    def __init__(self, order: int, vocab_size: int, train_ids: Tensor, device: torch.device | str,
                 alpha: float = 0.1, dense_limit: int = DENSE_TABLE_ENTRIES):
        if order < 1:
            raise ValueError(f"n-gram order must be at least 1, got {order}")
        if alpha <= 0:
            raise ValueError(f"smoothing alpha must be positive, got {alpha}")
        ids = train_ids.detach().to("cpu", torch.long).flatten()
        low, high = (int(ids.min()), int(ids.max())) if ids.numel() else (0, 0)
        if low < 0 or high >= vocab_size:
            bad = high if high >= vocab_size else low
            raise ValueError(f"the training ids hold {bad}, outside the tokenizer's {vocab_size} ids: "
                             "another tokenizer wrote DATA_PATH; set TOKENIZER to that one.")
        self.order, self.vocab_size, self.alpha = order, vocab_size, alpha
        V, L, alpha_v = vocab_size, ids.numel(), alpha * vocab_size
        counts = torch.bincount(ids, minlength=V).double()
        # p_1 = (N(c) + alpha V p_0(c)) / (N + alpha V) with p_0 uniform, so alpha V p_0(c) = alpha
        self.unigram = ((counts + alpha) / (L + alpha_v)).float().to(device)
        self.levels: list[_Level] = []
        number = torch.zeros(max(L - 1, 0), dtype=torch.long)  # the empty context, at positions 0 .. L - 2
        for m in range(1, min(order, L)):  # contexts of m tokens followed by one: positions m - 1 .. L - 2
            level, number = _count_level(number[-(L - m):], ids[:L - m], ids[m:], V, alpha_v)
            self.levels.append(level.to(device))
        self.tables: list[Tensor] | None = None
        if V ** order <= dense_limit:
            self.tables = [self._probs(self._last_numbers(k - 1), V ** (k - 1)).log_()
                           for k in range(1, order + 1)]

    @property
    def device(self) -> torch.device:
        return self.unigram.device

    @property
    def memory_bytes(self) -> int:
        """Bytes of every tensor held: the counts, and the tables where V^n is small enough for them."""
        tensors = [self.unigram, *(self.tables or [])] + [t for level in self.levels for t in level.tensors()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _contexts(self, history: Tensor) -> list[Tensor]:
        """Per level m, the number of the context of m tokens up to each position of history [P, L]: [P, L],
        M where it was never seen. A position with fewer than m tokens has none; one whose shorter context
        was never seen gets a key no context of m tokens has."""
        numbers: list[Tensor] = []
        V, L = self.vocab_size, history.size(-1)
        number = torch.zeros_like(history)
        for m, level in enumerate(self.levels[:L], start=1):
            M = len(level.keys)
            key = number * V + F.pad(history[:, :L - m + 1], (m - 1, 0))  # the oldest token, j - m + 1
            at = torch.searchsorted(level.keys, key)
            number = torch.where(level.keys[at.clamp(max=M - 1)] == key, at, M)
            number[:, :m - 1] = M
            numbers.append(number)
        return numbers

    def _last_numbers(self, width: int) -> list[Tensor]:
        """Context numbers of every history of `width` tokens, in base-V order, at its last position."""
        grid = torch.arange(self.vocab_size ** width, device=self.device)
        digits = [grid // self.vocab_size ** (width - 1 - j) % self.vocab_size for j in range(width)]
        return [n[:, -1] for n in self._contexts(torch.stack(digits, -1))] if width else []

    def _probs(self, numbers: list[Tensor], count: int) -> Tensor:
        """[count, V] rows p_n(. | each position's context) from each level's context numbers [count].

        Unrolled, p_n = (prod_k keep_k) p_1 + sum_k (prod_{j > k} keep_j) w_k, with w_k the count weights of
        the context at level k: one pass over the [count, V] rows, then a scatter of exactly the successors
        seen. Built in chunks of ROW_CHUNK_ELEMENTS, whose successors are at most as many as their floats.
        """
        V = self.vocab_size
        rows = torch.empty(count, V, device=self.device)
        levels = self.levels[:len(numbers)]
        step = max(1, ROW_CHUNK_ELEMENTS // V)
        for s in range(0, count, step):
            chunk = rows[s:s + step]
            part = [number[s:s + step] for number in numbers]
            scale = [torch.ones(len(chunk), device=self.device)]  # [prod of all keeps, ..., keep_top, 1]
            for level, number in zip(levels[::-1], part[::-1], strict=True):
                scale.insert(0, scale[0] * level.keep[number])
            torch.mul(scale[0][:, None], self.unigram, out=chunk)
            for level, number, above in zip(levels, part, scale[1:], strict=True):
                first, degree = level.first[number], level.degree[number]
                total = int(degree.sum())  # a host sync per level and chunk: it sizes the scatter
                row = torch.repeat_interleave(torch.arange(len(chunk), device=self.device), degree,
                                              output_size=total)
                rank = torch.arange(total, device=self.device) - (degree.cumsum(0) - degree)[row]
                entry = first[row] + rank
                # A context's successors are distinct, so no element is hit twice: a plain indexed add,
                # with none of the atomics (and their float summation order) of index_add_ on CUDA.
                flat, at = chunk.view(-1), row * V + level.tokens[entry]
                flat[at] += level.weight[entry] * above[row]
        return rows

    def _index(self, history: Tensor, width: int, count: int) -> Tensor:
        """Base-V index of the `width` tokens starting at j, for j < count: [..., L] -> [..., count]."""
        index = torch.zeros_like(history[..., :count])
        for j in range(width):
            index = index * self.vocab_size + history[..., j:j + count]
        return index

    def log_probs(self, history: Tensor) -> Tensor:
        """Next-token log-distribution after every position: history [..., L] -> [..., L, V].

        Row i is log p(. | history[..., :i+1]) from the last n-1 tokens. The first n-2 positions have
        only i+1 < n-1 tokens before the next one; they back off to order i+2.
        """
        n, V = self.order, self.vocab_size
        history = history.to(self.device, torch.long)
        L = history.size(-1)
        if self.tables is None:
            numbers = [number.flatten() for number in self._contexts(history.reshape(-1, L))] if L else []
            return self._probs(numbers, history.numel()).log_().view(*history.shape, V)
        if n == 1:
            return self.tables[0][0].expand(*history.shape, V).contiguous()
        out = torch.empty(*history.shape, V, device=self.device)
        if L >= n - 1:
            out[..., n - 2:, :] = self.tables[n - 1][self._index(history, n - 1, L - n + 2)]
        for i in range(min(n - 2, L)):
            out[..., i, :] = self.tables[i + 1][self._index(history, i + 1, 1)[..., 0]]
        return out

    def log_probs_from(self, history: Tensor, first: int) -> Tensor:
        """log_probs(history)[..., first:, :] from only the tokens that reach those rows: [..., L - first, V].

        Row i needs the n-1 tokens up to i, so the older ones are dropped first; at CONTEXT_LEN 1024 and
        GPT-2's 50k ids the whole-history tensor would be [rows, 1024, 50k].
        """
        start = max(0, first - (self.order - 2)) if self.order > 1 else first
        return self.log_probs(history[..., start:])[..., first - start:, :]

    def token_probs(self, ctx: Tensor, samples: Tensor) -> Tensor:
        """p(samples[:, h] | ctx, samples[:, :h]) for ctx [N, C] and samples [N, H] -> [N, H]."""
        C = ctx.size(1)
        seq = torch.cat((ctx, samples), dim=1).to(self.device, torch.long)
        logp = self.log_probs_from(seq[:, :-1], C - 1)  # [N, H, V]
        return logp.gather(-1, seq[:, C:, None]).squeeze(-1).exp()


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
        # Imported here: the referee package brings run modules, and algorithms/ loads none of them.
        from avatarl.referee.hugging_face import load_frozen_causal_lm

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
