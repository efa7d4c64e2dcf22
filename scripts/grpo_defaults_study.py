"""Small GRPO runs on Tiny Shakespeare to choose knob defaults that do not collapse the policy.

One run = a fresh 2-layer student trained with avatarl.algorithms.grpo for --iters iterations of
--contexts random contexts from the first 90% of the corpus (K samples each), with a frozen old
policy refreshed every --old-policy-interval iterations, AdamW at a constant learning rate after a
short linear warmup (no decay, so a collapse is not hidden by a vanishing step size) and gradient
clipping at 1.0. The KL weight is kl_warmup(AdaptiveKLController) updated every --log-interval
iterations from the measured KL. Validation cross-entropy of the untempered student is measured
without gradient on fixed windows of the last 10%.

--reward-off zeroes the reward (the true continuation is replaced by an impossible id and partial
credit is 0), so the advantages vanish and only the KL/entropy terms train: pure distillation of the
n-gram. Prints one line per evaluation and appends a JSON summary to --out.

    python scripts/grpo_defaults_study.py --label seed --iters 300 --out study.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from avatarl.algorithms.grpo import AdaptiveKLController, grpo_micro_step, kl_warmup
from avatarl.config import Config
from avatarl.data import TRAIN_FRACTION, eval_windows
from avatarl.model import GPT, GPTConfig
from avatarl.reference import NgramReference

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="run")
    p.add_argument("--data", default=str(DEFAULT_CORPUS))
    p.add_argument("--out", default="")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--contexts", type=int, default=64)
    p.add_argument("--context-len", type=int, default=32)
    p.add_argument("--horizon", type=int, default=8)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-emb", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.2)
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--entropy-coef", type=float, default=0.01)
    p.add_argument("--beta-kl", type=float, default=1e-3)
    p.add_argument("--kl-warm", type=int, default=50000)
    p.add_argument("--adaptive-kl", type=int, default=1)
    p.add_argument("--kl-target", type=float, default=0.02)
    p.add_argument("--kl-horizon", type=float, default=10000.0, help="controller horizon in chars")
    p.add_argument("--kl-max-coef", type=float, default=100.0)
    p.add_argument("--min-std", type=float, default=0.1)
    p.add_argument("--partial-credit", type=float, default=1.0)
    p.add_argument("--ngram-order", type=int, default=2)
    p.add_argument("--reward-off", action="store_true")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--old-policy-interval", type=int, default=5)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-windows", type=int, default=512)
    return p.parse_args(argv)


@torch.no_grad()
def val_ce(model: GPT, windows: torch.Tensor) -> float:
    logits = model(windows[:, :-1]).float()
    return float(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()))


@torch.no_grad()
def reference_ce(ref: NgramReference, windows: torch.Tensor) -> float:
    logp = ref.log_probs(windows[:, :-1])
    return float(-logp.gather(-1, windows[:, 1:, None]).mean())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    text = Path(args.data).read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {ch: i for i, ch in enumerate(chars)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    split = int(len(ids) * TRAIN_FRACTION)
    train, val = ids[:split].to(device), ids[split:].to(device)
    V, C, H = len(chars), args.context_len, args.horizon

    cfg = Config(k_samples=args.k, horizon=H, temperature=args.temperature, clip_ratio=args.clip,
                 entropy_coef=args.entropy_coef, min_variance=args.min_std,
                 partial_credit=0.0 if args.reward_off else args.partial_credit, context_len=C)
    model = GPT(GPTConfig(V, C + H, args.n_layer, args.n_head, args.n_emb, use_flash_attn=False)).to(device)
    old_policy = copy.deepcopy(model).requires_grad_(False)
    ref = NgramReference(args.ngram_order, V, train, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    controller = AdaptiveKLController(args.beta_kl, args.kl_target, args.kl_horizon, args.kl_max_coef)
    windows = eval_windows(val, C, args.eval_windows)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    offsets = torch.arange(C + H, device=device)
    chars_per_iter = args.contexts * args.k * H

    history: dict[int, float] = {0: val_ce(model, windows)}
    print(f"[{args.label}] ngram-{args.ngram_order} val CE {reference_ce(ref, windows):.3f}; iter 0 val CE "
          f"{history[0]:.3f}", flush=True)
    interval: dict[str, list[torch.Tensor]] = {}
    last: dict[str, float] = {}
    start = time.time()
    for it in range(1, args.iters + 1):
        if (it - 1) % args.old_policy_interval == 0:
            old_policy.load_state_dict(model.state_dict())
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, it / max(args.warmup, 1))
        starts = torch.randint(0, len(train) - C - H, (args.contexts,), device=device, generator=gen)
        window = train[starts[:, None] + offsets]
        ctx, truth = window[:, :C], window[:, C:]
        if args.reward_off:
            truth = torch.full_like(truth, -1)  # no sample can match: exact-match reward is 0
        kl_coef = kl_warmup(controller.value, (it - 1) * chars_per_iter, args.kl_warm)
        loss, metrics = grpo_micro_step(model, old_policy, ref, ctx, truth, cfg, kl_coef, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for name, value in metrics.items():
            interval.setdefault(name, []).append(value)
        if it % args.log_interval == 0:
            last = {name: float(torch.stack(values).mean()) for name, values in interval.items()}
            interval = {}
            if args.adaptive_kl:
                controller.update(last["kl"], args.log_interval * chars_per_iter)
            last["kl_coef"] = kl_coef
        if it % args.eval_every == 0 or it == args.iters:
            history[it] = val_ce(model, windows)
            print(f"[{args.label}] iter {it} val CE {history[it]:.3f} entropy {last.get('entropy', math.nan):.3f} "
                  f"kl {last.get('kl', math.nan):.3f} kl_coef {last.get('kl_coef', math.nan):.4f} "
                  f"reward {last.get('reward_mean', math.nan):.3f} match {last.get('exact_match', math.nan):.3f} "
                  f"clip {last.get('clip_frac', math.nan):.3f} ({time.time() - start:.0f}s)", flush=True)
    summary = {"label": args.label, "args": vars(args), "val_ce": history, "final": last,
               "ref_ce": reference_ce(ref, windows), "seconds": time.time() - start}
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(summary) + "\n")
    return summary


if __name__ == "__main__":
    main()
