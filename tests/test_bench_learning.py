"""`avatarl bench learning`: equal budgets over seeds, count-model lines on the scoring windows, the new
metrics in the summary, JSON and plot, on a tiny budget."""

from __future__ import annotations

import argparse
import json
import math
import sys

import pytest

from avatarl.baselines import count_model_baselines
from avatarl.bench.learning import corpus_lines, learning_bench, run_learning_bench, tokens_to_beat
from avatarl.bench.learning_report import (
    SCHEMA,
    markdown_table,
    merge_reports,
    summarize,
    upgrade_report,
    write_outputs,
)
from avatarl.bench.rows import chosen_methods, methods
from avatarl.checkpoint import load_checkpoint
from avatarl.config import Config, ConfigError
from avatarl.config_sources import preset_values
from avatarl.data.corpus import reference_ids
from avatarl.data.sampler import eval_windows
from avatarl.generate import Sample
from tests.helpers import REPO

TINY_BENCH = {"n_layer": 1, "n_head": 2, "n_emb": 32, "context_len": 16, "horizon": 4, "k_samples": 2,
              "batch": 16, "micro_batch": 16, "warmup_iters": 2, "log_interval": 2, "eval_windows": 32,
              "device": "cpu"}
BUDGET_ITERS, REFEREE_ITERS, SEEDS = 6, 2, 2
AUTOREGRESSIVE = ("grpo", "grpo_reward_off", "grpo_ar_credit", "grpo_ar_credit_off")


def test_tokens_to_beat_is_the_first_measurement_strictly_below():
    curve = [(0, 4.2), (100, 3.0), (200, 2.5), (300, 2.4)]
    assert tokens_to_beat(curve, 3.0) == 200
    assert tokens_to_beat(curve, 2.45) == 300
    assert tokens_to_beat(curve, 2.4) is None
    assert tokens_to_beat([], 3.0) is None


def test_summary_over_seeds_by_hand():
    runs = [{"final_val_acc": 0.3, "final_val_ce": 2.0}, {"final_val_acc": 0.5, "final_val_ce": None}]
    got = summarize(runs)
    assert got["final_val_acc"] == {"mean": pytest.approx(0.4), "min": 0.3, "max": 0.5, "n": 2}
    assert got["final_val_ce"] == {"mean": 2.0, "min": 2.0, "max": 2.0, "n": 1}
    assert "final_val_bpb" not in got


def test_count_model_lines_of_a_prepared_bpe_directory(prepared_shakespeare):
    cfg = Config.of(**TINY_BENCH, data_path=str(prepared_shakespeare))
    baselines, corpus, unit = corpus_lines(cfg)
    windows = eval_windows(corpus.val, cfg.model.context_len, cfg.run.eval_windows)
    assert unit == "token" and corpus.tokenizer.size == 512
    assert baselines == count_model_baselines(reference_ids(corpus.train), windows, 512)
    # sparse counts: any order at 512 ids
    assert list(baselines) == ["uniform", "unigram", "bigram", "trigram", "4-gram"]
    assert baselines["bigram"]["acc"] > baselines["unigram"]["acc"] > baselines["uniform"]["acc"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory, corpus_path):
    """One tiny benchmark run, two seeds, on the first 200k chars of Tiny Shakespeare (the end-of-run text
    samples are stubbed out: they cost seconds per run and are the trainer's business)."""
    root = tmp_path_factory.mktemp("bench")
    data = root / "shakespeare-200k.txt"
    data.write_text(corpus_path.read_text()[:200_000])
    base = Config.of(**TINY_BENCH, data_path=str(data))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("avatarl.periodic.training_samples", lambda *args: [Sample("A", [1, 2, 3], "bcd")])
        patch.chdir(root)
        code, report = learning_bench(base, root / "out", BUDGET_ITERS, REFEREE_ITERS, seeds=SEEDS,
                                      eval_points=2)
    assert code == 0
    write_outputs(report, root / "out", root / "copy" / "learning.json")
    return root, data, report


@pytest.mark.slow
def test_every_method_and_seed_trains_at_the_same_budget(bench):
    root, _, report = bench
    budget = BUDGET_ITERS * 16 * (16 + 1)
    assert report["schema"] == SCHEMA
    assert report["budget_tokens"] == budget and report["seeds"] == [1337, 1338]
    assert list(report["methods"]) == [m.name for m in methods()]
    for name, entry in report["methods"].items():
        window = 16 + (4 if name in AUTOREGRESSIVE else 1)
        assert [run["seed"] for run in entry["runs"]] == [1337, 1338]
        for run in entry["runs"]:
            assert run["exit_code"] == 0
            assert abs(run["tokens_seen"] - budget) <= 16 * window / 2, (name, run["tokens_seen"])
            assert run["iters"] * 16 * window == run["tokens_seen"]
            tokens = [t for t, _ in run["curve"]]
            assert tokens[0] == 0 and tokens == sorted(tokens) and len(tokens) >= 3
            assert [t for t, _ in run["acc_curve"]] == tokens
            assert {"tokens_to_beat_unigram", "tokens_to_beat_bigram"} <= set(run)
            assert run["final_val_ce"] == run["curve"][-1][1]
            assert run["final_val_acc"] == run["acc_curve"][-1][1]
            # Tiny Shakespeare is ASCII: one byte per char, so bits per byte = nats per char / ln 2.
            assert run["final_val_bpb"] == pytest.approx(run["final_val_ce"] / math.log(2))
            assert 0 <= run["final_val_acc"] <= 1
            assert 0 < run["final_val_ce_second_half"] and 0 < run["final_val_ce_calibrated"]
        accs = [run["final_val_acc"] for run in entry["runs"]]
        assert entry["summary"]["final_val_acc"] == {"mean": pytest.approx(sum(accs) / 2), "min": min(accs),
                                                     "max": max(accs), "n": 2}
    seeds = report["methods"]["supervised"]["runs"]
    assert seeds[0]["curve"] != seeds[1]["curve"]  # another seed is another run
    for seed, referee in report["referee"].items():
        assert referee["iters"] == REFEREE_ITERS and referee["tokens_seen"] == REFEREE_ITERS * 16 * 17
        saved = load_checkpoint(root / "out" / "runs" / f"seed{seed}" / "referee" / "referee.pt")
        assert saved["val_ce"] == pytest.approx(referee["final_val_ce"])


@pytest.mark.slow
def test_the_reward_off_controls_get_no_reward(bench):
    root, _, report = bench
    assert report["methods"]["grpo_reward_off"]["settings"] == {
        "ALGORITHM": "grpo", "PARTIAL_CREDIT": 0.0, "EXACT_MATCH_REWARD": 0.0}
    assert report["methods"]["grpo_tf_reward_off"]["settings"]["ROLLOUTS"] == "teacher_forced"
    for off, on in (("grpo_reward_off", "grpo"), ("grpo_tf_reward_off", "grpo_tf")):
        for seed in report["seeds"]:
            runs = root / "out" / "runs" / f"seed{seed}"
            logged = [json.loads(line) for line in (runs / off / "metrics.jsonl").read_text().splitlines()]
            rewards = [record["reward_mean"] for record in logged if "reward_mean" in record]
            assert rewards and all(r == 0.0 for r in rewards)
            rewarded = [json.loads(line) for line in (runs / on / "metrics.jsonl").read_text().splitlines()]
            assert any(record.get("reward_mean", 0.0) > 0 for record in rewarded)


@pytest.mark.slow
def test_reference_lines_are_the_count_models_on_the_scoring_windows(bench):
    _, data, report = bench
    text = data.read_text()
    lines = report["baselines"]
    assert report["vocab_size"] == len(set(text)) and report["token_unit"] == "char"
    assert list(lines) == ["uniform", "unigram", "bigram", "trigram", "4-gram"]
    assert lines["uniform"] == {"acc": 1 / len(set(text)), "ce": math.log(len(set(text)))}
    ces, accs = [b["ce"] for b in lines.values()], [b["acc"] for b in lines.values()]
    assert ces == sorted(ces, reverse=True) and accs == sorted(accs)
    assert report["kl_reference"] == {"order": Config().grpo.ngram_order, **lines["trigram"]}


@pytest.mark.slow
def test_outputs_are_written(bench):
    root, _, report = bench
    out = root / "out"
    assert json.loads((out / "learning.json").read_text()) == json.loads(json.dumps(report))
    assert (root / "copy" / "learning.json").read_text() == (out / "learning.json").read_text()
    png = (out / "learning.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    table = markdown_table(report)
    supervised = report["methods"]["supervised"]["summary"]["final_val_acc"]
    row = f"| supervised (not RL, the ceiling) | {BUDGET_ITERS * 16 * 17:,} | {supervised['mean']:.3f} ("
    assert row in table


def test_a_row_that_cannot_run_stops_the_bench_before_any_training(tmp_path, prepared_shakespeare):
    base = Config.of(**TINY_BENCH, data_path=str(prepared_shakespeare), referee_quantize="int8")  # CUDA only
    with pytest.raises(ConfigError) as refused:
        learning_bench(base, tmp_path / "out", BUDGET_ITERS, REFEREE_ITERS)
    rows = ("AvataRL", "AvataRL, REALITY_WEIGHT=0 (referee only)",
            "AvataRL on-policy (V/2 student draws, importance weights)",
            "AvataRL on-policy, group-mean baseline")
    assert [line.split(": ")[0] for line in refused.value.problems] == list(rows)
    assert all("REFEREE_QUANTIZE=int8 needs CUDA" in line for line in refused.value.problems)
    # the GRPO rows could run (any tokenizer), and nothing trained
    assert not (tmp_path / "out" / "runs").exists()


def test_missing_matplotlib_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    args = argparse.Namespace(quick=True, out=str(tmp_path / "out"), json_path=None, seeds=1)
    assert run_learning_bench(Config.of(device="cpu"), args) == 2
    assert "pip install 'avatarl[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_seeds_below_one_are_refused_before_training(tmp_path, capsys):
    args = argparse.Namespace(quick=True, out=str(tmp_path / "out"), json_path=None, seeds=0)
    assert run_learning_bench(Config.of(device="cpu"), args) == 2
    assert "--seeds 0" in capsys.readouterr().err and not (tmp_path / "out").exists()


def one_seed(report: dict, seed: int) -> dict:
    """The report a run of `report`'s benchmark for `seed` alone writes."""
    return {**report, "seeds": [seed], "referee": {str(seed): report["referee"][str(seed)]},
            "settings": {**report["settings"], "SEED": seed},
            "methods": {name: {**entry, "runs": [run for run in entry["runs"] if run["seed"] == seed],
                               "summary": summarize([run for run in entry["runs"] if run["seed"] == seed])}
                        for name, entry in report["methods"].items()}}


@pytest.mark.slow  # it merges the two seeds of the `bench` fixture, which trains every method
def test_runs_of_other_seeds_merge_into_the_report_of_all_seeds(bench, tmp_path, capsys):
    report = json.loads(json.dumps(bench[2]))  # as a learning.json holds it
    first, second = (one_seed(report, seed) for seed in report["seeds"])
    elsewhere = {**second, "settings": {**second["settings"], "DATA_PATH": "/mnt/other/copy.txt"}}
    merged = merge_reports([elsewhere, first], ["b", "a"])  # another machine's path; parts in any order
    assert merged["seeds"] == report["seeds"] and merged["referee"] == report["referee"]
    assert [part["seeds"] for part in merged["merged_from"]] == [[report["seeds"][1]], [report["seeds"][0]]]
    assert {name: entry["summary"] for name, entry in merged["methods"].items()} == \
        {name: entry["summary"] for name, entry in report["methods"].items()}
    assert merged["methods"]["avatarl"]["summary"]["final_val_ce"]["n"] == SEEDS

    with pytest.raises(ValueError, match="a seed comes twice"):
        merge_reports([first, first], ["a", "a"])
    other_budget = {**second, "budget_tokens": 1, "settings": {**second["settings"], "LR": 1.0}}
    with pytest.raises(ValueError, match="b: budget_tokens is not a's; b: settings LR are not a's"):
        merge_reports([first, other_budget], ["a", "b"])

    paths = []
    for name, part in (("a", first), ("b", second)):
        paths.append(tmp_path / name / "learning.json")
        paths[-1].parent.mkdir()
        paths[-1].write_text(json.dumps(part))
    args = argparse.Namespace(quick=True, out=str(tmp_path / "merged"), json_path=None, seeds=1,
                              merge=[str(path) for path in paths])
    assert run_learning_bench(Config.of(device="cpu"), args) == 0
    written = json.loads((tmp_path / "merged" / "learning.json").read_text())
    assert written["seeds"] == report["seeds"] and (tmp_path / "merged" / "learning.png").is_file()
    assert f"Seeds {report['seeds'][0]}, {report['seeds'][1]}; mean" in capsys.readouterr().out

    paths[1].write_text("{not json")
    args.out = str(tmp_path / "x")
    assert run_learning_bench(Config.of(device="cpu"), args) == 2
    assert capsys.readouterr().err.startswith(f"error: --merge {paths[1]}: cannot read it as JSON")
    assert not (tmp_path / "x").exists()


def test_a_schema_2_report_of_an_earlier_version_reads_as_schema_3(tmp_path, capsys):
    """docs/learning_quick.json was written when token counts were named for characters: --merge reads it."""
    old = json.loads((REPO / "docs" / "learning_quick.json").read_text())
    assert old["schema"] == "avatarl.bench.learning/2"
    new = upgrade_report(old)
    assert new["schema"] == SCHEMA and new["budget_tokens"] == old["budget_chars"]
    assert "budget_chars" not in new
    text = json.dumps(new)
    assert '"chars_' not in text and '"budget_chars"' not in text
    run, old_run = new["methods"]["grpo"]["runs"][0], old["methods"]["grpo"]["runs"][0]
    assert run["tokens_seen"] == old_run["chars_seen"] and run["curve"] == old_run["curve"]
    assert upgrade_report(new) is new
    assert "| Method | Characters seen |" in markdown_table(new)
    args = argparse.Namespace(quick=False, out=str(tmp_path / "merged"), json_path=None, seeds=1,
                              merge=[str(REPO / "docs" / "learning_quick.json")])
    assert run_learning_bench(Config.of(device="cpu"), args) == 0
    assert json.loads((tmp_path / "merged" / "learning.json").read_text())["schema"] == SCHEMA
    row = f"| {old['methods']['supervised']['label']} | {old_run['chars_seen']:,} |"
    assert row in capsys.readouterr().out


def test_a_row_of_your_own_settings_is_a_typed_student_row():
    rows = chosen_methods(["supervised"], [["k64", "K_SAMPLES=64", "rollouts=teacher_forced"],
                                           ["lr_off", "EXACT_MATCH_REWARD=0"]])
    assert [m.name for m in rows] == ["supervised", "k64", "lr_off"]
    mine = rows[1]
    assert mine.role == "student" and mine.label == "k64 (K_SAMPLES=64 rollouts=teacher_forced)"
    assert dict(mine.overrides) == {"k_samples": 64, "rollouts": "teacher_forced"}
    assert isinstance(dict(mine.overrides)["k_samples"], int)
    # a preset's words stand for its settings; what comes after them wins
    half = chosen_methods(None, [["k_half", "grpo-log-reward", "K_FRACTION=0.5"]])[0]
    assert dict(half.overrides) == {**preset_values("grpo-log-reward"), "k_fraction": 0.5}
    assert dict(chosen_methods(["grpo_ar_credit"], None)[0].overrides) == \
        dict(chosen_methods(None, [["mine", "grpo-autoregressive"]])[0].overrides)
    # a shipped row's words stand for its method: supervised keeps its role
    fast = chosen_methods(None, [["sup_fast", "supervised", "LR=6e-3"],
                                 ["lr_fast", "grpo_log_reward", "LR=6e-3"]])
    assert [(m.role, dict(m.overrides)) for m in fast] == [
        ("referee", {"lr": 6e-3}), ("student", {**preset_values("grpo-log-reward"), "lr": 6e-3})]
    # a row at twice the command's LR keeps it when a --row builds on it, unless LR is given
    base = Config.of(lr=3e-3, min_lr=3e-4)
    half, given = chosen_methods(["grpo_log_reward_half"], [["given", "grpo_log_reward_half", "LR=1e-3"]])
    twice = half.settings(base)
    assert twice["lr"] == pytest.approx(6e-3) and twice["min_lr"] == pytest.approx(6e-4)
    assert twice["k_fraction"] == 0.5
    assert given.settings(base) == {**dict(given.overrides), "lr": 1e-3}  # neither LR nor MIN_LR scaled
    assert "min_lr" not in given.settings(base)
    after = chosen_methods(None, [["after", "LR=1e-3", "grpo_log_reward_half"]])[0]
    assert after.settings(base)["lr"] == pytest.approx(6e-3)  # the later word wins
    # a whole-run preset's budget, corpus and windows give way to the benchmark's
    quick = dict(chosen_methods(None, [["quick", "bench-quick"]])[0].overrides)
    assert "total_iters" not in quick and "eval_windows" not in quick and quick["n_layer"] == 2
    assert "context_len" not in dict(chosen_methods(None, [["tiny", "tiny"]])[0].overrides)
    # without --methods only the rows of your own train; with neither, every shipped row
    assert [m.name for m in chosen_methods(None, [["k64", "K_SAMPLES=64"]])] == ["k64"]
    assert chosen_methods(None, None) == methods()


@pytest.mark.parametrize(("spec", "says"), [
    (["K_SAMPLES=64"], "a row needs a name first"),
    (["grpo", "K_SAMPLES=64"], "--row grpo: that name is already a row"),
    (["mine", "K_SAMPLE=64"], "K_SAMPLE is no setting; did you mean K_SAMPLES?"),
    (["mine", "K_SAMPLES"], "'K_SAMPLES' is none of SETTING=VALUE, a row of the table (supervised, grpo,"),
    (["mine", "K_SAMPLES=many"], "K_SAMPLES=many: expected an integer"),
    (["mine", "ROLLOUTS=sideways"], "ROLLOUTS=sideways: choose one of autoregressive, teacher_forced"),
    (["mine", "TOTAL_ITERS=10"], "TOTAL_ITERS is set by the benchmark for every row"),
    (["mine", "EVAL_WINDOWS=64"], "EVAL_WINDOWS is set by the benchmark for every row"),
    (["referee", "supervised"], "--row referee: that name is already a row (or the referee's)"),
])
def test_a_row_that_cannot_be_read_says_what_to_fix(spec, says):
    with pytest.raises(ConfigError) as refused:
        chosen_methods(None, [spec])
    assert len(refused.value.problems) == 1 and says in refused.value.problems[0], refused.value.problems


def test_a_row_needs_the_referee_when_it_trains_avatarl_by_its_own_settings_or_the_commands():
    from avatarl.bench.learning import referee_needed

    rows = chosen_methods(None, [["half", "REALITY_WEIGHT=0.5"]])
    assert not referee_needed(Config.of(), rows)
    assert referee_needed(Config.of(algorithm="avatarl"), rows)
    assert not referee_needed(Config.of(algorithm="avatarl"), chosen_methods(["supervised"]))


def test_two_rows_of_one_name_are_refused():
    with pytest.raises(ConfigError, match="mine: that name is already a row"):
        chosen_methods(None, [["mine", "K_SAMPLES=8"], ["mine", "K_SAMPLES=16"]])


def test_a_row_of_your_own_trains_at_the_budget_of_the_others(tmp_path, corpus_path):
    data = tmp_path / "shakespeare-100k.txt"
    data.write_text(corpus_path.read_text()[:100_000])
    base = Config.of(**TINY_BENCH, data_path=str(data))
    rows = chosen_methods(["supervised"], [["tf8", "ROLLOUTS=teacher_forced", "K_SAMPLES=8"],
                                           ["tf8_b8", "ROLLOUTS=teacher_forced", "K_SAMPLES=8", "BATCH=8",
                                            "MICRO_BATCH=8"]])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("avatarl.periodic.training_samples", lambda *args: [Sample("A", [1, 2, 3], "bcd")])
        patch.chdir(tmp_path)
        code, report = learning_bench(base, tmp_path / "out", BUDGET_ITERS, REFEREE_ITERS, eval_points=2,
                                      rows=rows)
    assert code == 0 and list(report["methods"]) == ["supervised", "tf8", "tf8_b8"]
    mine = report["methods"]["tf8"]
    assert mine["settings"] == {"ROLLOUTS": "teacher_forced", "K_SAMPLES": 8}
    # a teacher-forced step reads what a supervised one does: the same steps, the same tokens seen
    assert mine["runs"][0]["iters"] == BUDGET_ITERS
    assert mine["runs"][0]["tokens_seen"] == report["methods"]["supervised"]["runs"][0]["tokens_seen"]
    # a row's own batch: twice the steps of half the contexts, the same tokens
    small = report["methods"]["tf8_b8"]["runs"][0]
    assert small["iters"] == 2 * BUDGET_ITERS and small["tokens_seen"] == mine["runs"][0]["tokens_seen"]
    logged = [json.loads(line) for line in (tmp_path / "out" / "runs" / "seed1337" / "tf8" / "metrics.jsonl")
              .read_text().splitlines()]
    assert any("val_acc" in record for record in logged)
