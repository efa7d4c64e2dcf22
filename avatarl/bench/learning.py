"""`avatarl bench learning`: which method actually learns, at the same budget of characters seen.

Every method trains the same student architecture from the same seed through the real trainer
(`trainer.train`), for as many optimizer steps as make its characters seen equal the budget
(a supervised or AvataRL step reads BATCH x (CONTEXT_LEN + 1) corpus chars, a GRPO step
BATCH x (CONTEXT_LEN + HORIZON)):

    supervised            next-char cross-entropy on the student architecture: not RL, the ceiling
    grpo                  the seed's GRPO (exact match + n-gram partial credit, KL to the n-gram)
    grpo_reward_off       the same GRPO with every reward set to zero: only the entropy bonus and the
                          KL to the n-gram reference remain, which can distil the n-gram and look
                          like learning; GRPO must beat it to have learnt anything from its reward
    avatarl               AvataRL against a referee trained in the same command (budget reported apart)
    avatarl_referee_only  AvataRL with REALITY_WEIGHT=0: the ground truth is taken out of the reward

Reference lines, computed from the corpus: uniform = ln V; unigram and bigram = the cross-entropy
on the validation split of add-one-smoothed counts from the training split; also GRPO's own KL
anchor (the NGRAM_ORDER n-gram) and the referee's validation CE.

`--quick` swaps in the `bench-quick` preset (avatarl/presets/bench-quick.env: a 2-layer, 64-wide model,
its learning rate and a budget that fits a few minutes on 2 CPU cores); otherwise the model, batch, LR,
TOTAL_ITERS (the supervised step count that sets the budget) and REFEREE_ITERS come from the settings.
Every other setting (GRPO and AvataRL knobs) is the user's, the same for every method. Outputs:
OUT/learning.json, OUT/learning.png, and each run under OUT/runs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from avatarl import exit_codes
from avatarl.algorithms.reference import NgramReference
from avatarl.config import Config, ConfigError
from avatarl.config_sources import preset_values
from avatarl.data.corpus import load_corpus
from avatarl.objectives import window_len
from avatarl.referee import export_referee
from avatarl.run_dir import METRICS, run_dir
from avatarl.tracking import read_metrics
from avatarl.trainer import train

SCHEMA = "avatarl.bench.learning/1"
SMOOTHING = 1.0  # add-one: every char of the vocabulary keeps a count, so no validation char costs infinity

QUICK_PRESET = "bench-quick"  # avatarl/presets/bench-quick.env: model, LR and budget of --quick
EVAL_POINTS = 12
SETTINGS_RECORDED = frozenset({
    "seed", "data_path", "device", "context_len", "horizon", "k_samples", "batch", "micro_batch", "lr", "min_lr",
    "warmup_iters", "eval_windows", "temperature", "entropy_coef", "beta_kl", "kl_warm", "adaptive_kl", "kl_target",
    "kl_max_coef", "reference", "ngram_order", "old_policy_interval", "partial_credit", "top_k",
    "label_smoothing", "reality_weight", "mentor_weight", "reward_scale", "max_reward_clamp", "exact_match_reward"})


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str
    role: str                                  # "referee" role = trained with cross-entropy
    overrides: tuple[tuple[str, Any], ...] = ()


METHODS = (
    Method("supervised", "supervised (not RL, the ceiling)", "referee"),
    Method("grpo", "GRPO", "student", (("algorithm", "grpo"),)),
    Method("grpo_reward_off", "GRPO, reward switched off (KL + entropy only)", "student",
           (("algorithm", "grpo"), ("partial_credit", 0.0), ("exact_match_reward", 0.0))),
    Method("avatarl", "AvataRL", "student", (("algorithm", "avatarl"),)),
    Method("avatarl_referee_only", "AvataRL, REALITY_WEIGHT=0 (referee only)", "student",
           (("algorithm", "avatarl"), ("reality_weight", 0.0))),
)


def corpus_baselines(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int,
                     alpha: float = SMOOTHING) -> dict[str, float]:
    """Cross-entropies (nats/char) on the validation split of count models of the training split.

    uniform = ln V
    unigram = -mean_{c in val} ln p(c),              p(c)     = (N(c) + alpha) / (N + alpha V)
    bigram  = -mean_{(a,b) in val pairs} ln p(b|a),  p(b | a) = (N(ab) + alpha) / (N(a.) + alpha V)
    N counts the training split; N(a.) counts training bigrams that start with a; the val pairs
    are the len(val) - 1 consecutive pairs of the validation split.
    """
    V = vocab_size
    train_ids, val_ids = train_ids.detach().cpu().long(), val_ids.detach().cpu().long()
    unigram = torch.bincount(train_ids, minlength=V).double()
    p1 = (unigram + alpha) / (unigram.sum() + alpha * V)
    pairs = torch.bincount(train_ids[:-1] * V + train_ids[1:], minlength=V * V).double().view(V, V)
    p2 = (pairs + alpha) / (pairs.sum(1, keepdim=True) + alpha * V)
    return {"uniform": math.log(V),
            "unigram": float(-p1.log()[val_ids].mean()),
            "bigram": float(-p2.log()[val_ids[:-1], val_ids[1:]].mean())}


def reference_ce(cfg: Config, train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int) -> float:
    """Validation CE of GRPO's KL anchor (the NGRAM_ORDER n-gram): what the KL term alone can distil."""
    reference = NgramReference(cfg.ngram_order, vocab_size, train_ids, "cpu")
    val_ids = val_ids.detach().cpu().long()
    logp = reference.log_probs(val_ids[:-1])
    return float(-logp.gather(-1, val_ids[1:, None]).mean())


def chars_to_beat(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """chars_seen of the first measurement with val CE strictly below `threshold`, else None."""
    return next((chars for chars, ce in curve if ce < threshold), None)


def curve_of(records: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], float | None, float | None]:
    """(validation curve [(chars_seen, val_ce)], last val_bpb, last logged policy entropy) of a run's metrics;
    None for what it never logged."""
    curve = [(int(r["chars_seen"]), float(r["val_ce"])) for r in records if "val_ce" in r]
    bpb = [r["val_bpb"] for r in records if "val_bpb" in r]
    entropies = [r["entropy"] for r in records if "entropy" in r]
    return curve, bpb[-1] if bpb else None, entropies[-1] if entropies else None


def method_config(base: Config, method: Method, directory: Path, iters: int, warmup: int, eval_points: int,
                  referee_path: Path) -> Config:
    settings: dict[str, Any] = dict(method.overrides)
    if method.role == "referee":  # the supervised baseline has the student's shape, not the referee's
        settings.update(referee_n_layer=base.n_layer, referee_n_head=base.n_head, referee_n_emb=base.n_emb)
    return dataclasses.replace(base, **settings, checkpoint_dir=str(directory), referee_path=str(referee_path),
                               total_iters=iters, warmup_iters=warmup,
                               eval_interval=max(1, iters // eval_points))


def run_method(cfg: Config, method: Method) -> tuple[int, dict[str, Any]]:
    """Train one method; exit code FAILED when a stop signal ended it before its last step."""
    print(f"[bench] {method.label}: {cfg.total_iters} steps of {cfg.batch} contexts", flush=True)
    started = time.perf_counter()
    code = train(cfg, role=method.role)
    wall = time.perf_counter() - started
    curve, bpb, entropy = curve_of(read_metrics(run_dir(cfg.checkpoint_dir, method.role) / METRICS))
    planned = cfg.total_iters * cfg.batch * window_len(cfg, method.role)
    if code == exit_codes.OK and (not curve or curve[-1][0] != planned):
        print(f"error: {method.label} stopped before its last step: the benchmark stops too.", file=sys.stderr)
        code = exit_codes.FAILED
    return code, {"label": method.label, "exit_code": code, "iters": cfg.total_iters,
                  "chars_seen": curve[-1][0] if curve else 0, "curve": curve,
                  "final_val_ce": curve[-1][1] if curve else None, "final_val_bpb": bpb, "final_entropy": entropy,
                  "wall_s": round(wall, 2), "settings": {k.upper(): v for k, v in method.overrides}}


def train_referee(base: Config, out: Path, iters: int, eval_points: int
                  ) -> tuple[int, dict[str, Any], Path | None]:
    """The AvataRL referee (REFEREE_N_* shape), trained and exported exactly as `avatarl train-referee`."""
    cfg = dataclasses.replace(base, checkpoint_dir=str(out / "runs" / "referee"), referee_path="", total_iters=iters,
                              eval_interval=max(1, iters // eval_points), save_final_checkpoint=True)
    code, result = run_method(cfg, Method("referee", "referee for AvataRL (supervised)", "referee"))
    path = export_referee(cfg) if code == exit_codes.OK else None
    result["shape"] = {"n_layer": cfg.referee_n_layer or cfg.n_layer, "n_head": cfg.referee_n_head or cfg.n_head,
                       "n_emb": cfg.referee_n_emb or cfg.n_emb}
    return code, result, path


def learning_bench(base: Config, out: Path, budget_iters: int, referee_iters: int,
                   eval_points: int = EVAL_POINTS) -> tuple[int, dict[str, Any]]:
    """Train every method at the budget of `budget_iters` supervised steps; returns (exit code, report).

    Stops at the first configuration error (exit 2) or stop signal (exit 1). A method that ends
    otherwise badly (exit 3, non-finite steps) is reported with its exit code and partial curve, and
    the others still run.
    """
    out.mkdir(parents=True, exist_ok=True)
    base = dataclasses.replace(base, use_wandb=False, resume="never", overwrite=True,
                               save_intermediate_checkpoints=False, sample_interval=0)
    corpus = load_corpus(base, torch.device("cpu"))
    if not isinstance(corpus.train, torch.Tensor):
        raise ConfigError([f"DATA_PATH={base.data_path!r}: the learning benchmark counts its n-gram baselines on a "
                           "text corpus held in memory; give it a text file (TOKENIZER may be a BPE)."])
    baselines = corpus_baselines(corpus.train, corpus.val, corpus.tokenizer.size)
    budget = budget_iters * base.batch * (base.context_len + 1)
    kl_reference = {"order": base.ngram_order,
                    "val_ce": reference_ce(base, corpus.train, corpus.val, corpus.tokenizer.size)}
    report: dict[str, Any] = {
        "schema": SCHEMA, "budget_chars": budget, "vocab_size": corpus.tokenizer.size, "baselines": baselines,
        "kl_reference": kl_reference, "model": {"n_layer": base.n_layer, "n_head": base.n_head, "n_emb": base.n_emb},
        "settings": {k.upper(): v for k, v in base.to_dict().items() if k in SETTINGS_RECORDED},
        "torch_threads": torch.get_num_threads(), "methods": {}}
    started = time.perf_counter()
    code, report["referee"], referee_path = train_referee(base, out, referee_iters, eval_points)
    if code != exit_codes.OK or referee_path is None:
        return code, report
    for method in METHODS:
        window = window_len(dataclasses.replace(base, **dict(method.overrides)), method.role)
        iters = max(1, round(budget / (base.batch * window)))
        warmup = round(base.warmup_iters * iters / budget_iters)
        cfg = method_config(base, method, out / "runs" / method.name, iters, warmup, eval_points, referee_path)
        code, result = run_method(cfg, method)
        if code in (exit_codes.CONFIG, exit_codes.FAILED):
            return code, report
        result["chars_to_beat_unigram"] = chars_to_beat(result["curve"], baselines["unigram"])
        result["chars_to_beat_bigram"] = chars_to_beat(result["curve"], baselines["bigram"])
        report["methods"][method.name] = result
    report["wall_s"] = round(time.perf_counter() - started, 1)
    done = report["methods"]
    if done.get("avatarl", {}).get("final_val_ce") is not None:
        report["gap_avatarl_minus_supervised"] = done["avatarl"]["final_val_ce"] - done["supervised"]["final_val_ce"]
    return exit_codes.OK, report


def require_pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("`avatarl bench learning` draws learning.png with matplotlib, which is not installed: "
                          "pip install 'avatarl[plot]' (or pip install matplotlib).") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning(report: dict[str, Any], path: Path) -> None:
    """Validation CE vs chars seen per method, with the uniform, unigram, bigram and referee lines."""
    plt = require_pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    lowest = min(report["baselines"].values())
    for name, result in report["methods"].items():
        if result.get("curve"):
            chars, ce = zip(*result["curve"], strict=True)
            # The ceiling is drawn wide, black and underneath, so a method that matches it stays visible.
            style = {"color": "black", "linestyle": "--", "linewidth": 3, "alpha": 0.5, "zorder": 1} \
                if name == "supervised" else {"marker": "o", "markersize": 3, "zorder": 2}
            ax.plot(chars, ce, label=f"{result['label']} ({result['final_val_ce']:.3f})", **style)
            lowest = min(lowest, *ce)
    kl = report["kl_reference"]
    referee = report["referee"]
    for value, text, color in ((referee["final_val_ce"], f"AvataRL referee ({referee['chars_seen']:,} chars, apart)",
                                "tab:purple"),
                               (kl["val_ce"], f"GRPO's KL reference ({kl['order']}-gram)", "tab:brown")):
        ax.axhline(value, color=color, linestyle=":", linewidth=1)
        ax.annotate(f"{text} {value:.3f}", (1, value), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                    textcoords="offset points", ha="right", fontsize=8, color=color)
    for (name, value), style in zip(report["baselines"].items(), (":", "--", "-."), strict=True):
        ax.axhline(value, color="grey", linestyle=style, linewidth=1)
        ax.annotate(f"{name} {value:.3f}", (0, value), xytext=(2, 2), textcoords="offset points",
                    fontsize=8, color="grey")
    ax.set_ylim(lowest - 0.1, report["baselines"]["uniform"] + 0.4)
    ax.set_xlabel("characters seen")
    ax.set_ylabel("validation cross-entropy (nats/char)")
    ax.set_title(f"Learning at equal characters seen ({report['model']['n_layer']} layers, "
                 f"{report['model']['n_emb']} wide)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_chars(value: int | None) -> str:
    return "never" if value is None else f"{value:,}"


def markdown_table(report: dict[str, Any]) -> str:
    """The README table: per method, val CE at the common budget and chars needed to beat the n-grams."""
    b = report["baselines"]
    kl = report["kl_reference"]
    rows = [f"Reference lines: uniform {b['uniform']:.3f}, unigram {b['unigram']:.3f}, bigram {b['bigram']:.3f} "
            f"nats/char; GRPO's KL reference ({kl['order']}-gram) {kl['val_ce']:.3f}.", "",
            "| Method | Chars seen | Val CE (nats/char) | Val bits/byte | Chars to beat unigram | "
            "Chars to beat bigram |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for result in report["methods"].values():
        ce = "n/a" if result["final_val_ce"] is None else f"{result['final_val_ce']:.3f}"
        bpb = "n/a" if result.get("final_val_bpb") is None else f"{result['final_val_bpb']:.3f}"
        beat = [format_chars(result[f"chars_to_beat_{name}"]) for name in ("unigram", "bigram")]
        rows.append(f"| {result['label']} | {result['chars_seen']:,} | {ce} | {bpb} | {beat[0]} | {beat[1]} |")
    ref = report["referee"]
    rows += ["", f"Referee (supervised, trained apart for AvataRL): {ref['iters']} steps, {ref['chars_seen']:,} chars, "
             f"val CE {ref['final_val_ce']:.3f}."]
    if "gap_avatarl_minus_supervised" in report:
        gap = report["gap_avatarl_minus_supervised"]
        rows.append(f"Gap AvataRL - supervised at equal chars: {gap:+.3f} nats/char.")
    return "\n".join(rows) + "\n"


def run_learning_bench(cfg: Config, args: argparse.Namespace) -> int:
    """Run the benchmark; write OUT/learning.json, OUT/learning.png (and args.json_path); print the table."""
    try:
        require_pyplot()
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_codes.CONFIG
    if args.quick:
        cfg = dataclasses.replace(cfg, **preset_values(QUICK_PRESET))
    out = Path(args.out).expanduser()
    code, report = learning_bench(cfg, out, cfg.total_iters, cfg.referee_iters)
    if code != exit_codes.OK:
        return code
    report["argv"] = sys.argv[1:]
    write_outputs(report, out, Path(args.json_path).expanduser() if args.json_path else None)
    print(markdown_table(report), end="", flush=True)
    print(f"[bench] wrote {out / 'learning.json'} and {out / 'learning.png'}", flush=True)
    return exit_codes.OK


def write_outputs(report: dict[str, Any], out: Path, json_path: Path | None = None) -> None:
    """OUT/learning.json, OUT/learning.png, and a copy of the JSON at json_path when given."""
    text = json.dumps(report, indent=2) + "\n"
    for path in (out / "learning.json", json_path):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    plot_learning(report, out / "learning.png")
