"""`avatarl report RUN_DIR`: a run's curves from its metrics.jsonl in one PNG next to it, no wandb needed.

One panel per measurement the run logged, against corpus tokens seen: validation CE (with bits per
byte), validation accuracy, calibrated CE, reward, the reward's share on the ground truth, entropy, KL
to the reference, sample degeneracy and throughput. Panels whose metrics the run never logged are left
out. The axes name the unit of the run's tokenizer, read from the config saved in its newest checkpoint:
characters for TOKENIZER=char, tokens otherwise (and without a checkpoint, since a character is a token
of a char-level run). The validation panels carry the count-model lines (unigram ... 4-gram,
avatarl/baselines.py) in their own units when the run is char-level and its text corpus is on this
machine: they are counted again from that config. Other runs (BPE, a corpus elsewhere) get none.
Metrics files written before the counters were named for tokens (chars_seen, chars_per_s) are read too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from avatarl.config import Config, ConfigError, setting_fields
from avatarl.plotting import require_pyplot
from avatarl.run_dir import METRICS
from avatarl.tracking import read_metrics

REPORT = "report.png"
X_KEY = "tokens_seen"
# The names older runs logged these metrics under, before tokens became the unit of every run.
LEGACY_KEYS = {"chars_seen": X_KEY, "chars_per_s": "tokens_per_s"}


@dataclass(frozen=True)
class Panel:
    name: str
    title: str                        # "{unit}" becomes the run's token unit: character or token
    keys: tuple[str, ...]             # drawn on the left axis; the panel exists when any of them was logged
    twin_keys: tuple[str, ...] = ()   # drawn on a right axis of its own units, when logged
    baseline: str = ""                # "acc" or "ce": which count-model figure the panel's lines show


PANELS = (
    Panel("val_ce", "validation cross-entropy (nats/{unit})", ("val_ce",), ("val_bpb",), baseline="ce"),
    Panel("val_acc", "validation accuracy (argmax next token)", ("val_acc",), baseline="acc"),
    Panel("val_ce_calibrated", "validation CE at the fitted temperature", ("val_ce_calibrated",),
          baseline="ce"),
    Panel("reward", "reward", ("reward_mean",)),
    Panel("true_reward", "reward on the ground truth", ("reward_true_share", "true_top_frac", "exact_match")),
    Panel("entropy", "policy entropy (nats)", ("entropy",)),
    Panel("kl", "KL to the reference (nats)", ("kl",), ("kl_coef",)),
    Panel("samples", "sample degeneracy", ("sample_distinct_1", "sample_distinct_2", "sample_distinct_3"),
          ("sample_longest_run",)),
    Panel("throughput", "throughput ({unit}s/s)", ("tokens_per_s",)),
)


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl, or ConfigError in one line when there is nothing to draw."""
    path = run_dir / METRICS
    if not run_dir.is_dir():
        raise ConfigError([f"RUN_DIR={str(run_dir)!r}: no such directory; pass a run's CHECKPOINT_DIR."])
    if not path.is_file():
        raise ConfigError([f"{path}: no such file; RUN_DIR must be a run's CHECKPOINT_DIR, where training "
                           f"writes {METRICS}."])
    try:
        records = read_metrics(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError([f"{path} is not JSON lines ({err}): is it a metrics file written by "
                           "avatarl?"]) from None
    except OSError as err:
        raise ConfigError([f"{path} cannot be read ({err.strerror})."]) from None
    if not all(isinstance(record, dict) for record in records):
        raise ConfigError([f"{path} holds lines that are not JSON objects: is it a metrics file written by "
                           "avatarl?"])
    if not records:
        raise ConfigError([f"{path} is empty: the run has not logged anything yet."])
    return [{LEGACY_KEYS.get(key, key): value for key, value in record.items()} for record in records]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(tokens seen, value) of every record that logged `key` as a number, in logging order."""
    xs, ys = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and X_KEY in record:
            xs.append(record[X_KEY])
            ys.append(value)
    return xs, ys


def panels_present(records: list[dict[str, Any]]) -> list[Panel]:
    return [panel for panel in PANELS if any(series(records, key)[0] for key in panel.keys)]


class SavedConfig(NamedTuple):
    cfg: Config | None  # the settings in the run's newest checkpoint, None when they cannot be read
    source: str         # that checkpoint's file name, or "none, why not" (the count-model lines' reason)


def saved_config(run_dir: Path) -> SavedConfig:
    """The config saved in RUN_DIR's newest valid checkpoint (settings this version no longer has dropped)."""
    from avatarl.checkpoint import CheckpointError, find_resume_checkpoint, load_checkpoint

    checkpoint = find_resume_checkpoint(run_dir, quiet=True)
    if checkpoint is None:
        return SavedConfig(None, "none, no checkpoint holds the run's config")
    try:
        saved = load_checkpoint(checkpoint)["config"]
        known = setting_fields()
        return SavedConfig(Config.of(**{name: value for name, value in saved.items() if name in known}),
                           checkpoint.name)
    except (ConfigError, CheckpointError, OSError, KeyError, TypeError, ValueError) as err:
        return SavedConfig(None, f"none, the run's corpus could not be rebuilt ({problem_text(err)})")


def problem_text(err: Exception) -> str:
    return "; ".join(err.problems) if isinstance(err, ConfigError) else str(err)


def token_unit(cfg: Config | None) -> str:
    """"character" for a char-level run, else "token" (also when the tokenizer is not known)."""
    return "character" if cfg is not None and cfg.data.tokenizer == "char" else "token"


def rebuilt_baselines(saved: SavedConfig) -> tuple[dict[str, dict[str, float]] | None, str]:
    """Count-model figures on the run's own validation windows, rebuilt from its saved config, and where
    they came from; (None, why not) unless that is cheap: a char-level run whose corpus is on this machine
    (a relative DATA_PATH is read from the current directory)."""
    import torch

    from avatarl.baselines import corpus_baselines
    from avatarl.data.corpus import load_corpus, packaged_tiny_shakespeare

    cfg = saved.cfg
    if cfg is None:
        return None, saved.source
    if cfg.data.tokenizer != "char":
        return None, f"none, TOKENIZER={cfg.data.tokenizer} (only a char-level corpus is counted again)"
    if not cfg.data.data_path and packaged_tiny_shakespeare() is None:
        return None, "none, the default corpus would have to be downloaded"
    try:
        corpus = load_corpus(cfg, torch.device("cpu"))
    except (ConfigError, OSError, KeyError, TypeError, ValueError) as err:
        return None, f"none, the run's corpus could not be rebuilt ({problem_text(err)})"
    baselines = corpus_baselines(corpus, cfg.model.context_len, cfg.run.eval_windows)
    return baselines, f"rebuilt from {saved.source}"


def draw_baselines(ax: Any, baselines: dict[str, dict[str, float]], unit: str) -> None:
    for name, figures in baselines.items():
        if unit in figures:
            ax.axhline(figures[unit], color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"{name} {figures[unit]:.3f}", (0, figures[unit]), xycoords=("axes fraction", "data"),
                        xytext=(2, 2), textcoords="offset points", fontsize=7, color="grey")


def draw_panel(ax: Any, panel: Panel, records: list[dict[str, Any]],
               baselines: dict[str, dict[str, float]] | None, unit: str = "token") -> None:
    for key in panel.keys:
        xs, ys = series(records, key)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=2, label=key)
    if baselines and panel.baseline:
        draw_baselines(ax, baselines, panel.baseline)
    twins = [(key, *series(records, key)) for key in panel.twin_keys]
    twins = [(key, xs, ys) for key, xs, ys in twins if xs]
    if twins:
        right = ax.twinx()
        for key, xs, ys in twins:
            right.plot(xs, ys, color="tab:red", linestyle="--", linewidth=1, label=key)
        right.set_ylabel(", ".join(key for key, _, _ in twins), fontsize=8, color="tab:red")
        right.tick_params(labelsize=7)
    ax.set_title(panel.title.format(unit=unit), fontsize=9)
    ax.set_xlabel(f"{unit}s seen", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def draw_report(plt: Any, panels: list[Panel], records: list[dict[str, Any]], path: Path,
                baselines: dict[str, dict[str, float]] | None = None, title: str = "",
                unit: str = "token") -> list[str]:
    """One PNG at `path` with the given panels (those present in `records`), its axes in `unit`s; returns
    the panels' names."""
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), dpi=100, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, panel in zip(flat, panels, strict=False):
        draw_panel(ax, panel, records, baselines, unit)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return [panel.name for panel in panels]


class Report(NamedTuple):
    path: Path          # the PNG written
    panels: list[str]   # the names of the panels drawn, in order
    baselines: str      # where the count-model lines came from: "rebuilt from CHECKPOINT" or "none, why"
    lines: dict[str, dict[str, float]] | None  # the count-model lines: {"unigram": {"acc", "ce"}, ...}
    unit: str = "token"  # what the x axes count: "character" (TOKENIZER=char) or "token"


def report_run(run_dir: Path, out: Path | None = None, rebuild_baselines: bool = True) -> Report:
    """Draw RUN_DIR's metrics.jsonl into `out` (default RUN_DIR/report.png)."""
    records = load_records(run_dir)
    # Both checks come before the count models are rebuilt for nothing.
    panels = panels_present(records)
    if not panels:
        raise ConfigError([f"{run_dir / METRICS} holds no metric logged against {X_KEY}: nothing to draw."])
    try:
        plt = require_pyplot("avatarl report")
    except ImportError as err:  # the CLI's one line and exit 2
        raise ConfigError([str(err)]) from None
    saved = saved_config(run_dir)
    baselines, source = rebuilt_baselines(saved) if rebuild_baselines else (None, "none, --no-baselines")
    unit = token_unit(saved.cfg)
    path = out or run_dir / REPORT
    drawn = draw_report(plt, panels, records, path, baselines, str(run_dir), unit)
    return Report(path, drawn, source, baselines, unit)
