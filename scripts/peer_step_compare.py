"""Our supervised step and the Hugging Face GPT-2 peer's, side by side under torch.profiler.

The two calls are the `supervised_step` and `peer_step` rows of `avatarl bench throughput` (the same
`trainer.train_step` and `avatarl.bench.peer` code, B x K windows of C + H input chars, forward,
cross-entropy backward, grad clip, AdamW). After a warm-up, the calls take turns under one profiler
per call, and the table lists each aten op's self CPU time per step for both, largest first: where
our floor spends its time, and where it differs from the peer's. Any avatarl setting flag applies.

    OMP_NUM_THREADS=1 DATA_PATH=../shared/data/tinyshakespeare.txt USE_WANDB=false \\
        python scripts/peer_step_compare.py --n-layer 2 --n-head 4 --n-emb 128 --micro-batch 32 --batch 32
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from avatarl import distributed as D
from avatarl.bench.peer import build_peer, peer_step_fn
from avatarl.bench.throughput import derived_runs
from avatarl.cli import add_setting_flags, cli_settings
from avatarl.config_sources import load_config
from avatarl.data.sampler import WindowSampler
from avatarl.device import resolve_device
from avatarl.trainer import build, train_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="profiled steps of each (default 5)")
    parser.add_argument("--top", type=int, default=25, help="ops to list (default 25)")
    add_setting_flags(parser)
    args = parser.parse_args(argv)
    cfg, _ = load_config(cli_settings(args), args.env_file, preset=args.preset)
    device = resolve_device(cfg.run.device)
    cfg = cfg.replace(batch=cfg.optim.micro_batch, algorithm="grpo")
    with tempfile.TemporaryDirectory(prefix="avatarl-peer-") as tmp:
        cfg = cfg.replace(checkpoint_dir=tmp)
        grpo = build(cfg, D.DistInfo(0, 0, 1, device), "student", Path(tmp))
    supervised, _ = derived_runs(grpo)
    built = build_peer(cfg, grpo.corpus.model_vocab_size, device)
    if isinstance(built, str):
        print(f"error: {built}", file=sys.stderr)
        return 1
    windows = WindowSampler(grpo.corpus.train, cfg.seq_len + 1, cfg.run.seed)
    peer_step, _ = peer_step_fn(cfg, built[0], windows, device)
    calls = {"ours": lambda: train_step(supervised), "peer": peer_step}
    for fn in calls.values():
        fn(), fn()
    self_ms: dict[str, collections.Counter] = {name: collections.Counter() for name in calls}
    total_ms = dict.fromkeys(calls, 0.0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(args.steps):
        for name, fn in calls.items():
            with profile(activities=activities) as prof:
                fn()
            for event in prof.key_averages():
                self_ms[name][event.key] += event.self_cpu_time_total / 1e3 / args.steps
            total_ms[name] += sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / args.steps
    rows = cfg.optim.micro_batch * cfg.grpo.k_samples
    print(f"{cfg.model.n_layer}L {cfg.model.n_head}H {cfg.model.n_emb}d, {rows} rows of {cfg.seq_len} "
          f"tokens, {torch.get_num_threads()} thread(s), {device}; self CPU ms per step (profiled), "
          f"mean of {args.steps}")
    print(f"{'op':<56}{'ours':>10}{'peer':>10}")
    ops = sorted(set(self_ms["ours"]) | set(self_ms["peer"]), key=lambda op: -max(self_ms["ours"][op],
                                                                                     self_ms["peer"][op]))
    for op in ops[:args.top]:
        print(f"{op[:55]:<56}{self_ms['ours'][op]:>10.2f}{self_ms['peer'][op]:>10.2f}")
    print(f"{'total':<56}{total_ms['ours']:>10.2f}{total_ms['peer']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
