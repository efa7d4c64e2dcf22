"""`avatarl bench`: dispatch to the throughput or the learning benchmark (each imported on demand)."""

from __future__ import annotations

import argparse

from avatarl.config import Config


def run_bench(cfg: Config, args: argparse.Namespace) -> int:
    """Run the benchmark named by args.which ("throughput" or "learning"); returns the exit code."""
    if args.which == "throughput":
        from avatarl.bench_throughput import run_throughput_bench

        return run_throughput_bench(cfg, args)
    from avatarl.bench_learning import run_learning_bench

    return run_learning_bench(cfg, args)
