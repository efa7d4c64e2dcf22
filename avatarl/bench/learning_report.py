"""What `avatarl bench learning` writes: the per-method summary over seeds, the markdown table, the plot
(validation CE and accuracy against tokens seen, with the count-model lines) and the JSON, whose schema
(SCHEMA) older reports are upgraded to when read (`upgrade_report`, for `--merge`).

Counts of tokens are named tokens_* whatever the tokenizer (budget_tokens, tokens_seen, tokens_to_beat_*);
the table and plot say "characters seen" when the token unit is char and "tokens seen" otherwise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from avatarl import plotting

SCHEMA = "avatarl.bench.learning/3"
# Schema 2 named the token counts for characters (budget_chars, chars_seen, chars_to_beat_*); 3 renames them.
SCHEMA_2 = "avatarl.bench.learning/2"
SUMMARIZED = ("final_val_acc", "final_val_ce", "final_val_bpb", "final_val_ce_second_half",
              "final_val_ce_calibrated", "min_entropy")
BASELINE_STYLES = {"uniform": ":", "unigram": "--", "bigram": "-.", "trigram": (0, (3, 1, 1, 1)),
                   "4-gram": (0, (1, 1))}


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "min", "max", "n"}} over the runs (seeds) that logged it."""
    summary = {}
    for key in SUMMARIZED:
        values = [run[key] for run in runs if run.get(key) is not None]
        if values:
            summary[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                            "n": len(values)}
    return summary


def spread(summary: dict[str, dict[str, float]], key: str, digits: int = 3) -> str:
    """"mean (min-max)" over seeds, or the one value, or n/a."""
    if key not in summary:
        return "n/a"
    stat = summary[key]
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"


def unit_name(report: dict[str, Any]) -> str:
    """What the report's tokens are, spelled out: "character" (TOKENIZER=char) or "token"."""
    return "character" if report.get("token_unit", "char") == "char" else "token"


def upgrade_report(report: dict[str, Any]) -> dict[str, Any]:
    """A report of schema 2 as schema 3 writes it (its counts renamed); a schema-3 report as it is."""
    if report.get("schema") != SCHEMA_2:
        return report

    def renamed(entry: dict[str, Any]) -> dict[str, Any]:
        return {key.replace("chars_", "tokens_", 1) if key.startswith("chars_") else key: value
                for key, value in entry.items()}

    upgraded = {("budget_tokens" if key == "budget_chars" else key): value for key, value in report.items()}
    upgraded["schema"] = SCHEMA
    upgraded["referee"] = {seed: renamed(run) for seed, run in report["referee"].items()}
    upgraded["methods"] = {name: {**entry, "runs": [renamed(run) for run in entry["runs"]]}
                           for name, entry in report["methods"].items()}
    return upgraded


def markdown_table(report: dict[str, Any]) -> str:
    """The README table: per method, accuracy and the three losses at the common budget, over seeds."""
    unit = report.get("token_unit", "char")
    lines = ", ".join(f"{'uniform (chance)' if name == 'uniform' else name} {b['acc']:.3f} / {b['ce']:.3f}"
                      for name, b in report["baselines"].items())
    rows = [f"Count models on the same validation windows (accuracy / CE nats/{unit}): {lines}.", "",
            f"Seeds {', '.join(map(str, report['seeds']))}; mean (min-max) over seeds.", "",
            f"CE (nats/{unit}) and bits per byte on all windows; the calibrated CE is on the second half of "
            "the windows at the temperature fitted on the first half, next to that half's CE at temperature "
            "1.", "",
            f"| Method | {unit_name(report).capitalize()}s seen | Val accuracy | Val CE | Val bits/byte | "
            "CE, 2nd half | Calibrated CE, 2nd half | Lowest entropy |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for entry in report["methods"].values():
        summary, runs = entry.get("summary", {}), entry["runs"]
        seen = f"{runs[0]['tokens_seen']:,}" if runs else "n/a"
        cells = [spread(summary, key) for key in ("final_val_acc", "final_val_ce", "final_val_bpb",
                                                  "final_val_ce_second_half", "final_val_ce_calibrated")]
        lowest = spread(summary, "min_entropy", 2)
        rows.append(f"| {entry['label']} | {seen} | {' | '.join(cells)} | {lowest} |")
    referees = list(report["referee"].values())
    if referees:
        ces = ", ".join(f"{r['final_val_ce']:.3f}" for r in referees if r.get("final_val_ce") is not None)
        rows += ["", f"Referee (supervised, trained apart for AvataRL, one per seed): {referees[0]['iters']} "
                 f"steps, {referees[0]['tokens_seen']:,} {unit_name(report)}s, val CE {ces}."]
    return "\n".join(rows) + "\n"


def require_pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or ImportError naming `avatarl bench learning` and the install
    hint."""
    return plotting.require_pyplot("avatarl bench learning")


def mean_curve(runs: list[dict[str, Any]], key: str
               ) -> tuple[list[int], list[float], list[float], list[float]]:
    """(x, mean, min, max) of one curve over seeds, at the measurements every seed made."""
    curves = [dict(run[key]) for run in runs if run.get(key)]
    if not curves:
        return [], [], [], []
    xs = sorted(set.intersection(*(set(c) for c in curves)))
    values = [[c[x] for c in curves] for x in xs]
    return xs, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_learning(report: dict[str, Any], path: Path) -> None:
    """Two panels against tokens seen: validation CE and validation accuracy per method (seed mean, min-max
    band), with the count-model lines in the same units."""
    plt = require_pyplot()
    unit = report.get("token_unit", "char")
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), dpi=110)
    for ax, key, metric, ylabel in ((axes[0], "curve", "ce", f"validation cross-entropy (nats/{unit})"),
                                    (axes[1], "acc_curve", "acc", "validation next-token accuracy")):
        for name, entry in report["methods"].items():
            xs, mean, low, high = mean_curve(entry["runs"], key)
            if not xs:
                continue
            # The ceiling is drawn wide, black and underneath, so a method that matches it stays visible.
            style = {"color": "black", "linestyle": "--", "linewidth": 3, "alpha": 0.5, "zorder": 1} \
                if name == "supervised" else {"marker": "o", "markersize": 3, "zorder": 2}
            line, = ax.plot(xs, mean, label=f"{entry['label']} ({mean[-1]:.3f})", **style)
            if len(entry["runs"]) > 1:
                ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15, zorder=0)
        for name, baseline in report["baselines"].items():
            ax.axhline(baseline[metric], color="grey", linestyle=BASELINE_STYLES.get(name, ":"), linewidth=1)
            ax.annotate(f"{name} {baseline[metric]:.3f}", (0, baseline[metric]), xytext=(2, 2),
                        textcoords="offset points", fontsize=8, color="grey")
        ax.set_xlabel(f"{unit_name(report)}s seen")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    uniform = report["baselines"]["uniform"]["ce"]
    lowest = min(b["ce"] for b in report["baselines"].values())
    axes[0].set_ylim(lowest - 0.3, uniform + 0.6)
    model = report["model"]
    fig.suptitle(f"Learning at equal {unit_name(report)}s seen ({model['n_layer']} layers, "
                 f"{model['n_emb']} wide, "
                 f"seeds {', '.join(map(str, report['seeds']))})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# What must agree for runs of other seeds to be one benchmark (`settings` are checked apart).
SAME_BENCHMARK = ("schema", "budget_tokens", "token_unit", "vocab_size", "baselines", "kl_reference", "model")
# Settings that may differ: the seed, and where the corpus and tokenizer lie and what runs them on each
# machine (the same corpus and tokenizer give the same vocab_size and baselines, which are compared).
PER_MACHINE = frozenset({"SEED", "DATA_PATH", "TOKENIZER", "DEVICE"})


def merge_reports(reports: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """One report from runs of the same benchmark for other seeds (on other machines, or one after
    another): their settings but PER_MACHINE, budget, baselines and methods must agree, and no seed
    may come twice. ValueError says what differs, naming the report by `names`. The seeds are sorted;
    each part's command, seeds, wall time and torch threads are kept in `merged_from`."""
    first, problems = reports[0], []
    for report, name in zip(reports[1:], names[1:], strict=True):
        problems += [f"{name}: {key} is not {names[0]}'s" for key in SAME_BENCHMARK
                     if report.get(key) != first.get(key)]
        settings = {k for k in {*report["settings"], *first["settings"]} if k not in PER_MACHINE
                    and report["settings"].get(k) != first["settings"].get(k)}
        if settings:
            problems.append(f"{name}: settings {', '.join(sorted(settings))} are not {names[0]}'s")
        if [(k, m["settings"]) for k, m in report["methods"].items()] != \
                [(k, m["settings"]) for k, m in first["methods"].items()]:
            problems.append(f"{name}: its methods are not {names[0]}'s")
    seeds = [seed for report in reports for seed in report["seeds"]]
    if len(set(seeds)) < len(seeds):
        problems.append(f"a seed comes twice among {', '.join(map(str, seeds))}: merge runs of other seeds")
    if problems:
        raise ValueError("; ".join(problems))
    parts = [{"argv": r.get("argv"), "seeds": r["seeds"], "wall_s": r.get("wall_s"),
              "torch_threads": r.get("torch_threads")} for r in reports]
    merged = {key: value for key, value in first.items() if key not in ("argv", "wall_s", "torch_threads")}
    merged.update(seeds=sorted(seeds), merged_from=parts,
                  referee={str(seed): run for seed in sorted(seeds) for r in reports if seed in r["seeds"]
                           for run in [r["referee"].get(str(seed))] if run is not None})
    merged["methods"] = {
        name: {**entry, "runs": sorted((run for r in reports for run in r["methods"][name]["runs"]),
                                       key=lambda run: run["seed"])}
        for name, entry in first["methods"].items()}
    for entry in merged["methods"].values():
        entry["summary"] = summarize(entry["runs"])
    return merged


def write_outputs(report: dict[str, Any], out: Path, json_path: Path | None = None) -> None:
    """OUT/learning.json, OUT/learning.png, and a copy of the JSON at json_path when given."""
    text = json.dumps(report, indent=2) + "\n"
    for path in (out / "learning.json", json_path):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    plot_learning(report, out / "learning.png")
