"""A prepared data directory, read without loading it: train.bin / val.bin token ids through numpy.memmap.

    DIR/train.bin, DIR/val.bin   flat token ids, uint16 when the vocabulary fits (nanoGPT's layout),
                                 else uint32
    DIR/meta.json                tokenizer identity, dtype, vocab size, token and document counts, split rule,
                                 sources, sha256 of each .bin (written by `avatarl prepare`)

A nanoGPT (or upstream avataRL) directory without meta.json works too: uint16 ids, and TOKENIZER says
which tokenizer made them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avatarl.data.tokenizers import (
    Tokenizer,
    TokenizerIdentity,
    check_same_tokenizer,
    load_tokenizer,
    tokenizer_from_identity,
)
from avatarl.errors import InputError

META = "meta.json"
TRAIN_BIN, VAL_BIN = "train.bin", "val.bin"
FORMAT = "avatarl.prepared/1"


def is_prepared_dir(path: Path) -> bool:
    return path.is_dir() and (path / TRAIN_BIN).is_file()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (GPT-2's 50,257 does), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class PreparedData:
    directory: Path
    train: np.memmap
    val: np.memmap
    meta: dict[str, Any]


def read_meta(directory: Path) -> dict[str, Any] | None:
    path = directory / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError([f"DATA_PATH={str(directory)!r}: {META} is unreadable ({err}); "
                           "run `avatarl prepare` again."]) from None
    if meta.get("format") != FORMAT:
        raise InputError([f"DATA_PATH={str(directory)!r}: {META} is not an avatarl prepared directory "
                           f"(format {meta.get('format')!r}, expected {FORMAT!r})."])
    return meta


def open_prepared(directory: Path, tokenizer_spec: str) -> tuple[PreparedData, Tokenizer]:
    """The memmapped splits and their tokenizer. TOKENIZER=char (the default) means "the data's own";
    any other TOKENIZER must be the one the data was made with (refused with both named, exit 2)."""
    meta = read_meta(directory)
    for name in (TRAIN_BIN, VAL_BIN):
        if not (directory / name).is_file():
            raise InputError([f"DATA_PATH={str(directory)!r} has no {name}: "
                               f"run `avatarl prepare ... --output {directory}` "
                               "(an interrupted prepare leaves none)."])
    if meta is None:  # a nanoGPT directory
        if tokenizer_spec == "char":
            raise InputError([f"DATA_PATH={str(directory)!r} has train.bin but no {META}: "
                               "set TOKENIZER to the tokenizer that wrote it "
                               "(gpt2 for nanoGPT's openwebtext)."])
        tokenizer = load_tokenizer(tokenizer_spec)
        dtype = token_dtype(tokenizer.size)
        meta = {"tokenizer": tokenizer.identity.to_dict(), "dtype": dtype.name, "vocab_size": tokenizer.size}
    else:
        saved = TokenizerIdentity.from_dict(meta["tokenizer"])
        if tokenizer_spec == "char":  # the default: the data's own tokenizer
            tokenizer = tokenizer_from_identity(saved, owner=f"the data in {directory}")
        else:
            tokenizer = load_tokenizer(tokenizer_spec)
            check_same_tokenizer(saved, tokenizer, f"the data in {directory}", "TOKENIZER")
        dtype = np.dtype(meta["dtype"])
    train = np.memmap(directory / TRAIN_BIN, dtype=dtype, mode="r")
    val = np.memmap(directory / VAL_BIN, dtype=dtype, mode="r")
    for name, split in (("train_tokens", train), ("val_tokens", val)):
        if name in meta and meta[name] != len(split):
            raise InputError([f"DATA_PATH={str(directory)!r}: {META} says {meta[name]:,} {name}, "
                               f"the file holds {len(split):,}: it was changed or truncated; "
                               "run `avatarl prepare` again."])
    return PreparedData(directory, train, val, meta), tokenizer
