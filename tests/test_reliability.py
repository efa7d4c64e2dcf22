"""Exact continuation, proven with real processes: N iterations straight vs N/2 -> SIGKILL -> resume to N."""

from __future__ import annotations

import pytest

from tests.helpers import FAULTY, FAULTY_TRAIN, TORCHRUN, check_equivalence

pytestmark = pytest.mark.slow  # real trainer processes: see `make test-fast`


def test_sigkill_and_resume_is_bit_identical_single_process(tmp_path, corpus_path):
    compared = check_equivalence(FAULTY_TRAIN, tmp_path, corpus_path)
    print(f"\n[reliability] single process: {compared} tensor bytes compared, all bit-identical")
    assert compared > 100_000


def test_sigkill_and_resume_is_bit_identical_torchrun_two_ranks(tmp_path, corpus_path):
    compared = check_equivalence([*TORCHRUN, *FAULTY], tmp_path, corpus_path)
    print(f"\n[reliability] torchrun 2 ranks (gloo): {compared} tensor bytes compared, all bit-identical")
    assert compared > 100_000
