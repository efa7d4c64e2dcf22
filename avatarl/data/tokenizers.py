"""Tokenizers (TOKENIZER): characters of the corpus, GPT-2's BPE through tiktoken, or a Hugging Face
tokenizer.

    char                       every distinct char of the corpus, sorted, one id each (the default)
    gpt2                       tiktoken's GPT-2 encoding: the ids nanoGPT and upstream avataRL write to
                               train.bin
    PATH.tiktoken              a tiktoken rank file (base64 token, rank per line) with GPT-2's split
                               pattern and <|endoftext|> after the last rank: GPT-2's own file works offline
    PATH (tokenizer.json or    a Hugging Face tokenizer, e.g. one made by `avatarl tokenizer train`
     a save_pretrained dir)

Each tokenizer has an identity (kind, source, sha256 of its definition) that prepared data and every
checkpoint record, so data, checkpoints and referees made with another tokenizer are refused (one check,
`tokenizer_difference`), and `token_bytes`: the UTF-8 bytes each id stands for, which bits per byte divide
by. A byte-level BPE's table of token bytes is read one way (`HFTokenizer.byte_pieces`), so GPT-2 through
tiktoken and as a Hugging Face tokenizer.json have one `table_sha256`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache, cached_property
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

    def table_sha256(self) -> str | None:
        """`pieces_sha256` of the bytes each id stands for where ids are byte strings, so two kinds of
        tokenizer with one table compare equal; None where they are not (chars, a BPE not byte-level)."""
        return None


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
    """sha256 of a tokenizer's table: the bytes each id stands for, in id order, each prefixed by its
    length."""
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

    def table_sha256(self) -> str | None:
        return self.identity.sha256  # the identity already hashes the token bytes


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

    @cached_property
    def byte_pieces(self) -> list[bytes | None]:
        """The bytes each id stands for, read off a byte-level tokenizer's alphabet (one char per byte); None
        for a special token, an unused id, a token outside the alphabet, and every id of a tokenizer that
        is not byte-level."""
        byte_of = byte_level_alphabet() if self.byte_level else {}
        pieces: list[bytes | None] = []
        for i in range(self.size):
            token = self.tokenizer.id_to_token(i)
            readable = token is not None and token not in self.special and bool(byte_of)
            readable = readable and set(token) <= byte_of.keys()
            pieces.append(bytes(byte_of[ch] for ch in token) if readable else None)
        return pieces

    def token_bytes(self) -> np.ndarray:
        sizes = np.zeros(self.size, dtype=np.int64)
        for i, piece in enumerate(self.byte_pieces):
            token = self.tokenizer.id_to_token(i)
            if token is None or token in self.special:
                continue
            sizes[i] = len(piece) if piece is not None else len(self.tokenizer.decode([i]).encode("utf-8"))
        return sizes

    def table_sha256(self) -> str | None:
        if not self.byte_level:
            return None
        # Special tokens count as their text, as tiktoken's table holds them.
        return pieces_sha256(piece if piece is not None else (self.tokenizer.id_to_token(i) or "").encode()
                             for i, piece in enumerate(self.byte_pieces))


@cache
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte: each printable Latin-1 byte is its own char, the other 68
    bytes (controls, space, NBSP, soft hyphen) are chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    alphabet = {chr(byte): byte for byte in printable}
    alphabet.update({chr(256 + n): byte for n, byte in enumerate(others)})
    return alphabet


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
            raise ConfigError(["TOKENIZER=char builds its vocabulary from a text corpus: prepared data "
                               "needs a BPE (TOKENIZER=gpt2, a .tiktoken rank file or a Hugging Face "
                               "tokenizer)."])
        return CharTokenizer.from_text(corpus_text)
    if spec == GPT2:
        import tiktoken

        try:
            return TiktokenTokenizer(tiktoken.get_encoding(GPT2), GPT2)
        except Exception as err:  # noqa: BLE001 - tiktoken downloads the ranks once; offline it fails
            raise ConfigError(["TOKENIZER=gpt2: tiktoken could not load the GPT-2 ranks "
                               f"({type(err).__name__}); on a machine without network set "
                               "TIKTOKEN_CACHE_DIR to a cache that holds them, or TOKENIZER to a local "
                               ".tiktoken rank file."]) from None
    path = Path(spec).expanduser().resolve()  # recorded absolute: a checkpoint finds it from any directory
    if path.suffix == ".tiktoken" and path.is_file():
        try:
            return TiktokenTokenizer(tiktoken_from_rank_file(path), str(path))
        except (ValueError, OSError) as err:
            raise ConfigError([f"TOKENIZER={spec!r} is not a tiktoken rank file ({err})."]) from None
    found = hf_tokenizer_file(path)
    if found is None:
        raise ConfigError([f"TOKENIZER={spec!r}: use char, gpt2, a .tiktoken rank file, or a Hugging Face "
                           "tokenizer.json / save_pretrained directory "
                           "(e.g. from `avatarl tokenizer train`)."])
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
            raise ConfigError([f"{owner} was made with {identity.describe()}, which cannot be loaded from "
                               "there any more: set TOKENIZER to where it is now."]) from None
    check_same_tokenizer(identity, tokenizer, owner, "the tokenizer found there")
    return tokenizer


def tokenizer_difference(theirs: Tokenizer | TokenizerIdentity, mine: Tokenizer) -> str | None:
    """Why ids made with `theirs` mean something else under `mine`; None when they mean the same. The one
    tokenizer check of prepared data, checkpoints and referees: two char vocabularies symbol by symbol,
    otherwise the same identity (kind and sha256 of the definition) or, both loaded, the same table of
    token bytes (GPT-2 through tiktoken and as a Hugging Face tokenizer.json)."""
    if isinstance(theirs, CharTokenizer) and isinstance(mine, CharTokenizer):
        return symbol_difference(list(theirs.chars), list(mine.chars))
    identity = theirs if isinstance(theirs, TokenizerIdentity) else theirs.identity
    if identity == mine.identity:
        return None
    table = mine.table_sha256()
    if isinstance(theirs, Tokenizer) and table is not None and table == theirs.table_sha256():
        return None
    return f"tokenizer {identity.describe()} vs {mine.identity.describe()}"


def symbol_difference(theirs: list[str], mine: list[str]) -> str | None:
    """The first way two char vocabularies differ (their sizes, else the first symbol), None when equal."""
    if theirs == mine:
        return None
    if len(theirs) != len(mine):
        return f"{len(theirs)} vs {len(mine)} symbols"
    i = next(i for i, (a, b) in enumerate(zip(theirs, mine, strict=True)) if a != b)
    return f"same {len(theirs)} symbols count, but token {i} is {theirs[i]!r} vs {mine[i]!r}"


def saved_tokenizer(saved: dict[str, Any]) -> Tokenizer | TokenizerIdentity:
    """What the ids of a checkpoint or referee file were made with: its "tokenizer" identity, or the chars
    of a char file (which carry them as "vocab" / "vocab_chars", from before identities were recorded)."""
    identity = saved.get("tokenizer")
    if identity and identity["kind"] != "char":
        return TokenizerIdentity.from_dict(identity)
    return CharTokenizer(saved.get("vocab") or saved.get("vocab_chars") or [])


def vocabulary_difference(saved: dict[str, Any], tokenizer: Tokenizer) -> str | None:
    """Why the token ids of a checkpoint or referee file mean something else under `tokenizer`, or None."""
    return tokenizer_difference(saved_tokenizer(saved), tokenizer)


def check_same_tokenizer(theirs: TokenizerIdentity, mine: Tokenizer, their_name: str, my_name: str
                         ) -> None:
    """ConfigError naming both tokenizers when the ids of one do not mean what they mean in the other."""
    if tokenizer_difference(theirs, mine) is not None:
        raise ConfigError([f"tokenizer mismatch: {their_name} was made with {theirs.describe()}, {my_name} "
                           f"is {mine.identity.describe()}; use the same tokenizer (TOKENIZER) for both."])


def train_bpe(docs: Any, vocab_size: int, output: Path) -> Path:
    """`avatarl tokenizer train`: a byte-level BPE (GPT-2's pre-tokenization, <|endoftext|> as its one
    special token) trained with Hugging Face `tokenizers` on the documents, offline. Writes
    OUTPUT/tokenizer.json, plus the transformers files (save_pretrained) where transformers is installed;
    returns tokenizer.json's path."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ConfigError([f"--vocab-size {vocab_size}: a byte-level BPE needs at least 257 ids "
                           "(256 bytes and <|endoftext|>)."])
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
