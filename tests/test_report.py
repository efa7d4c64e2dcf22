"""`avatarl report RUN_DIR`: the PNG of a real tiny run's metrics.jsonl, panels only for what was logged,
the count-model lines rebuilt from a char run's corpus, and one line with exit 2 for a directory that holds
nothing to draw."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from avatarl import exit_codes
from avatarl.cli import main as avatarl_main
from avatarl.report import PANELS, X_KEY, load_records, report_run
from tests.helpers import metric_records, run_cli

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Every evaluation logs val_ce/val_bpb, val_acc and val_ce_calibrated; GRPO logs the rest, samples included.
PANEL_NAMES_OF_A_TINY_GRPO_RUN = ["val_ce", "val_acc", "val_ce_calibrated", "reward", "true_reward",
                                  "entropy", "kl", "samples", "throughput"]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk that must follow the signature of a valid PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def logged_panels(records: list[dict]) -> list[str]:
    return [panel.name for panel in PANELS
            if any(key in record and X_KEY in record for record in records for key in panel.keys)]


def write_lines(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


@pytest.mark.slow
def test_report_of_a_tiny_grpo_run(tiny_env, tmp_path, corpus_path):
    # a slice: the corpus is read and counted twice, by the run and the report
    data = tmp_path / "shakespeare-200k.txt"
    data.write_text(corpus_path.read_text()[:200_000])
    trained = run_cli(["train"], tmp_path, **{**tiny_env, "DATA_PATH": str(data)})
    assert trained.returncode == 0, trained.stderr
    run_dir = Path(tiny_env["CHECKPOINT_DIR"])
    records = metric_records(run_dir)

    drawn = report_run(run_dir)
    assert drawn.path == run_dir / "report.png" and drawn.path.stat().st_size > 10_000
    width, height = png_size(drawn.path)
    assert width >= 1000 and height >= 600
    assert drawn.panels == logged_panels(records) == PANEL_NAMES_OF_A_TINY_GRPO_RUN
    assert drawn.baselines == "rebuilt from ckpt_00000004.pt", \
        "a char run whose corpus is here gets its lines"
    assert drawn.unit == "character"  # its axes say "characters seen", its throughput characters/s
    counted = drawn.lines
    assert counted is not None and list(counted) == ["uniform", "unigram", "bigram", "trigram", "4-gram"]
    unigram, four_gram = counted["unigram"], counted["4-gram"]
    assert unigram["acc"] < four_gram["acc"] and four_gram["ce"] < unigram["ce"]
    assert any("sample_distinct_2" in record and "sample_longest_run" in record for record in records)


def test_report_draws_only_what_was_logged(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [
        {"iter": 0, "val_ce": 4.17, "tokens_seen": 0},
        {"iter": 2, "tokens_per_s": 900.0, "tokens_seen": 640},
        {"iter": 2, "val_ce": 3.9, "val_acc": 0.12, "tokens_seen": 640},
        {"iter": 2, "entropy": 4.1},  # no tokens_seen: nothing to place it at
    ])
    drawn = report_run(tmp_path, out=tmp_path / "elsewhere.png")
    assert drawn.panels == ["val_ce", "val_acc", "throughput"]
    assert drawn.baselines == "none, no checkpoint holds the run's config" and drawn.lines is None
    assert drawn.unit == "token"  # no checkpoint says the tokenizer: tokens, which a character also is
    assert png_size(tmp_path / "elsewhere.png")[0] > 0 and not (tmp_path / "report.png").exists()
    assert report_run(tmp_path, rebuild_baselines=False).panels == drawn.panels


def test_metrics_logged_under_the_older_names_are_drawn_too(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [{"iter": 0, "val_ce": 4.17, "chars_seen": 0},
                                             {"iter": 2, "chars_per_s": 900.0, "chars_seen": 640}])
    assert load_records(tmp_path) == [{"iter": 0, "val_ce": 4.17, "tokens_seen": 0},
                                      {"iter": 2, "tokens_per_s": 900.0, "tokens_seen": 640}]
    assert report_run(tmp_path, rebuild_baselines=False).panels == ["val_ce", "throughput"]


def test_no_baselines_without_a_checkpoint_to_rebuild_them_from(tmp_path, capsys):
    write_lines(tmp_path / "metrics.jsonl", [{"iter": 2, "kl": 0.5, "kl_coef": 1.0, "tokens_seen": 640}])
    assert avatarl_main(["report", str(tmp_path)]) == exit_codes.OK
    out = capsys.readouterr().out
    assert out.strip() == (f"[avatarl] {tmp_path / 'report.png'}: kl "
                           "(count-model lines: none, no checkpoint holds the run's config)")


@pytest.mark.parametrize("content", [None, "", "\n\n", "not json\n", "[1, 2]\n", '{"iter": 1}\n'])
def test_a_run_dir_with_nothing_to_draw_is_one_line_and_exit_2(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert avatarl_main(["report", str(tmp_path)]) == exit_codes.CONFIG
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "metrics.jsonl" in err
    assert not (tmp_path / "report.png").exists()


def test_a_missing_run_dir_is_one_line_and_exit_2(tmp_path, capsys):
    assert avatarl_main(["report", str(tmp_path / "nowhere")]) == exit_codes.CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such directory" in err


def test_missing_matplotlib_is_one_line_naming_the_command_and_the_install(tmp_path, capsys, monkeypatch):
    write_lines(tmp_path / "metrics.jsonl", [{"iter": 2, "kl": 0.5, "tokens_seen": 640}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert avatarl_main(["report", str(tmp_path), "--no-baselines"]) == exit_codes.CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`avatarl report` draws with matplotlib" in err
    assert "pip install 'avatarl[plot]'" in err
    assert not (tmp_path / "report.png").exists()
