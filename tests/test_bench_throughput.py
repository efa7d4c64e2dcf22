"""`avatarl bench throughput`: JSON schema, ratios computed from the measured times, the peer row, timing
helpers."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from avatarl.algorithms.grpo import rollout
from avatarl.bench import run_bench
from avatarl.bench.throughput import Timing, measure, rollout_recompute, time_interleaved
from avatarl.bench.throughput_report import flop_counts, format_table, ratios_of, summarise
from avatarl.config import Config
from avatarl.model import GPT, GPTConfig
from avatarl.progress import PEAK_BF16_TFLOPS, gpu_peak_tflops
from tests.helpers import run_cli

ROWS = ("supervised_step", "grpo_iteration", "rollout_kv_cache", "grpo_scoring", "rollout_recompute",
        "grpo_full_rows", "avatarl_iteration", "teacher_forced_iteration", "log_reward_iteration",
        "log_reward_half_iteration", "peer_step")
RATIOS = ("grpo_over_supervised", "kv_cache_speedup", "shared_prefix_speedup", "avatarl_over_supervised",
          "supervised_over_peer", "teacher_forced_per_token_over_supervised",
          "log_reward_per_token_over_supervised", "log_reward_half_per_token_over_supervised")


def test_cli_writes_json_whose_ratios_are_the_measured_time_ratios(tmp_path: Path, corpus_path: Path):
    out = tmp_path / "bench.json"
    done = run_cli(["bench", "throughput", "--quick", "--iters", "3", "--json", str(out), "--n-layer", "1",
                    "--n-head", "2", "--n-emb", "32", "--micro-batch", "4", "--batch", "8",
                    "--k-samples", "3", "--horizon", "5", "--context-len", "12", "--device", "cpu",
                    "--data-path", str(corpus_path)],
                   cwd=tmp_path, timeout=120, USE_WANDB="false")
    assert done.returncode == 0, done.stderr
    table = done.stdout.splitlines()
    assert [line.split()[0] for line in table[-8:]] == list(RATIOS)  # the eight ratios come last in the table
    assert any(line.startswith("peer step (HF GPT-2") for line in table)
    report = json.loads(out.read_text())

    assert report["schema"] == "avatarl.bench.throughput/2" and report["finite"] is True
    cfg = report["config"]
    assert (cfg["n_layer"], cfg["n_emb"], cfg["micro_batch"], cfg["k_samples"], cfg["horizon"],
            cfg["context_len"], cfg["iters"]) == (1, 32, 4, 3, 5, 12, 3)
    assert cfg["cuda_graphs"] is False  # USE_CUDA_GRAPHS is off by default, and needs CUDA anyway
    assert report["device"]["type"] == "cpu" and "gpu" not in report and "mfu" not in report["ratios"]
    timings = report["timings"]
    assert set(timings) == set(ROWS)
    for row in timings.values():
        assert len(row["times_s"]) == 3 and all(t > 0 for t in row["times_s"])
        assert row["median_s"] == statistics.median(row["times_s"]) and row["min_s"] == min(row["times_s"])
    t = {name: row["median_s"] for name, row in timings.items()}
    ratios = report["ratios"]
    assert list(ratios) == list(RATIOS)
    assert ratios["supervised_over_peer"] == pytest.approx(t["supervised_step"] / t["peer_step"], rel=1e-12)
    peer = report["peer"]  # transformers is installed in the dev environment: the row ran
    assert peer["model"] == "transformers.GPT2LMHeadModel" and peer["attention"] == "sdpa"
    assert peer["params"] > 0 and peer["transformers"]
    assert ratios["grpo_over_supervised"] == pytest.approx(t["grpo_iteration"] / t["supervised_step"],
                                                           rel=1e-12)
    assert ratios["kv_cache_speedup"] == pytest.approx(t["rollout_recompute"] / t["rollout_kv_cache"],
                                                       rel=1e-12)
    assert ratios["avatarl_over_supervised"] == pytest.approx(t["avatarl_iteration"] / t["supervised_step"],
                                                              rel=1e-12)
    assert ratios["shared_prefix_speedup"] == pytest.approx(t["grpo_full_rows"] / t["grpo_iteration"],
                                                            rel=1e-12)
    per_supervised_token = t["supervised_step"] / (4 * 3 * (12 + 5))  # B x K x (C + H) tokens
    for row in ("teacher_forced", "log_reward", "log_reward_half"):  # B x C positions per teacher-forced step
        assert ratios[f"{row}_per_token_over_supervised"] == pytest.approx(
            t[f"{row}_iteration"] / (4 * 12) / per_supervised_token, rel=1e-12)
    vocab = len(set(corpus_path.read_text()))
    assert report["teacher_forced_k"] == {"teacher_forced_iteration": 128,
                                          "log_reward_iteration": math.ceil(vocab / 4),
                                          "log_reward_half_iteration": math.ceil(vocab / 2)}
    for row in timings.values():  # on a CPU, the process CPU time of the same calls, and ratios from it
        assert len(row["cpu_times_s"]) == 3 and row["cpu_median_s"] == statistics.median(row["cpu_times_s"])
    cpu = {name: row["cpu_median_s"] for name, row in timings.items()}
    cpu_ratios = report["cpu_time_ratios"]
    assert cpu_ratios["grpo_over_supervised"] == pytest.approx(cpu["grpo_iteration"] / cpu["supervised_step"])
    assert cpu_ratios["kv_cache_speedup"] == pytest.approx(cpu["rollout_recompute"] / cpu["rollout_kv_cache"])
    assert cpu_ratios["supervised_over_peer"] == pytest.approx(cpu["supervised_step"] / cpu["peer_step"])
    B, C, K, H = 4, 12, 3, 5
    throughput = report["throughput"]
    assert throughput["grpo_contexts_per_s"] == pytest.approx(B / t["grpo_iteration"])
    assert throughput["grpo_sampled_tokens_per_s"] == pytest.approx(B * K * H / t["grpo_iteration"])
    assert throughput["supervised_tokens_per_s"] == pytest.approx(B * K * (C + H) / t["supervised_step"])
    assert throughput["peer_tokens_per_s"] == pytest.approx(B * K * (C + H) / t["peer_step"])
    split = report["grpo_split_s"]
    assert split["rollout"] == t["rollout_kv_cache"] and split["scoring"] == t["grpo_scoring"]
    assert split["update"] == pytest.approx(t["grpo_iteration"] - t["rollout_kv_cache"] - t["grpo_scoring"])


def tiny_bench_config(corpus_path: Path) -> Config:
    return Config.of(n_layer=1, n_head=2, n_emb=32, micro_batch=2, batch=2, k_samples=2, horizon=3,
                     context_len=6, device="cpu", data_path=str(corpus_path), use_wandb=False)


def test_peer_row_is_skipped_with_a_note_without_transformers(monkeypatch: pytest.MonkeyPatch,
                                                              corpus_path: Path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    cfg, device = tiny_bench_config(corpus_path), torch.device("cpu")
    result = measure(cfg, device, warmup=1, iters=2)
    assert set(result["timings"]) == set(ROWS) - {"peer_step"} and result["finite"]
    assert "transformers is not importable" in result["peer"]["skipped"]
    report = summarise(cfg, device, result, warmup=1, iters=2)
    assert "supervised_over_peer" not in report["ratios"]
    assert "supervised_over_peer" not in report["cpu_time_ratios"]
    assert list(report["ratios"]) == [name for name in RATIOS if name != "supervised_over_peer"]
    assert "peer_tokens_per_s" not in report["throughput"]
    table = format_table(report)
    assert "peer step skipped: transformers is not importable" in table and "peer step (HF" not in table
    json.dumps(report)  # still serialisable


def test_measure_of_the_two_steps_only_has_no_peer(corpus_path: Path):
    result = measure(tiny_bench_config(corpus_path), torch.device("cpu"), warmup=1, iters=1, full=False)
    assert set(result["timings"]) == {"supervised_step", "grpo_iteration"} and result["peer"] is None


def test_supervised_over_peer_is_the_ratio_of_the_given_times():
    times = {"supervised_step": 3.0, "grpo_iteration": 1.5, "rollout_kv_cache": 0.5, "rollout_recompute": 5.0,
             "grpo_full_rows": 3.0, "avatarl_iteration": 0.75, "grpo_scoring": 0.1}
    assert "supervised_over_peer" not in ratios_of(times)
    ratios = ratios_of({**times, "peer_step": 4.0})
    assert ratios["supervised_over_peer"] == 0.75 and ratios["grpo_over_supervised"] == 0.5


def test_time_interleaved_warms_each_call_then_takes_turns():
    order: list[str] = []
    calls = {"a": lambda: order.append("a"), "b": lambda: (order.append("b"), time.sleep(0.02))}
    timings = time_interleaved(calls, torch.device("cpu"), warmup=2, iters=3)
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(timings[name].times_s) for name in "ab"] == [3, 3]
    assert min(timings["b"].times_s) >= 0.02 > timings["a"].median_s
    assert timings["a"].peak_memory_mib is None  # CUDA only


def test_recompute_rollout_draws_the_same_samples_as_the_kv_cached_one():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_emb=16,
                          use_flash_attn=False)).eval()
    with torch.no_grad():  # sharper than the 0.02 init, so different draws would show
        for p in model.parameters():
            p.mul_(20.0) if p.dim() == 2 else None
    ctx = torch.randint(0, 11, (3, 6))
    cached = rollout(model, ctx, 4, 5, 1.3, torch.Generator().manual_seed(7))
    recomputed = rollout_recompute(model, ctx, 4, 5, 1.3, torch.Generator().manual_seed(7))
    assert cached.samples.shape == recomputed.samples.shape == (3, 4, 5)
    assert torch.equal(cached.samples, recomputed.samples)
    torch.testing.assert_close(cached.old_logp, recomputed.old_logp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, gpu_type, expected", [
    ("NVIDIA H100 80GB HBM3", "A100", ("H100", 989.0)),
    ("NVIDIA H100 PCIe", "A100", ("H100 PCIe", 756.0)),
    ("NVIDIA A100-SXM4-80GB", "H100", ("A100", 312.0)),
    ("NVIDIA L40S", "A100", ("L40S", 362.0)),  # not mistaken for an L4
    ("NVIDIA L4", "A100", ("L4", 121.0)),
    ("Some Future GPU", "B200", ("B200", 2250.0)),  # unknown name: GPU_TYPE decides
])
def test_gpu_peak_from_device_name_else_gpu_type(name: str, gpu_type: str, expected: tuple[str, float]):
    assert gpu_peak_tflops(name, gpu_type) == expected


def test_every_gpu_type_setting_has_a_peak():
    from avatarl.config import config_fields

    assert set(config_fields()["GPU_TYPE"].metadata["choices"]) <= set(PEAK_BF16_TFLOPS)


def test_flop_counts_hand_values():
    model = GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_emb=8, use_flash_attn=False))
    # N = wte 5*8 (tied head) + norms 8+8+8 + qkv 8*24 + proj 8*8 + fc 8*32 + proj 32*8
    #   = 40+24+192+64+256+256 = 832
    assert model.num_params() == 832
    cfg = Config.of(n_layer=1, n_head=2, n_emb=8, micro_batch=2, batch=2, context_len=3, horizon=2,
                    k_samples=2)
    flops = flop_counts(cfg, model, model)
    # F(T) = 6*832 + 12*1*8*T = 4992 + 96 T.  B=2, C=3, K=2, H=2, S = C+H-1 = 4
    assert flops["supervised_step"] == (4992 + 96 * 5) * 2 * 2 * 5  # F(5) x BK(C+H) = 5472 x 20 = 109440
    # rollout and update both cover N = B(C + K(H-1)) = 10 tokens: forward F(4)/3 = 1792 and update
    # F(4) = 5376 each
    assert flops["grpo_iteration"] == pytest.approx(1792 * 10 + 5376 * 10)
    assert flops["avatarl_iteration"] == pytest.approx(4 / 3 * (4992 + 96 * 3) * 2 * 3)  # F(3) 4/3 BC = 42240


def test_gpu_report_mfu_is_flops_over_measured_time_over_peak(monkeypatch: pytest.MonkeyPatch):
    # the CUDA branch of the report, fed made-up times: its numbers must follow from them
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    model = GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_emb=8, use_flash_attn=False))
    cfg = Config.of(n_layer=1, n_head=2, n_emb=8, micro_batch=2, batch=2, context_len=3, horizon=2,
                    k_samples=2)
    times = {"supervised_step": 2e-9, "grpo_iteration": 4e-9, "rollout_kv_cache": 1e-9,
             "grpo_scoring": 5e-10, "rollout_recompute": 3e-9, "grpo_full_rows": 8e-9,
             "avatarl_iteration": 1e-9}
    timings = {name: Timing([t, 2 * t, t / 2], peak_memory_mib=100.0) for name, t in times.items()}
    result = {"timings": timings,
              "finite": True, "params": 832, "attention": "sdpa", "model": model, "referee": model,
              "cuda_graphs": True}
    report = summarise(cfg, torch.device("cuda"), result, warmup=1, iters=3)
    gpu = report["gpu"]
    assert (gpu["gpu_type"], gpu["peak_bf16_tflops"]) == ("H100", 989.0)
    # 71680 FLOPs (see the hand values above) in the median time 4e-9 s = 17.92 TFLOP/s
    assert gpu["achieved_tflops"]["grpo_iteration"] == pytest.approx(17.92)
    assert report["ratios"]["mfu"] == pytest.approx(17.92 / 989.0)
    assert gpu["mfu"]["supervised_step"] == pytest.approx(109440 / 2e-9 / 1e12 / 989.0)
    assert report["ratios"]["grpo_over_supervised"] == pytest.approx(2.0)
    assert report["ratios"]["kv_cache_speedup"] == pytest.approx(3.0)
    assert report["ratios"]["shared_prefix_speedup"] == pytest.approx(2.0)
    table = format_table(report)
    assert "H100" in table and "MFU" in table
    assert "peak memory 100 MiB" in table and "cuda_graphs=True" in table


def test_bench_dispatches_learning_lazily(monkeypatch: pytest.MonkeyPatch):
    fake = types.ModuleType("avatarl.bench.learning")
    fake.run_learning_bench = lambda cfg, args: 7 if args.which == "learning" else -1
    monkeypatch.setitem(sys.modules, "avatarl.bench.learning", fake)
    assert run_bench(Config(), argparse.Namespace(which="learning")) == 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_report_has_mfu_and_peak_memory(corpus_path: Path):
    cfg = Config.of(n_layer=2, n_head=4, n_emb=128, micro_batch=64, batch=64, device="cuda",
                 data_path=str(corpus_path), use_wandb=False)
    device = torch.device("cuda")
    report = summarise(cfg, device, measure(cfg, device, warmup=2, iters=3), warmup=2, iters=3)
    gpu = report["gpu"]
    assert report["finite"] and 0 < report["ratios"]["mfu"] < 1
    achieved = gpu["achieved_tflops"]["grpo_iteration"]
    assert report["ratios"]["mfu"] == pytest.approx(achieved / gpu["peak_bf16_tflops"])
    assert all(value > 0 for value in gpu["peak_memory_mib"].values())
    assert math.isfinite(report["throughput"]["grpo_contexts_per_s"])
