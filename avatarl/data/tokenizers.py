"""Tokenizers (TOKENIZER): characters of the corpus, GPT-2's BPE through tiktoken, or a Hugging Face tokenizer.

    char                       every distinct char of the corpus, sorted, one id each (the default)
    gpt2                       tiktoken's GPT-2 encoding: the ids nanoGPT and upstream avataRL write to train.bin
    PATH.tiktoken              a tiktoken rank file (base64 token, rank per line) with GPT-2's split pattern and
                               <|endoftext|> after the last rank: GPT-2's own file works offline
    PATH (tokenizer.json or    a Hugging Face tokenizer, e.g. one made by `avatarl tokenizer train`
     a save_pretrained dir)

Each tokenizer has an identity (kind, source, sha256 of its definition) that prepared data and every
checkpoint record, so data, checkpoints and referees made with another tokenizer are refused, and
`token_bytes`: the UTF-8 bytes each id stands for, which bits per byte divide by.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from avatarl.config import ConfigError

END_OF_TEXT = "<|endoftext|>"
GPT2 = "gpt2"


@dataclass(frozen=True)
class TokenizerIdentity:
    """Equal when the ids mean the same: the same kind and definition, wherever it was loaded from."""

    kind: str                             # "char", "tiktoken" or "huggingface"
    source: str = field(compare=False)    # what TOKENIZER said ("char", "gpt2", a path)
    sha256: str                           # of the definition: the chars, the token bytes, or tokenizer.json

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "source": self.source, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerIdentity:
        return cls(str(data["kind"]), str(data["source"]), str(data["sha256"]))

    def describe(self) -> str:
        return f"{self.kind} {self.source!r} (sha256 {self.sha256[:12]})"


class Tokenizer:
    """What every tokenizer offers; `size` ids, 0 .. size - 1."""

    identity: TokenizerIdentity
    size: int
    eot_id: int | None = None  # the end-of-text id that joins documents, where there is one

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Any) -> str:
        raise NotImplementedError

    def token_bytes(self) -> np.ndarray:
        """[size] int64: UTF-8 bytes of the text each id stands for (0 for special tokens)."""
        raise NotImplementedError

    def can_encode(self, text: str) -> bool:
        return True


def _ids(ids: Any) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


class CharTokenizer(Tokenizer):
    """One id per distinct char of the corpus, in sorted order (`chars` is the vocabulary)."""

    def __init__(self, chars: tuple[str, ...] | list[str]):
        self.chars = tuple(chars)
        self.size = len(self.chars)
        self.index = {ch: i for i, ch in enumerate(self.chars)}
        digest = hashlib.sha256(json.dumps(list(self.chars)).encode()).hexdigest()
        self.identity = TokenizerIdentity("char", "char", digest)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(tuple(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        unknown = sorted({ch for ch in text if ch not in self.index})
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {''.join(unknown)!r}")
        return [self.index[ch] for ch in text]

    def decode(self, ids: Any) -> str:
        return "".join(self.chars[i] for i in _ids(ids))

    def token_bytes(self) -> np.ndarray:
        return np.array([len(ch.encode("utf-8")) for ch in self.chars], dtype=np.int64)

    def can_encode(self, text: str) -> bool:
        return set(text) <= set(self.index)


def pieces_sha256(pieces: Iterable[bytes]) -> str:
    """sha256 of a tokenizer's table: the bytes each id stands for, in id order, each prefixed by its length."""
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(len(piece).to_bytes(4, "little") + piece)
    return digest.hexdigest()


class TiktokenTokenizer(Tokenizer):
    """A tiktoken Encoding: GPT-2's by name, or one made from a rank file."""

    def __init__(self, encoding: Any, source: str):
        self.encoding = encoding
        self.source = source
        self.size = encoding.n_vocab
        self.eot_id = encoding.eot_token

    # Made when first asked for, not in `avatarl prepare`'s workers, which only encode.
    @cached_property
    def pieces(self) -> list[bytes]:
        """The bytes each id stands for."""
        return [self._bytes_of(i) for i in range(self.size)]

    @cached_property
    def identity(self) -> TokenizerIdentity:
        return TokenizerIdentity("tiktoken", self.source, pieces_sha256(self.pieces))

    def _bytes_of(self, i: int) -> bytes:
        try:
            return self.encoding.decode_single_token_bytes(i)
        except KeyError:
            return b""  # an id between the ranks and the special tokens

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Any) -> str:
        return self.encoding.decode(_ids(ids))

    def token_bytes(self) -> np.ndarray:
        sizes = np.array([len(piece) for piece in self.pieces], dtype=np.int64)
        sizes[[self.encoding.encode_single_token(token) for token in self.encoding.special_tokens_set]] = 0
        return sizes


def tiktoken_from_rank_file(path: Path) -> Any:
    """A tiktoken Encoding from a rank file, with GPT-2's split pattern and <|endoftext|> after the ranks."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = load_tiktoken_bpe(str(path))
    return tiktoken.Encoding(name=path.stem, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={END_OF_TEXT: len(ranks)})


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer from tokenizer.json (or a save_pretrained directory)."""

    def __init__(self, path: Path, source: str):
        from tokenizers import Tokenizer as RustTokenizer

        raw = path.read_bytes()
        self.tokenizer = RustTokenizer.from_str(raw.decode("utf-8"))
        self.size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot_id = self.tokenizer.token_to_id(END_OF_TEXT)
        self.special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
        self.byte_level = "ByteLevel" in json.dumps(json.loads(raw).get("decoder") or {})
        self.identity = TokenizerIdentity("huggingface", source, hashlib.sha256(raw).hexdigest())

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Any) -> str:
        return self.tokenizer.decode(_ids(ids), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        from tokenizers import pre_tokenizers

        table = set(pre_tokenizers.ByteLevel.alphabet()) if self.byte_level else set()  # one char per byte
        sizes = np.zeros(self.size, dtype=np.int64)
        for i in range(self.size):
            token = self.tokenizer.id_to_token(i)
            if token is None or token in self.special:
                continue
            if self.byte_level and all(ch in table for ch in token):
                sizes[i] = len(token)  # one printable char per byte
            else:
                sizes[i] = len(self.tokenizer.decode([i]).encode("utf-8"))
        return sizes


def char_vocabulary(tokenizer: Tokenizer) -> list[str]:
    """The chars of a char tokenizer (what checkpoints of char runs have always saved), else []."""
    return list(tokenizer.chars) if isinstance(tokenizer, CharTokenizer) else []


def hf_tokenizer_file(path: Path) -> Path | None:
    """tokenizer.json itself, or the one inside a save_pretrained directory."""
    if path.is_file() and path.suffix == ".json":
        return path
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return path / "tokenizer.json"
    return None


def load_tokenizer(spec: str, corpus_text: str | None = None) -> Tokenizer:
    """The tokenizer TOKENIZER names; `char` needs the corpus text its vocabulary is built from."""
    if spec == "char":
        if corpus_text is None:
            raise ConfigError(["TOKENIZER=char builds its vocabulary from a text corpus: prepared data needs a "
                               "BPE (TOKENIZER=gpt2, a .tiktoken rank file or a Hugging Face tokenizer)."])
        return CharTokenizer.from_text(corpus_text)
    if spec == GPT2:
        import tiktoken

        try:
            return TiktokenTokenizer(tiktoken.get_encoding(GPT2), GPT2)
        except Exception as err:  # noqa: BLE001 - tiktoken downloads the ranks once; offline it fails
            raise ConfigError([f"TOKENIZER=gpt2: tiktoken could not load the GPT-2 ranks ({type(err).__name__}); "
                               "on a machine without network set TIKTOKEN_CACHE_DIR to a cache that holds them, or "
                               "TOKENIZER to a local .tiktoken rank file."]) from None
    path = Path(spec).expanduser().resolve()  # recorded absolute: a checkpoint finds it from any directory
    if path.suffix == ".tiktoken" and path.is_file():
        try:
            return TiktokenTokenizer(tiktoken_from_rank_file(path), str(path))
        except (ValueError, OSError) as err:
            raise ConfigError([f"TOKENIZER={spec!r} is not a tiktoken rank file ({err})."]) from None
    found = hf_tokenizer_file(path)
    if found is None:
        raise ConfigError([f"TOKENIZER={spec!r}: use char, gpt2, a .tiktoken rank file, or a Hugging Face "
                           "tokenizer.json / save_pretrained directory (e.g. from `avatarl tokenizer train`)."])
    try:
        return HFTokenizer(found, str(path))
    except Exception as err:  # noqa: BLE001 - the Rust loader raises its own exception type
        raise ConfigError([f"TOKENIZER={spec!r}: {found} is not a Hugging Face tokenizer ({err})."]) from None


def tokenizer_from_identity(identity: TokenizerIdentity, chars: list[str] | None = None,
                            owner: str = "the checkpoint") -> Tokenizer:
    """The tokenizer a checkpoint or prepared directory was made with, from where it was then, checked against
    its sha256; a ConfigError that says so when it is gone or changed."""
    if identity.kind == "char":
        tokenizer: Tokenizer = CharTokenizer(chars or [])
    else:
        try:
            tokenizer = load_tokenizer(identity.source)
        except ConfigError:
            raise ConfigError([f"{owner} was made with {identity.describe()}, which cannot be loaded from there any "
                               "more: set TOKENIZER to where it is now."]) from None
    check_same_tokenizer(identity, tokenizer.identity, owner, "the tokenizer found there")
    return tokenizer


def vocabulary_difference(saved: dict[str, Any], tokenizer: Tokenizer) -> str | None:
    """Why the token ids of a checkpoint or referee (its "tokenizer" identity; char files of before it carry
    their chars as "vocab" / "vocab_chars") mean something else under `tokenizer`; None when they do not."""
    mine = tokenizer.identity
    theirs = TokenizerIdentity.from_dict(saved["tokenizer"]) if saved.get("tokenizer") else None
    if theirs is not None and not theirs.kind == mine.kind == "char":
        return None if theirs == mine else f"tokenizer {theirs.describe()} vs {mine.describe()}"
    chars = list(saved.get("vocab") or saved.get("vocab_chars") or [])
    ours = char_vocabulary(tokenizer)
    if chars == ours:
        return None
    if len(chars) != len(ours):
        return f"{len(chars)} vs {len(ours)} symbols"
    i = next(i for i, (a, b) in enumerate(zip(chars, ours, strict=True)) if a != b)
    return f"same {len(chars)} symbols count, but token {i} is {chars[i]!r} vs {ours[i]!r}"


def check_same_tokenizer(theirs: TokenizerIdentity, mine: TokenizerIdentity, their_name: str, my_name: str) -> None:
    """ConfigError naming both tokenizers when the ids of one do not mean what they mean in the other."""
    if theirs != mine:
        raise ConfigError([f"tokenizer mismatch: {their_name} was made with {theirs.describe()}, {my_name} is "
                           f"{mine.describe()}; use the same tokenizer (TOKENIZER) for both."])


def train_bpe(docs: Any, vocab_size: int, output: Path) -> Path:
    """`avatarl tokenizer train`: a byte-level BPE (GPT-2's pre-tokenization, <|endoftext|> as its one special
    token) trained with Hugging Face `tokenizers` on the documents, offline. Writes OUTPUT/tokenizer.json, plus
    the transformers files (save_pretrained) where transformers is installed; returns tokenizer.json's path."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ConfigError([f"--vocab-size {vocab_size}: a byte-level BPE needs at least 257 ids (256 bytes and "
                           "<|endoftext|>)."])
    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(docs, trainer)
    output.mkdir(parents=True, exist_ok=True)
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        tokenizer.save(str(output / "tokenizer.json"))
    else:
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT
                                ).save_pretrained(str(output))
    return output / "tokenizer.json"
