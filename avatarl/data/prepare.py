"""`avatarl prepare`: documents -> DIR/train.bin, DIR/val.bin (token ids) + DIR/meta.json, in parallel,
atomically.

Documents are cut into chunks of at most CHUNK_CHARS characters (smaller for a corpus of fewer than 64
such chunks, so that it still splits), a long document only where one newline stands between two visible
characters, where GPT-2-style pre-tokenization splits anyway, so the ids are those of the whole document.
The chunks are tokenized by --num-proc worker processes in order, and each document is followed by the
tokenizer's end-of-text id. Everything goes to one temporary file; at the end its trailing whole chunks
holding VAL_FRACTION of the tokens become val.bin, the rest train.bin. The temporary files are renamed
into place last, val.bin, meta.json, then train.bin, so a killed prepare never leaves a train.bin that
looks complete, and a rerun starts over from the sources and writes the same bytes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from avatarl.config import ConfigError
from avatarl.data.prepared import FORMAT, META, TRAIN_BIN, VAL_BIN, token_dtype
from avatarl.data.sources import HFSource, documents, expand, require_sources
from avatarl.data.tokenizers import Tokenizer, load_tokenizer
from avatarl.files import atomic_write, fsync_path, sha256_of

CHUNK_CHARS = 1 << 16
MIN_CHUNK_CHARS = 1 << 10
CHUNKS_AT_LEAST = 64  # a small corpus gets smaller chunks, so val.bin can hold whole ones of it
SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")  # cut after such a newline: pre-tokenization splits there anyway
TEMP_SUFFIX = ".tmp"


def chunks(docs: Iterator[str], limit: int = CHUNK_CHARS) -> Iterator[tuple[str, bool]]:
    """(text, ends a document) pieces of at most ~limit chars; a document is cut only at SAFE_CUT newlines."""
    for doc in docs:
        start = 0
        while len(doc) - start > limit:
            cut = next((m.end() for m in SAFE_CUT.finditer(doc, start + limit // 2, start + limit)), None)
            if cut is None:
                later = SAFE_CUT.search(doc, start + limit)
                cut = later.end() if later else len(doc)
            if cut >= len(doc):
                break
            yield doc[start:cut], False
            start = cut
        yield doc[start:], True


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(spec: str) -> None:
    global _WORKER_TOKENIZER  # one tokenizer per worker process, loaded once
    _WORKER_TOKENIZER = load_tokenizer(spec)


def _encode(piece: tuple[str, bool]) -> tuple[list[int], bool, int]:
    text, last = piece
    assert _WORKER_TOKENIZER is not None
    ids = _WORKER_TOKENIZER.encode(text)
    if last:
        ids.append(_WORKER_TOKENIZER.eot_id)
    return ids, last, len(text.encode("utf-8"))


def check_tokenizer(spec: str) -> Tokenizer:
    """The BPE that prepare writes ids of: refused before loading when it is char, or has no end-of-text."""
    if spec == "char":
        raise ConfigError(["avatarl prepare needs a BPE: --tokenizer gpt2, a .tiktoken rank file or a "
                           "Hugging Face tokenizer (TOKENIZER=char trains on a text file directly)."])
    tokenizer = load_tokenizer(spec)
    if tokenizer.eot_id is None:
        raise ConfigError([f"--tokenizer {spec}: it has no <|endoftext|> token to join documents with; "
                           "train one with `avatarl tokenizer train`, which adds it."])
    return tokenizer


def prepare(sources: list[str], output: Path, tokenizer_spec: str, hf: HFSource | None = None,
            text_column: str = "text", num_proc: int = 1, val_fraction: float = 0.1,
            dtype_name: str = "auto") -> dict[str, Any]:
    """Tokenize the sources into `output`; returns the meta.json written there."""
    require_sources(sources, hf, "avatarl prepare")
    if not 0 < val_fraction < 1:
        raise ConfigError([f"--val-fraction {val_fraction}: give a fraction between 0 and 1, e.g. 0.1."])
    files = expand(sources)
    tokenizer = check_tokenizer(tokenizer_spec)
    dtype = token_dtype(tokenizer.size) if dtype_name == "auto" else np.dtype(dtype_name)
    if tokenizer.size > np.iinfo(dtype).max + 1:
        raise ConfigError([f"--dtype {dtype_name}: a vocabulary of {tokenizer.size:,} ids does not fit; use "
                           "--dtype uint32 (or auto)."])
    output.mkdir(parents=True, exist_ok=True)
    for leftover in output.glob(f"*{TEMP_SUFFIX}"):  # a killed prepare's files: start over
        leftover.unlink()
    everything = output / f"all.bin{TEMP_SUFFIX}"
    boundaries, n_docs, utf8_bytes, started = [0], 0, 0, time.perf_counter()
    total_bytes = sum(path.stat().st_size for path in files) if hf is None else None
    if total_bytes == 0:
        raise ConfigError([f"avatarl prepare: the sources hold no text "
                           f"({', '.join(map(str, files))} are empty)."])
    limit = CHUNK_CHARS if total_bytes is None else \
        max(MIN_CHUNK_CHARS, min(CHUNK_CHARS, total_bytes // CHUNKS_AT_LEAST))
    pieces = chunks(documents(files, hf, text_column), limit)
    spawn = multiprocessing.get_context("spawn")
    with open(everything, "wb") as out, tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare",
                                            dynamic_ncols=True, disable=None, mininterval=1.0) as bar, \
            spawn.Pool(max(1, num_proc), _init_worker, (tokenizer_spec,)) as pool:
        for ids, last, size in pool.imap(_encode, pieces, chunksize=4):
            np.asarray(ids, dtype=dtype).tofile(out)
            boundaries.append(boundaries[-1] + len(ids))
            n_docs += last
            utf8_bytes += size
            bar.update(size)
            bar.set_postfix(tokens_per_s=f"{boundaries[-1] / max(1e-9, time.perf_counter() - started):,.0f}")
    total = boundaries[-1]
    if utf8_bytes == 0:
        everything.unlink()
        raise ConfigError(["avatarl prepare: the sources hold no text."])
    cut = next((b for b in boundaries if b >= (1 - val_fraction) * total), total)
    if cut in (0, total):
        cut = boundaries[-2] if len(boundaries) > 2 else total
    if cut == total:
        everything.unlink()
        raise ConfigError([f"avatarl prepare: {total:,} tokens in one chunk cannot be split into train "
                           "and val; give more text."])
    train_tmp, val_tmp = output / f"{TRAIN_BIN}{TEMP_SUFFIX}", output / f"{VAL_BIN}{TEMP_SUFFIX}"
    tokens = np.memmap(everything, dtype=dtype, mode="r")
    tokens[cut:].tofile(val_tmp)
    del tokens
    os.truncate(everything, cut * dtype.itemsize)
    os.replace(everything, train_tmp)
    for path in (train_tmp, val_tmp):
        fsync_path(path)
    elapsed = time.perf_counter() - started
    meta = {"format": FORMAT, "tokenizer": tokenizer.identity.to_dict(), "dtype": dtype.name,
            "vocab_size": tokenizer.size, "eot_id": tokenizer.eot_id, "train_tokens": cut,
            "val_tokens": total - cut,
            "documents": n_docs, "utf8_bytes": utf8_bytes,
            "split": {"val_fraction": val_fraction, "rule": f"chunks of up to {limit} chars in source order; "
                      "val.bin = the trailing whole chunks holding at least val_fraction of the tokens"},
            "sources": [str(path) for path in files]
            + ([f"hf:{hf.name}:{hf.config or ''}:{hf.split}"] if hf else []),
            "sha256": {TRAIN_BIN: sha256_of(train_tmp), VAL_BIN: sha256_of(val_tmp)},
            "tokens_per_s": total / elapsed, "seconds": round(elapsed, 2), "num_proc": num_proc}
    os.replace(val_tmp, output / VAL_BIN)
    atomic_write(output / META, [(json.dumps(meta, indent=2) + "\n").encode()])
    os.replace(train_tmp, output / TRAIN_BIN)  # last: only now does the directory look complete
    fsync_path(output)
    return meta
