"""The outputs of `avatarl bench throughput`: the FLOPs of each timed step, the ratios between the rows,
the JSON report (settings, timings, throughput, the GRPO split, GPU FLOP/s and MFU) and the text table."""

from __future__ import annotations

from typing import Any

import torch

from avatarl.bench.per_token import per_token_ratios, table_rows
from avatarl.config import Config
from avatarl.device import mixed_precision
from avatarl.model import GPT
from avatarl.progress import gpu_peak_tflops, grpo_context_flops, next_token_context_flops

SCHEMA = "avatarl.bench.throughput/2"


def flop_counts(cfg: Config, student: GPT, referee: GPT) -> dict[str, float]:
    """FLOPs of one call of each timed step, from F(T) = GPT.flops_per_token(T) (forward + backward).

    supervised: F(C+H) x BK(C+H).  GRPO: the rollout and the update both run each context once and
    each sample row over its own H-1 chars, N = B (C + K (H-1)) tokens at sequence length S = C+H-1:
    a forward, F(S)/3 per token, for the rollout plus F(S) for the update, so 4/3 F(S) x N.
    AvataRL: F(C) x BC for the student plus F_ref(C)/3 x BC for the referee's forward.
    """
    B, C, K, H = cfg.optim.micro_batch, cfg.model.context_len, cfg.grpo.k_samples, cfg.grpo.horizon
    return {"supervised_step": student.flops_per_token(C + H) * B * K * (C + H),
            "grpo_iteration": grpo_context_flops(student, C, K, H) * B,
            "avatarl_iteration": next_token_context_flops(student, C, referee) * B}


def ratios_of(t: dict[str, float]) -> dict[str, float]:
    """The key ratios from per-row times t (seconds); supervised_over_peer only when the peer row ran."""
    ratios = {"grpo_over_supervised": t["grpo_iteration"] / t["supervised_step"],
              "kv_cache_speedup": t["rollout_recompute"] / t["rollout_kv_cache"],
              "shared_prefix_speedup": t["grpo_full_rows"] / t["grpo_iteration"],
              "avatarl_over_supervised": t["avatarl_iteration"] / t["supervised_step"]}
    if "peer_step" in t:
        ratios["supervised_over_peer"] = t["supervised_step"] / t["peer_step"]
    return ratios


def summarise(cfg: Config, device: torch.device, result: dict[str, Any], warmup: int,
              iters: int) -> dict[str, Any]:
    """The JSON report: settings, timings, throughput, split, GPU numbers and ratios from the medians."""
    t = {name: timing.median_s for name, timing in result["timings"].items()}
    B, C, K, H = cfg.optim.micro_batch, cfg.model.context_len, cfg.grpo.k_samples, cfg.grpo.horizon
    dtype = mixed_precision(cfg, device)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda"
                   else "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__},
        "config": {"n_layer": cfg.model.n_layer, "n_head": cfg.model.n_head, "n_emb": cfg.model.n_emb,
                   "context_len": C, "horizon": H, "k_samples": K, "micro_batch": B,
                   "params": result["params"],
                   "dtype": str(dtype or torch.float32).replace("torch.", ""),
                   "attention": result["attention"],
                   "torch_compile": cfg.model.use_torch_compile, "cuda_graphs": result["cuda_graphs"],
                   "warmup": warmup, "iters": iters},
        "timings": {name: timing.to_dict() for name, timing in result["timings"].items()},
        "throughput": {"supervised_tokens_per_s": B * K * (C + H) / t["supervised_step"],
                       "grpo_contexts_per_s": B / t["grpo_iteration"],
                       "grpo_sampled_tokens_per_s": B * K * H / t["grpo_iteration"],
                       "avatarl_contexts_per_s": B / t["avatarl_iteration"],
                       "avatarl_positions_per_s": B * C / t["avatarl_iteration"]},
        "peer": result.get("peer"),
        "grpo_split_s": {"rollout": t["rollout_kv_cache"], "scoring": t["grpo_scoring"],
                         "update": t["grpo_iteration"] - t["rollout_kv_cache"] - t["grpo_scoring"]},
        "finite": result["finite"],
        "ratios": {**ratios_of(t), **per_token_ratios(t, B, C, B * K * (C + H))},
        "teacher_forced_k": result.get("teacher_forced_k", {}),
    }
    if "peer_step" in t:
        report["throughput"]["peer_tokens_per_s"] = B * K * (C + H) / t["peer_step"]
    if device.type == "cpu":  # on a shared machine, CPU time is the steadier measure of the work
        cpu = {name: timing.cpu_median_s for name, timing in result["timings"].items()}
        report["cpu_time_ratios"] = {**ratios_of(cpu), **per_token_ratios(cpu, B, C, B * K * (C + H))}
    if device.type == "cuda":
        gpu_type, peak = gpu_peak_tflops(report["device"]["name"], cfg.launch.gpu_type)
        flops = flop_counts(cfg, result["model"], result["referee"])
        tflops = {name: flops[name] / t[name] / 1e12 for name in flops}
        report["gpu"] = {"gpu_type": gpu_type, "peak_bf16_tflops": peak, "flops_per_iteration": flops,
                         "achieved_tflops": tflops,
                         "mfu": {name: value / peak for name, value in tflops.items()},
                         "peak_memory_mib": {name: timing.peak_memory_mib
                                             for name, timing in result["timings"].items()}}
        report["ratios"]["mfu"] = tflops["grpo_iteration"] / peak
    return report


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def format_table(report: dict[str, Any]) -> str:
    c, dev, tm, thr = report["config"], report["device"], report["timings"], report["throughput"]
    on_cpu = dev["type"] == "cpu"
    where = f"cpu, {dev['threads']} thread(s)" if on_cpu else dev["name"]
    lines = [f"avatarl bench throughput on {where}: {c['n_layer']}L {c['n_head']}H {c['n_emb']}d "
             f"({c['params'] / 1e6:.2f}M params), C={c['context_len']} H={c['horizon']} K={c['k_samples']} "
             f"MICRO_BATCH={c['micro_batch']}, {c['dtype']}, {c['attention']}, compile={c['torch_compile']}, "
             f"cuda_graphs={c['cuda_graphs']}, "
             f"median of {c['iters']} after {c['warmup']} warm-up",
             f"{'measurement':<36}{'median ms':>11}{'min ms':>10}{'cpu ms' if on_cpu else '':>10}"
             "  throughput"]
    split = report["grpo_split_s"]
    rows = [("supervised step (floor)", "supervised_step",
             f"{_rate(thr['supervised_tokens_per_s'])} tokens/s"),
            ("GRPO iteration", "grpo_iteration", f"{_rate(thr['grpo_contexts_per_s'])} contexts/s, "
             f"{_rate(thr['grpo_sampled_tokens_per_s'])} sampled tokens/s"),
            ("  rollout (KV cache)", "rollout_kv_cache", ""),
            ("  scoring (reference, rewards, adv.)", "grpo_scoring", ""),
            ("  update (iteration - the two above)", None, ""),
            ("rollout, recompute prefix", "rollout_recompute", ""),
            ("GRPO iteration, full rows", "grpo_full_rows", ""),
            ("AvataRL iteration", "avatarl_iteration", f"{_rate(thr['avatarl_contexts_per_s'])} contexts/s"),
            *table_rows(report)]
    if "peer_step" in tm:
        rows.append(("peer step (HF GPT-2, same work)", "peer_step",
                     f"{_rate(thr['peer_tokens_per_s'])} tokens/s"))
    for label, key, extra in rows:
        if key is None:
            lines.append(f"{label:<36}{split['update'] * 1e3:>11.2f}")
            continue
        cpu = f"{tm[key]['cpu_median_s'] * 1e3:>10.2f}" if on_cpu else f"{'':>10}"
        median, fastest = tm[key]["median_s"] * 1e3, tm[key]["min_s"] * 1e3
        lines.append(f"{label:<36}{median:>11.2f}{fastest:>10.2f}{cpu}  {extra}")
    if "gpu" in report:
        gpu = report["gpu"]
        lines.append(f"GPU {gpu['gpu_type']}, peak {gpu['peak_bf16_tflops']:g} bf16 TFLOP/s:")
        for name, value in gpu["achieved_tflops"].items():
            lines.append(f"  {name:<32}{value:>8.1f} TFLOP/s  MFU {gpu['mfu'][name]:6.1%}  "
                         f"peak memory {gpu['peak_memory_mib'][name]:,.0f} MiB")
    peer = report.get("peer") or {}
    if "skipped" in peer:
        lines.append(f"peer step skipped: {peer['skipped']}")
    elif peer:
        lines.append(f"peer: {peer['model']} (transformers {peer['transformers']}, {peer['attention']}, "
                     f"{peer['params'] / 1e6:.2f}M params)")
    for backend, row in report.get("attention_backends", {}).items():
        lines.append(f"  attention {backend:<11} supervised {row['supervised_step_s'] * 1e3:.2f} ms, "
                     f"GRPO iteration {row['grpo_iteration_s'] * 1e3:.2f} ms")
    columns = [("ratios", report["ratios"])]
    if "cpu_time_ratios" in report:
        columns = [("ratios (wall clock)", report["ratios"]), ("(CPU time)", report["cpu_time_ratios"])]
    width = max(map(len, report["ratios"]), default=0) + 2
    lines.append(" " * (width + 2) + "".join(f"{title:>22}" for title, _ in columns))
    lines += [f"  {name:<{width}}" + "".join(f"{values[name]:>22.3f}" for _, values in columns)
              for name in report["ratios"]]
    return "\n".join(line.rstrip() for line in lines)
