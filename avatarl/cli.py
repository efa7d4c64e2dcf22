"""`avatarl` command line: train, train-referee, sample, config, health, bench, prepare, tokenizer, launch,
report.

Settings come from the process environment, flags, `.env` and a preset, in that order of precedence
(config_sources.py); run `avatarl config` to see each resolved value and where it came from. Each
command's work is imported only when that command runs, so `avatarl --help` and `avatarl config` stay
fast. The commands raise the errors of errors.py; `main` turns them into `error:` lines and exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from avatarl import exit_codes
from avatarl.config import Config, config_fields
from avatarl.config_docs import describe, env_example, markdown_table
from avatarl.config_schema import Algorithm, TrainingMode
from avatarl.config_sources import QUICK_PRESET, Layered, default_of, preset_names, resolve_settings
from avatarl.errors import ConfigError, run_entry
from avatarl.launchers.modal import in_modal_container


def add_setting_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] = ()) -> None:
    """One flag per setting (`--context-len` for CONTEXT_LEN), or only those named in `only`."""
    parser.add_argument("--env-file", help="dotenv file to read (default: ./.env when present)")
    parser.add_argument("--preset", choices=preset_names(), help="named settings of avatarl/presets/ that "
                        "replace the defaults (.env, flags and the environment still win)")
    group = parser.add_argument_group("settings (each also an environment variable, which wins over its "
                                      "flag; a flag wins over .env)")
    for name, f in config_fields().items():
        if only and name not in only:
            continue
        choices = f"; one of {', '.join(f.metadata['choices'])}" if f.metadata["choices"] else ""
        group.add_argument(f"--{name.lower().replace('_', '-')}", dest=f"setting_{name}", metavar=name,
                           help=f"{f.metadata['doc']} (default {default_of(f)}{choices})")


def cli_settings(args: argparse.Namespace) -> dict[str, str]:
    prefix = "setting_"
    return {key[len(prefix):]: value for key, value in vars(args).items()
            if key.startswith(prefix) and value is not None}


def resolve(args: argparse.Namespace) -> tuple[Config, Layered]:
    """The settings of a command (config_sources.resolve_settings); `--quick` is `--preset bench-quick`."""
    preset = getattr(args, "preset", None)
    if getattr(args, "quick", False):
        if preset not in (None, QUICK_PRESET):
            raise ConfigError([f"--quick is --preset {QUICK_PRESET}: give either --quick or "
                               f"--preset {preset}."])
        preset = QUICK_PRESET
    return resolve_settings(cli_settings(args), getattr(args, "env_file", None), preset)


def command_train(args: argparse.Namespace) -> int:
    cfg, _ = resolve(args)
    if cfg.launch.training_mode == TrainingMode.MODAL and not in_modal_container():
        from avatarl.launchers.modal import hand_over_to_modal

        return hand_over_to_modal(args.env_file, cli_settings(args), args.preset)
    from avatarl.referee import check_referee_quantize

    check_referee_quantize(cfg)  # before any model is built: a quantised referee needs CUDA and bitsandbytes
    from avatarl.trainer import train

    train(cfg)  # completed, or stopped with a checkpoint: exit 0 either way
    return exit_codes.OK


def command_train_referee(args: argparse.Namespace) -> int:
    cfg, _ = resolve(args)
    cfg = cfg.replace(total_iters=cfg.referee.referee_iters, save_final_checkpoint=True)
    from avatarl.referee import export_referee
    from avatarl.trainer import train

    train(cfg, role="referee")
    if int(os.environ.get("RANK", "0")) == 0:
        export_referee(cfg)
    return exit_codes.OK


def command_config(args: argparse.Namespace) -> int:
    if args.env_example:
        print(env_example(), end="")
        return exit_codes.OK
    if args.markdown:
        print(markdown_table(), end="")
        return exit_codes.OK
    cfg, layered = resolve(args)
    print(describe(cfg, layered.sources, layered.others()))
    if cfg.run.algorithm == Algorithm.AVATARL:
        from avatarl.referee import describe_referee

        print(describe_referee(cfg))
    return exit_codes.OK


def command_sample(args: argparse.Namespace) -> int:
    from avatarl.generate import sample_from_checkpoint
    from avatarl.run_dir import run_dir

    cfg, _ = resolve(args)
    texts = sample_from_checkpoint(args.checkpoint, run_dir(cfg), args.prompt, args.max_new_tokens,
                                   args.temperature, args.top_k, args.num_samples, args.seed, cfg.run.device)
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1}\n{text}")
    return exit_codes.OK


def command_health(args: argparse.Namespace) -> int:
    from avatarl.run_dir import heartbeat_age, run_dir

    cfg, _ = resolve(args)
    max_age = args.max_age if args.max_age is not None else max(60.0, 4 * cfg.run.heartbeat_interval)
    directory = run_dir(cfg)
    try:
        age, beat = heartbeat_age(directory)
    except (OSError, ValueError, KeyError) as err:
        print(f"unhealthy: no readable heartbeat in {directory} ({err})", file=sys.stderr)
        return exit_codes.FAILED
    if age > max_age and not beat.get("finished"):
        print(f"unhealthy: last heartbeat {age:.0f}s ago at iteration {beat['iteration']} "
              f"(max age {max_age:.0f}s)", file=sys.stderr)
        return exit_codes.FAILED
    print(f"healthy: iteration {beat['iteration']}/{beat.get('total_iters')}, heartbeat {age:.0f}s ago, "
          f"{beat.get('tokens_per_s', 0):.0f} tokens/s")
    return exit_codes.OK


def command_bench(args: argparse.Namespace) -> int:
    from avatarl.bench import run_bench

    cfg, _ = resolve(args)
    return run_bench(cfg, args)


def command_report(args: argparse.Namespace) -> int:
    from avatarl.report import report_run

    out = Path(args.out).expanduser() if args.out else None
    drawn = report_run(Path(args.run_dir).expanduser(), out, rebuild_baselines=not args.no_baselines)
    print(f"[avatarl] {drawn.path}: {', '.join(drawn.panels)} (count-model lines: {drawn.baselines})")
    return exit_codes.OK


def hf_source(args: argparse.Namespace) -> Any:
    from avatarl.data.sources import HFSource

    if not args.hf_dataset:
        return None
    return HFSource(args.hf_dataset, args.hf_config, args.split, args.streaming)


def command_prepare(args: argparse.Namespace) -> int:
    from avatarl.data.prepare import prepare

    cfg, _ = resolve(args)
    # --tokenizer names the BPE outright; TOKENIZER (env, .env) stands in for it unless it is the default
    # char, which prepare cannot use.
    spec = args.tokenizer or cfg.data.tokenizer
    num_proc = args.num_proc if args.num_proc is not None else os.cpu_count() or 1
    meta = prepare(args.sources, Path(args.output).expanduser(), spec, hf_source(args), args.text_column,
                   num_proc, args.val_fraction, args.dtype)
    print(f"[avatarl] prepared {args.output}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val "
          f"tokens ({meta['dtype']}) from {meta['documents']:,} documents in {meta['seconds']:.1f}s, "
          f"{meta['tokens_per_s']:,.0f} tokens/s with {meta['num_proc']} process(es)")
    return exit_codes.OK


def command_tokenizer_train(args: argparse.Namespace) -> int:
    from avatarl.data.sources import documents, expand, require_sources
    from avatarl.data.tokenizers import train_bpe

    require_sources(args.sources, hf_source(args), "avatarl tokenizer train")
    path = train_bpe(documents(expand(args.sources), hf_source(args), args.text_column), args.vocab_size,
                     Path(args.output).expanduser())
    print(f"[avatarl] byte-level BPE of {args.vocab_size} ids saved to {path} (use TOKENIZER={args.output})")
    return exit_codes.OK


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*",
                        help="UTF-8 .txt files, .jsonl / .parquet files, directories or globs")
    parser.add_argument("--hf-dataset", help="a Hugging Face dataset: hub name or local directory")
    parser.add_argument("--hf-config", help="its configuration (e.g. sample-10BT of FineWeb-Edu)")
    parser.add_argument("--split", default="train", help="its split (default train)")
    parser.add_argument("--streaming", action="store_true",
                        help="stream the dataset instead of downloading it")
    parser.add_argument("--text-column", default="text", help="the column or JSON key holding the text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatarl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train the student with RL (ALGORITHM=grpo|avatarl)")
    add_setting_flags(train)
    train.set_defaults(handler=command_train)

    referee = commands.add_parser("train-referee",
                                  help="train the supervised referee used by ALGORITHM=avatarl")
    add_setting_flags(referee)
    referee.set_defaults(handler=command_train_referee)

    config = commands.add_parser("config", help="print the resolved settings with their sources")
    config.add_argument("--env-example", action="store_true", help="print a complete .env.example instead")
    config.add_argument("--markdown", action="store_true", help="print the settings table of the README")
    add_setting_flags(config)
    config.set_defaults(handler=command_config)

    sample = commands.add_parser("sample", help="generate text from a checkpoint")
    sample.add_argument("--checkpoint", default="latest", help="checkpoint file, or latest in CHECKPOINT_DIR")
    sample.add_argument("--prompt", default="\n", help="text to continue")
    sample.add_argument("--max-new-tokens", type=int, default=200)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-k", type=int, default=None)
    sample.add_argument("--num-samples", type=int, default=1)
    sample.add_argument("--seed", type=int, default=0)
    add_setting_flags(sample, only=("CHECKPOINT_DIR", "DEVICE"))
    sample.set_defaults(handler=command_sample)

    prep = commands.add_parser("prepare", help="tokenize a corpus into DIR/train.bin, val.bin and meta.json "
                               "(the nanoGPT layout; DATA_PATH=DIR trains from it)")
    add_source_arguments(prep)
    prep.add_argument("--output", required=True, help="the directory to write")
    prep.add_argument("--num-proc", type=positive_int, default=None,
                      help="worker processes (default: this machine's cores)")
    prep.add_argument("--val-fraction", type=float, default=0.1, help="share of the tokens in val.bin")
    prep.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                      help="token id type (auto: uint16 when the vocabulary fits)")
    prep.add_argument("--tokenizer", help="gpt2, a .tiktoken rank file or a Hugging Face tokenizer (default: "
                      "TOKENIZER when it is not char)")
    prep.add_argument("--env-file", help="dotenv file to read (default: ./.env when present)")
    prep.set_defaults(handler=command_prepare)

    tok = commands.add_parser("tokenizer",
                              help="tokenizers: `avatarl tokenizer train` makes a byte-level BPE")
    tok_commands = tok.add_subparsers(dest="tokenizer_command", required=True)
    tok_train = tok_commands.add_parser("train", help="train a byte-level BPE on a corpus with Hugging Face "
                                        "tokenizers (offline) and save it as tokenizer.json")
    add_source_arguments(tok_train)
    tok_train.add_argument("--vocab-size", type=int, required=True,
                           help="ids in the vocabulary (at least 257)")
    tok_train.add_argument("--output", required=True, help="the directory to write tokenizer.json to")
    tok_train.set_defaults(handler=command_tokenizer_train)

    commands.add_parser("launch", help="torchrun with clean stops: `avatarl launch --nproc-per-node=4 "
                        "-m avatarl train` (every argument goes to torchrun) exits 0 after a SIGTERM "
                        "checkpoint; without --standalone, NNODES, RDZV_ENDPOINT, MAX_RESTARTS... set its "
                        "rendezvous")

    health = commands.add_parser("health", help="exit 0 while the run's heartbeat is fresh (liveness probe)")
    health.add_argument("--max-age", type=float, default=None,
                        help="seconds after which a heartbeat is stale "
                             "(default max(60, 4 x HEARTBEAT_INTERVAL))")
    add_setting_flags(health, only=("CHECKPOINT_DIR", "HEARTBEAT_INTERVAL"))
    health.set_defaults(handler=command_health)

    bench = commands.add_parser("bench", help="benchmarks: throughput, learning")
    bench.add_argument("which", choices=("throughput", "learning"))
    bench.add_argument("--quick", action="store_true", help=f"--preset {QUICK_PRESET}: a model and budget "
                       "for a CPU (flags, .env and the environment still win); throughput: 2 timed "
                       "iterations")
    bench.add_argument("--iters", type=int, default=None, help="timed iterations (throughput)")
    bench.add_argument("--json", dest="json_path", default=None, help="write results as JSON here")
    bench.add_argument("--out", default="bench-out", help="output directory (learning)")
    bench.add_argument("--seeds", type=int, default=1,
                       help="repeat every method for SEED, SEED+1, ... (learning)")
    bench.add_argument("--methods", nargs="+", metavar="ROW", default=None,
                       help="(learning) train only these rows of the table, e.g. supervised grpo_log_reward")
    bench.add_argument("--row", dest="rows", nargs="+", action="append", metavar=("NAME", "SETTING=VALUE"),
                       default=None, help="(learning, repeatable) add a row: NAME, a row of the table or a "
                       "preset, then SETTING=VALUE words, e.g. --row k_half grpo_log_reward K_FRACTION=0.5; "
                       "without --methods only these rows train")
    bench.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                       help="(learning) train nothing: join the learning.json of runs for other seeds "
                            "into OUT")
    add_setting_flags(bench)
    bench.set_defaults(handler=command_bench)

    run_report = commands.add_parser("report", help="draw a run's curves from RUN_DIR/metrics.jsonl into "
                                     "one PNG next to it (no wandb needed)")
    run_report.add_argument("run_dir", metavar="RUN_DIR", help="the run's CHECKPOINT_DIR")
    run_report.add_argument("--out", default=None, help="the PNG to write (default RUN_DIR/report.png)")
    run_report.add_argument("--no-baselines", action="store_true", help="do not rebuild the run's corpus "
                        "to draw the count-model lines")
    run_report.set_defaults(handler=command_report)
    return parser


def dispatch(argv: list[str]) -> int:
    """Parse `argv` and run its command; returns its exit code, raises its AvatarlError."""
    if argv[:1] == ["launch"]:  # torchrun's own options follow; argparse would try to read them
        from avatarl.launchers.torchrun import launch_torchrun

        # The rendezvous settings, from the environment and ./.env like the workers' own; .env's other
        # variables (OMP_NUM_THREADS, NCCL_*) reach torchrun, which hands its environment to the workers.
        cfg, _ = resolve_settings()
        return launch_torchrun(argv[1:], cfg)
    args = build_parser().parse_args(argv)
    return args.handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    """`avatarl ARGV`: the command's exit code; an AvatarlError as `error:` lines (errors.run_entry)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_entry(lambda: dispatch(argv))


if __name__ == "__main__":
    sys.exit(main())
