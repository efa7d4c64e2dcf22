"""`avatarl bench learning`: which method actually learns, at the same budget of tokens seen, over seeds.

Every method trains the same student architecture from the same seed through the real trainer
(`trainer.train`), for as many optimizer steps as make its tokens seen equal the budget (a supervised,
AvataRL or teacher-forced GRPO step reads BATCH x (CONTEXT_LEN + 1) corpus tokens, an autoregressive
GRPO step BATCH x (CONTEXT_LEN + HORIZON)); with `--seeds N` the whole table is repeated for seeds
SEED, SEED + 1, ... and reported as mean and min-max:

    supervised            next-token cross-entropy on the student architecture: not RL, the ceiling
    grpo                  the shipped GRPO (autoregressive rollouts, exact match + n-gram partial credit,
                          KL to the n-gram)
    grpo_reward_off       the same GRPO with every reward set to zero: only the entropy bonus and the
                          KL to the n-gram remain, which can distil the n-gram and look like learning
    grpo_ar_credit        the same rollouts set so the reward teaches (preset grpo-autoregressive: prefix
                          credit, r / group mean - 1, no reference, no KL); grpo_ar_credit_off its reward off
    grpo_tf               GRPO with teacher-forced rollouts and the exact-match reward alone (preset
                          grpo-teacher-forced: no reference, no KL, no partial credit)
    grpo_tf_reward_off    the same with the reward off: only the entropy bonus is left
    grpo_log_reward       teacher-forced GRPO credited by log E[reward] (preset grpo-log-reward: K = V/4
                          distinct draws per position, exact match only); grpo_log_reward_off its reward off
    grpo_log_reward_half  the same with K = V/2 draws and twice the command's LR and MIN_LR (bench-quick on a
                          2,048-id BPE: supervised quality); grpo_log_reward_half_off its reward off
    avatarl               AvataRL against a referee trained in the same command (budget reported apart)
    avatarl_referee_only  AvataRL with REALITY_WEIGHT=0: the ground truth is taken out of the reward
    avatarl_sampled       AvataRL on-policy: V/2 distinct draws from the student per position, each paid
                          its ideal probability, importance-weighted; avatarl_sampled_mean: a group-mean
                          baseline instead

Every run is measured on the same validation windows in cross-entropy, bits per byte, next-token
accuracy (what an exact-match reward pays for) and cross-entropy after one fitted temperature
(avatarl/evaluation.py); count models of the training split (uniform ... 4-gram, avatarl/baselines.py)
are scored on those windows in the same units.

`--quick` is `--preset bench-quick` (a 2-layer, 64-wide model, its learning rate and a budget that fits
minutes on 2 CPU cores), under the usual precedence: a flag, `.env` or the environment still changes
any of it (`--quick --n-layer 3`). The model, batch, LR, TOTAL_ITERS (the supervised step count that
sets the budget) and REFEREE_ITERS come from the settings, as do TOKENIZER and DATA_PATH
(a text file or a directory made by `avatarl prepare`). Outputs: OUT/learning.json, OUT/learning.png
(bench/learning_report.py), and each run under OUT/runs/.
`--row NAME [ROW | PRESET ...] SETTING=VALUE ...` adds a row of your own (bench/rows.py): a shipped row's
method or a student, with those settings, at the same budget and on the same windows.
`--merge A/learning.json B/learning.json` trains nothing: it joins runs of the same benchmark for other
seeds (SEED=1338 --seeds 2 on a second machine beside SEED=1337 --seeds 1) into the one table and plot
of all their seeds; it reads the schema-2 reports of earlier versions too (their counts named chars_*)
and writes schema 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from avatarl import exit_codes
from avatarl.baselines import ORDER_NAMES, corpus_baselines
from avatarl.bench.learning_report import (
    SCHEMA,
    SCHEMA_2,
    markdown_table,
    merge_reports,
    require_pyplot,
    summarize,
    upgrade_report,
    write_outputs,
)
from avatarl.bench.rows import Method, chosen_methods, methods
from avatarl.config import Config, ConfigError
from avatarl.config_schema import Algorithm
from avatarl.data.corpus import Corpus, load_corpus
from avatarl.data.tokenizers import CharTokenizer
from avatarl.errors import NonFiniteSteps, print_error
from avatarl.objectives import window_len
from avatarl.referee import check_referee_quantize, export_referee
from avatarl.run_dir import METRICS, run_dir
from avatarl.tracking import read_metrics
from avatarl.trainer import train

EVAL_POINTS = 12
FINAL_METRICS = ("val_ce", "val_bpb", "val_acc", "val_ce_second_half", "val_ce_calibrated", "val_temperature")
SETTINGS_RECORDED = frozenset({
    "seed", "data_path", "tokenizer", "device", "context_len", "horizon", "k_samples", "batch", "micro_batch",
    "lr", "min_lr", "warmup_iters", "eval_windows", "temperature", "entropy_coef", "beta_kl", "kl_warm",
    "adaptive_kl", "kl_target", "kl_max_coef", "reference", "ngram_order", "old_policy_interval",
    "partial_credit", "top_k", "label_smoothing", "reality_weight", "mentor_weight", "reward_scale",
    "max_reward_clamp", "exact_match_reward", "rollouts"})


def tokens_to_beat(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """tokens_seen of the first measurement with val CE strictly below `threshold`, else None."""
    return next((tokens for tokens, ce in curve if ce < threshold), None)


def run_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Curves (tokens_seen, value) of val_ce and val_acc, the last of every FINAL_METRICS, the last and the
    lowest logged policy entropy; None for what a run never logged."""
    evals = [r for r in records if "val_ce" in r]
    entropies = [r["entropy"] for r in records if "entropy" in r]
    summary: dict[str, Any] = {
        "curve": [(int(r["tokens_seen"]), float(r["val_ce"])) for r in evals],
        "acc_curve": [(int(r["tokens_seen"]), float(r["val_acc"])) for r in evals if "val_acc" in r],
        "final_entropy": entropies[-1] if entropies else None, "min_entropy": min(entropies, default=None)}
    for key in FINAL_METRICS:
        values = [r[key] for r in evals if key in r]
        summary[f"final_{key}"] = values[-1] if values else None
    return summary


def method_config(base: Config, method: Method, directory: Path, iters: int, warmup: int, eval_points: int,
                  referee_path: Path) -> Config:
    settings = method.settings(base)
    if method.role == "referee":  # the supervised baseline has the student's shape, not the referee's
        settings.update(referee_n_layer=base.model.n_layer, referee_n_head=base.model.n_head,
                        referee_n_emb=base.model.n_emb)
    return base.replace(**settings, checkpoint_dir=str(directory), referee_path=str(referee_path),
                        total_iters=iters, warmup_iters=warmup, eval_interval=max(1, iters // eval_points))


def run_method(cfg: Config, method: Method) -> tuple[int, dict[str, Any]]:
    """Train one method; exit code FAILED when a stop signal ended it before its last step, BAD_STEPS (its
    error printed) after MAX_BAD_STEPS non-finite steps; other errors end the benchmark."""
    print(f"[bench] seed {cfg.run.seed} {method.label}: {cfg.optim.total_iters} steps of {cfg.optim.batch} "
          "contexts", flush=True)
    started = time.perf_counter()
    try:
        train(cfg, role=method.role)
        code = exit_codes.OK
    except NonFiniteSteps as err:  # reported with its partial curve; the other methods still run
        print_error(err)
        code = err.exit_code
    wall = time.perf_counter() - started
    summary = run_summary(read_metrics(run_dir(cfg, method.role) / METRICS))
    curve = summary["curve"]
    planned = cfg.optim.total_iters * cfg.optim.batch * window_len(cfg, method.role)
    if code == exit_codes.OK and (not curve or curve[-1][0] != planned):
        print(f"error: {method.label} stopped before its last step: the benchmark stops too.",
              file=sys.stderr)
        code = exit_codes.FAILED
    return code, {"exit_code": code, "seed": cfg.run.seed, "iters": cfg.optim.total_iters,
                  "tokens_seen": curve[-1][0] if curve else 0, **summary, "wall_s": round(wall, 2)}


def train_referee(base: Config, out: Path, iters: int, eval_points: int
                  ) -> tuple[int, dict[str, Any], Path | None]:
    """The AvataRL referee (REFEREE_N_* shape), trained and exported exactly as `avatarl train-referee`."""
    cfg = base.replace(checkpoint_dir=str(out / "runs" / f"seed{base.run.seed}" / "referee"),
                       referee_path="", total_iters=iters, eval_interval=max(1, iters // eval_points),
                       save_final_checkpoint=True)
    code, result = run_method(cfg, Method("referee", "referee for AvataRL (supervised)", "referee"))
    path = export_referee(cfg) if code == exit_codes.OK else None
    shape = cfg.referee
    result["shape"] = {"n_layer": shape.referee_n_layer or cfg.model.n_layer,
                       "n_head": shape.referee_n_head or cfg.model.n_head,
                       "n_emb": shape.referee_n_emb or cfg.model.n_emb}
    return code, result, path


def corpus_lines(base: Config) -> tuple[dict[str, Any], Corpus, str]:
    """(count-model baselines on the validation windows every run is scored on, the corpus, token unit)."""
    corpus = load_corpus(base, torch.device("cpu"))
    baselines = corpus_baselines(corpus, base.model.context_len, base.run.eval_windows)
    unit = "char" if isinstance(corpus.tokenizer, CharTokenizer) else "token"
    return baselines, corpus, unit


def check_methods(base: Config, rows: tuple[Method, ...]) -> None:
    """The cheap checks of every row's settings, so that a row that cannot run stops the benchmark before
    minutes of training the others: their Config validation and the referee's quantisation."""
    problems = []
    for method in rows:
        try:
            cfg = base.replace(**method.settings(base))
        except ConfigError as err:
            problems += [f"{method.label}: {line}" for line in err.problems]
            continue
        if method.role == "student" and cfg.run.algorithm == Algorithm.AVATARL:
            try:
                check_referee_quantize(cfg)
            except ConfigError as err:
                problems += [f"{method.label}: {line}" for line in err.problems]
    if problems:
        raise ConfigError(sorted(set(problems), key=problems.index))


def referee_needed(base: Config, rows: tuple[Method, ...]) -> bool:
    """Whether a row trains AvataRL: by its own settings, or by the command's (ALGORITHM=avatarl in .env)."""
    return any(m.role == "student" and base.replace(**m.settings(base)).run.algorithm == Algorithm.AVATARL
               for m in rows)


def learning_bench(base: Config, out: Path, budget_iters: int, referee_iters: int, seeds: int = 1,
                   eval_points: int = EVAL_POINTS, rows: tuple[Method, ...] | None = None
                   ) -> tuple[int, dict[str, Any]]:
    """Train every method at the budget of `budget_iters` supervised steps, for `seeds` seeds from SEED;
    returns (exit code, report).

    Stops at the first stop signal (exit 1); a configuration error raises (exit 2). A method that ends
    otherwise badly (exit 3, non-finite steps) is reported with its exit code and partial curve, and
    the others still run.
    """
    out.mkdir(parents=True, exist_ok=True)
    base = base.replace(use_wandb=False, resume="never", overwrite=True,
                               save_intermediate_checkpoints=False, sample_interval=0)
    baselines, corpus, unit = corpus_lines(base)
    vocab_size = corpus.tokenizer.size
    budget = budget_iters * base.optim.batch * (base.model.context_len + 1)
    rows = rows or methods()
    check_methods(base, rows)
    needs_referee = referee_needed(base, rows)
    report: dict[str, Any] = {
        "schema": SCHEMA, "budget_tokens": budget, "token_unit": unit, "vocab_size": vocab_size,
        "baselines": baselines, "kl_reference": {"order": base.grpo.ngram_order,
                                                 **baselines.get(ORDER_NAMES[base.grpo.ngram_order], {})},
        "model": {"n_layer": base.model.n_layer, "n_head": base.model.n_head, "n_emb": base.model.n_emb},
        "settings": {k.upper(): v for k, v in base.to_dict().items() if k in SETTINGS_RECORDED},
        "seeds": [base.run.seed + i for i in range(seeds)], "torch_threads": torch.get_num_threads(),
        "referee": {},
        "methods": {m.name: {"label": m.label, "runs": [],
                             "settings": {k.upper(): v for k, v in m.settings(base).items()}}
                    for m in rows}}
    started = time.perf_counter()
    for seed in report["seeds"]:
        seeded = base.replace(seed=seed)
        referee_path = out / "no-referee"  # no row of this table reads it
        if needs_referee:
            code, referee, referee_path = train_referee(seeded, out, referee_iters, eval_points)
            report["referee"][str(seed)] = referee
            if code != exit_codes.OK or referee_path is None:
                return code, report
        for method in rows:
            row = seeded.replace(**method.settings(seeded))
            iters = max(1, round(budget / (row.optim.batch * window_len(row, method.role))))
            warmup = round(base.optim.warmup_iters * iters / budget_iters)
            cfg = method_config(seeded, method, out / "runs" / f"seed{seed}" / method.name, iters, warmup,
                                eval_points, referee_path)
            code, result = run_method(cfg, method)
            if code == exit_codes.FAILED:
                return code, report
            for line in ("unigram", "bigram"):
                result[f"tokens_to_beat_{line}"] = tokens_to_beat(result["curve"], baselines[line]["ce"])
            report["methods"][method.name]["runs"].append(result)
    for entry in report["methods"].values():
        entry["summary"] = summarize(entry["runs"])
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return exit_codes.OK, report


def merge_learning_benches(paths: list[Path], out: Path, json_path: Path | None) -> int:
    """`--merge`: one table, plot and JSON in OUT from the learning.json of runs for other seeds."""
    reports = []
    for path in paths:
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"error: --merge {path}: cannot read it as JSON ({err}).", file=sys.stderr)
            return exit_codes.CONFIG
        if not isinstance(report, dict) or report.get("schema") not in (SCHEMA, SCHEMA_2) or \
                not all(key in report for key in ("seeds", "settings", "methods", "referee")):
            print(f"error: --merge {path}: not a {SCHEMA} (or {SCHEMA_2}) report (the learning.json of "
                  "avatarl bench learning).", file=sys.stderr)
            return exit_codes.CONFIG
        reports.append(upgrade_report(report))
    try:
        merged = merge_reports(reports, [str(path) for path in paths])
    except ValueError as err:
        print(f"error: --merge: {err}.", file=sys.stderr)
        return exit_codes.CONFIG
    write_outputs(merged, out, json_path)
    print(markdown_table(merged), end="", flush=True)
    print(f"[bench] wrote {out / 'learning.json'} and {out / 'learning.png'} (seeds "
          f"{', '.join(map(str, merged['seeds']))})", flush=True)
    return exit_codes.OK


def run_learning_bench(cfg: Config, args: argparse.Namespace) -> int:
    """Run the benchmark; write OUT/learning.json, OUT/learning.png (and args.json_path); print the table."""
    try:
        require_pyplot()
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_codes.CONFIG
    if getattr(args, "merge", None):
        return merge_learning_benches([Path(name).expanduser() for name in args.merge],
                                      Path(args.out).expanduser(),
                                      Path(args.json_path).expanduser() if args.json_path else None)
    seeds = getattr(args, "seeds", 1)
    if seeds < 1:
        print(f"error: --seeds {seeds}: give at least 1.", file=sys.stderr)
        return exit_codes.CONFIG
    out = Path(args.out).expanduser()
    code, report = learning_bench(cfg, out, cfg.optim.total_iters, cfg.referee.referee_iters, seeds,
                                  rows=chosen_methods(getattr(args, "methods", None),
                                                     getattr(args, "rows", None)))
    if code != exit_codes.OK:
        return code
    report["argv"] = sys.argv[1:]
    write_outputs(report, out, Path(args.json_path).expanduser() if args.json_path else None)
    print(markdown_table(report), end="", flush=True)
    print(f"[bench] wrote {out / 'learning.json'} and {out / 'learning.png'}", flush=True)
    return exit_codes.OK
