"""Fixtures shared by the test modules; the plain helpers behind them are in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from avatarl.cli import main as avatarl_main
from avatarl.data.corpus import PACKAGED_CORPUS, packaged_tiny_shakespeare
from tests.helpers import TINY, make_tiny_hf_model


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory) -> Path:
    """Tiny Shakespeare as a plain text file: the package's copy, decompressed (and its sha256 checked)
    once per session, so the suite runs from any clone."""
    text = packaged_tiny_shakespeare()
    if text is None:
        pytest.fail(f"{PACKAGED_CORPUS} is missing or does not match its sha256")
    path = tmp_path_factory.mktemp("corpus") / "tinyshakespeare.txt"
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture
def tiny_env(tmp_path: Path, corpus_path: Path) -> dict[str, str]:
    return {**TINY, "DATA_PATH": str(corpus_path), "CHECKPOINT_DIR": str(tmp_path / "ckpt")}


@pytest.fixture
def tiny_hf_dir(tmp_path: Path) -> Path:
    """A tiny GPT-2 and its BPE tokenizer, saved with save_pretrained (no network)."""
    pytest.importorskip("transformers")
    return make_tiny_hf_model(tmp_path)


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory, corpus_path: Path) -> Path:
    """A 512-id byte-level BPE trained by `avatarl tokenizer train` on the first 200k chars of the corpus."""
    root = tmp_path_factory.mktemp("bpe")
    (root / "slice.txt").write_text(corpus_path.read_text()[:200_000])
    assert avatarl_main(["tokenizer", "train", "--vocab-size", "512", "--output", str(root / "tok"),
                         str(root / "slice.txt")]) == 0
    return root / "tok"


@pytest.fixture(scope="session")
def prepared_shakespeare(tmp_path_factory, corpus_path: Path, bpe_dir: Path) -> Path:
    """Tiny Shakespeare through `avatarl prepare` with that BPE (2 worker processes)."""
    out = tmp_path_factory.mktemp("prepared") / "shakespeare"
    assert avatarl_main(["prepare", str(corpus_path), "--output", str(out), "--tokenizer", str(bpe_dir),
                         "--num-proc", "2"]) == 0
    return out
