"""`avatarl bench`: what a step costs (throughput.py) and which method learns at equal budget (learning.py).

Each benchmark module is imported only when asked for, so `avatarl bench throughput` never loads
matplotlib and `avatarl --help` loads neither.
"""

from __future__ import annotations

import argparse

from avatarl.config import Config


def run_bench(cfg: Config, args: argparse.Namespace) -> int:
    """Run the benchmark named by args.which ("throughput" or "learning"); returns the exit code."""
    if args.which == "throughput":
        from avatarl.bench.throughput import run_throughput_bench

        return run_throughput_bench(cfg, args)
    from avatarl.bench.learning import run_learning_bench

    return run_learning_bench(cfg, args)
