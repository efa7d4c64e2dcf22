"""Fixtures shared by the test modules; the plain helpers behind them are in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import CORPUS, TINY, make_tiny_hf_model


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    if not CORPUS.is_file():
        pytest.fail(f"Tiny Shakespeare is expected at {CORPUS} (../shared/data relative to the repo root)")
    return CORPUS


@pytest.fixture
def tiny_env(tmp_path: Path, corpus_path: Path) -> dict[str, str]:
    return {**TINY, "DATA_PATH": str(corpus_path), "CHECKPOINT_DIR": str(tmp_path / "ckpt")}


@pytest.fixture
def tiny_hf_dir(tmp_path: Path) -> Path:
    """A tiny GPT-2 and its BPE tokenizer, saved with save_pretrained (no network)."""
    pytest.importorskip("transformers")
    return make_tiny_hf_model(tmp_path)
