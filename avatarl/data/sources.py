"""Where `avatarl prepare` and `avatarl tokenizer train` read documents: UTF-8 files, directories or globs of
.txt / .jsonl / .parquet files, or a Hugging Face dataset (hub name or local directory) through `datasets`.

A .txt file is one document; a .jsonl line or a parquet / dataset row is one document (its TEXT_COLUMN).
Problems (no such file, an empty source, a file that is not UTF-8, a missing text column) raise
InputError (a ConfigError) with one line that names the source, before any expensive work where they
can be seen up front.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from avatarl.config import ConfigError
from avatarl.errors import InputError

SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class HFSource:
    name: str                 # hub name or local directory (save_to_disk output, or data files)
    config: str | None = None
    split: str = "train"
    streaming: bool = False


def require_sources(sources: list[str], hf: HFSource | None, command: str) -> None:
    """ConfigError when a command that reads documents was given none to read."""
    if not sources and hf is None:
        raise ConfigError([f"{command}: name at least one source (a file, directory or glob) "
                           "or --hf-dataset."])


def expand(sources: list[str]) -> list[Path]:
    """Files named by the sources (a file, a directory searched recursively, or a glob), in sorted order."""
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        else:
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise InputError([f"source {source!r}: no such file, or no {'/'.join(SUFFIXES)} file in it."])
        unknown = [p for p in found if p.suffix not in SUFFIXES]
        if unknown:
            raise InputError([f"source {unknown[0]}: unknown kind of file; use {', '.join(SUFFIXES)}."])
        files += found
    return files


def _jsonl_documents(path: Path, column: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="strict") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise InputError([f"source {path}:{number} is not a JSON line ({err})."]) from None
            if column not in record:
                raise InputError([f"source {path}:{number} has no text column {column!r} (it has "
                                   f"{', '.join(sorted(record))}): set --text-column."])
            yield str(record[column])


def _parquet_documents(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if column not in table.schema_arrow.names:
        raise InputError([f"source {path} has no text column {column!r} (it has "
                           f"{', '.join(table.schema_arrow.names)}): set --text-column."])
    for batch in table.iter_batches(columns=[column], batch_size=1024):
        yield from (str(text) for text in batch.column(0).to_pylist() if text is not None)


def file_documents(files: list[Path], column: str) -> Iterator[str]:
    for path in files:
        try:
            if path.suffix == ".txt":
                yield path.read_text(encoding="utf-8")
            elif path.suffix == ".jsonl":
                yield from _jsonl_documents(path, column)
            else:
                yield from _parquet_documents(path, column)
        except UnicodeDecodeError as err:
            raise InputError([f"source {path} is not UTF-8 text (byte {err.start}): convert it to UTF-8."]) \
                from None


def hf_documents(source: HFSource, column: str) -> Iterator[str]:
    """The TEXT_COLUMN of every row of a Hugging Face dataset split (streamed when asked)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(["--hf-dataset needs the datasets library: pip install 'avatarl[data]'."]) from None
    local = Path(source.name).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "state.json").is_file()
                               or (local / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(local))
            dataset = loaded[source.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            dataset = datasets.load_dataset(source.name, source.config, split=source.split,
                                            streaming=source.streaming)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise InputError([f"--hf-dataset {source.name}: could not load split {source.split!r} "
                          f"({err})."]) from None
    names = list(dataset.column_names or [])
    if names and column not in names:
        raise InputError([f"--hf-dataset {source.name} has no text column {column!r} (it has "
                           f"{', '.join(names)}): set --text-column."])
    for row in dataset:
        if row[column] is not None:
            yield str(row[column])


def documents(files: list[Path], hf: HFSource | None, column: str) -> Iterator[str]:
    """Every document of the sources, in order: the files first, then the dataset."""
    yield from file_documents(files, column)
    if hf is not None:
        yield from hf_documents(hf, column)
