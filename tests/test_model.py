"""Tests of avatarl.model: shapes, tying, causality, KV cache == recompute, generate, FLOPs, backends."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import avatarl.model as model_module
from avatarl.model import GPT, GPTConfig, RMSNorm, apply_rotary, attention_backend_available

ATOL_FP32 = 1e-5  # KV-cache vs full recompute in float32: same math, only summation order differs


def small_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=65, block_size=40, n_layer=2, n_head=4, n_emb=32, use_flash_attn=False)
    return GPTConfig(**{**base, **overrides})


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(small_config()).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 65, (batch, length), generator=g)


def test_logits_shape(model: GPT):
    assert model(tokens(3, 17)).shape == (3, 17, 65)


def test_head_is_tied_to_embedding(model: GPT):
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    # counted once: 65*32 embedding, per layer 2 norms + qkv + proj + fc + fc-proj, final norm
    per_layer = 2 * 32 + 3 * 32 * 32 + 32 * 32 + 4 * 32 * 32 + 4 * 32 * 32
    assert model.num_params() == 65 * 32 + 2 * per_layer + 32


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    big = GPT(GPTConfig(vocab_size=65, block_size=8, n_layer=8, n_head=4, n_emb=128, use_flash_attn=False))
    assert big.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert big.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / 4.0, rel=0.05)  # 1/sqrt(2*8)


def test_causal(model: GPT):
    idx = tokens(2, 20)
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 65
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4  # the change is visible from position 12 on


def test_rotary_makes_order_matter(model: GPT):
    idx = tokens(1, 10)
    swapped = idx[:, [1, 0, *range(2, 10)]]
    assert (model(idx)[:, -1] - model(swapped)[:, -1]).abs().max() > 1e-4


def test_rotary_is_the_rotation_of_each_pair_of_halves():
    # the written-out rotation of the pairs (x1_j, x2_j) by t theta_j: the same float32 bits as apply_rotary
    B, T, H, D = 3, 9, 4, 8
    x = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(0))
    theta = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    angle = torch.outer(torch.arange(T, dtype=torch.float32), theta)[:, None, :]  # [T, 1, D/2]
    x1, x2 = x.chunk(2, dim=-1)
    expected = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()), dim=-1)
    tables = GPT(GPTConfig(vocab_size=5, block_size=T, n_layer=1, n_head=H, n_emb=H * D,
                           use_flash_attn=False))
    cos, sin = tables.cos, tables.sin
    assert cos.shape == sin.shape == (T, H, D) and cos.dtype == torch.float32
    assert torch.equal(apply_rotary(x, cos, sin), expected)
    # in bf16 the tables are used in bf16 too, and the result stays bf16, a few bf16 ulps from float32
    rotated = apply_rotary(x.bfloat16(), cos.bfloat16(), sin.bfloat16())
    assert rotated.dtype == torch.bfloat16
    torch.testing.assert_close(rotated.float(), expected, rtol=2e-2, atol=2e-2)


def test_rotary_runs_in_the_compute_dtype_under_autocast(model: GPT, monkeypatch: pytest.MonkeyPatch):
    seen = []
    original = model_module.apply_rotary

    def spy(x, cos, sin):
        y = original(x, cos, sin)
        seen.append((x.dtype, cos.dtype, y.dtype))
        return y

    monkeypatch.setattr(model_module, "apply_rotary", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens(2, 8))
    # q and k come out of the bf16 matmul and are rotated in bf16 with float32 tables cast to it: no
    # round trip
    rotated_in_bf16 = (torch.bfloat16, torch.float32, torch.bfloat16)
    assert len(seen) == 2 * 2 and all(dtypes == rotated_in_bf16 for dtypes in seen)


def test_rmsnorm_matches_the_formula_forward_and_backward(monkeypatch: pytest.MonkeyPatch):
    norm = RMSNorm(32)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 32))
    x = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(0)) * 3

    def run() -> tuple[torch.Tensor, ...]:
        xi = x.clone().requires_grad_()
        y = norm(xi)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view_as(y))
        grads = (xi.grad, norm.weight.grad.clone())
        norm.weight.grad = None
        return (y.detach(), *grads)

    fused = run()
    monkeypatch.delattr(model_module.F, "rms_norm")  # torch < 2.4: the written-out formula
    formula = run()
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.detach()
    torch.testing.assert_close(formula[0], expected, rtol=0, atol=0)
    for got, want in zip(fused, formula, strict=True):  # the same bits in float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_state_dict_names_are_the_parameters_only(model: GPT):
    # the rotary tables are non-persistent buffers: checkpoints hold the same names as before
    names = set(model.state_dict())
    assert {name for name, _ in model.named_parameters()} | {"lm_head.weight"} <= names
    assert not any(name.rsplit(".", 1)[-1] in ("cos", "sin") for name in names)
    assert {"blocks.0.norm1.weight", "blocks.1.attn.qkv.weight", "norm_f.weight"} <= names


@pytest.mark.parametrize("batch", [1, 3])
def test_kv_cache_one_token_at_a_time_matches_recompute(model: GPT, batch: int):
    idx = tokens(batch, 40)
    cache = model.new_cache(batch)
    prefill = model(idx[:, :32], cache)
    assert cache.pos == 32
    torch.testing.assert_close(prefill, model(idx[:, :32]), rtol=0, atol=ATOL_FP32)
    for t in range(32, 40):
        step = model(idx[:, t:t + 1], cache)[:, -1]
        full = model(idx[:, :t + 1])[:, -1]
        torch.testing.assert_close(step, full, rtol=0, atol=ATOL_FP32)
    assert cache.pos == 40


@pytest.mark.parametrize("batch", [1, 2])
def test_kv_cache_multi_token_chunk_matches_recompute(model: GPT, batch: int):
    idx = tokens(batch, 40)
    cache = model.new_cache(batch)
    model(idx[:, :32], cache)
    chunk = model(idx[:, 32:37], cache)  # 5 queries against 37 keys: needs the bottom-right causal mask
    torch.testing.assert_close(chunk, model(idx[:, :37])[:, 32:], rtol=0, atol=ATOL_FP32)
    last = model(idx[:, 37:38], cache)[:, -1]
    torch.testing.assert_close(last, model(idx[:, :38])[:, -1], rtol=0, atol=ATOL_FP32)


def test_kv_cache_reset_and_overflow(model: GPT):
    idx = tokens(2, 40)
    cache = model.new_cache(2, max_len=36)
    assert cache.k.dtype == torch.float32 and cache.k.shape == (2, 2, 36, 4, 8)
    model(idx[:, :30], cache)
    with pytest.raises(ValueError):
        model(idx[:, 30:40], cache)  # 40 > max_len
    cache.reset()
    assert cache.pos == 0
    torch.testing.assert_close(model(idx[:, :36], cache), model(idx[:, :36]), rtol=0, atol=ATOL_FP32)
    with pytest.raises(ValueError):
        model(tokens(1, 41))  # longer than block_size: no rotary table for it


def shared_prefix_case(model: GPT, n_prefix: int = 3, group: int = 4, prefix_len: int = 32,
                       cont_len: int = 7):
    """(prefix [P, prefix_len], continuations [P*group, cont_len], full rows
    [P*group, prefix_len + cont_len])."""
    prefix, cont = tokens(n_prefix, prefix_len, seed=2), tokens(n_prefix * group, cont_len, seed=3)
    return prefix, cont, torch.cat((prefix.repeat_interleave(group, dim=0), cont), dim=1)


@pytest.mark.parametrize("cont_len", [7, 1, 0])
def test_shared_prefix_forward_matches_full_rows(model: GPT, cont_len: int):
    prefix, cont, full = shared_prefix_case(model, cont_len=cont_len)
    shared = model(cont, prefix=prefix)
    assert shared.shape == (12, 1 + cont_len, 65)
    torch.testing.assert_close(shared, model(full)[:, 31:], rtol=0, atol=ATOL_FP32)


def test_shared_prefix_gradients_match_full_rows():
    torch.manual_seed(0)
    # trainable, fp32: gradients of every weight, prefix ones summed over K
    model = GPT(small_config(n_emb=64))
    prefix, cont, full = shared_prefix_case(model)
    weights = torch.randn(12, 8, 65, generator=torch.Generator().manual_seed(4))
    params = list(model.parameters())
    expected = torch.autograd.grad((model(full)[:, 31:] * weights).sum(), params)
    got = torch.autograd.grad((model(cont, prefix=prefix) * weights).sum(), params)
    for (name, _), e, g in zip(model.named_parameters(), expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()), msg=name)


def test_shared_prefix_forward_compiles_without_graph_breaks(model: GPT):
    # USE_TORCH_COMPILE compiles the student, and the GRPO update calls it with prefix=: fullgraph=True
    # fails on any graph break; aot_eager traces like inductor without generating C++ (seconds, not minutes)
    prefix, cont, _ = shared_prefix_case(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(cont, prefix=prefix), model(cont, prefix=prefix), rtol=0,
                               atol=ATOL_FP32)


def test_shared_prefix_rejects_rows_that_do_not_group(model: GPT):
    with pytest.raises(ValueError, match="do not split into groups"):
        model(tokens(10, 3), prefix=tokens(4, 5))
    with pytest.raises(ValueError, match="exceed block_size"):
        model(tokens(4, 10), prefix=tokens(2, 31))


def test_new_cache_follows_autocast_dtype(model: GPT):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.new_cache(1).k.dtype == torch.bfloat16
    assert model.new_cache(1, dtype=torch.float16).k.dtype == torch.float16


def test_generate_is_seeded_and_respects_length(model: GPT):
    idx = tokens(2, 10)

    def sample(seed: int) -> torch.Tensor:
        return model.generate(idx, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    out = sample(5)
    assert out.shape == (2, 22)
    assert torch.equal(out[:, :10], idx)
    assert torch.equal(out, sample(5))
    assert not torch.equal(out, sample(6))
    assert torch.equal(model.generate(idx, 0), idx)


def test_generate_top_k_samples_only_top_k(model: GPT):
    idx = tokens(4, 10)
    out = model.generate(idx, 1, top_k=3, generator=torch.Generator().manual_seed(0))
    top3 = model(idx)[:, -1].topk(3).indices  # [4, 3]
    assert (out[:, -1:] == top3).any(dim=1).all()


@pytest.mark.parametrize("n_new", [8, 20])  # 20: 30 + 20 > block_size 40, so the window must slide
def test_generate_top_k_1_is_greedy_recompute(model: GPT, n_new: int):
    # top_k=1 with a random generator must equal argmax of a full, cropped recompute at every step
    idx = tokens(2, 10) if n_new == 8 else tokens(2, 30)
    out = model.generate(idx, n_new, top_k=1, generator=torch.Generator().manual_seed(0))
    ref = idx
    for _ in range(n_new):
        nxt = model(ref[:, -40:])[:, -1].argmax(-1, keepdim=True)
        ref = torch.cat((ref, nxt), dim=1)
    assert torch.equal(out, ref)
    assert torch.equal(model.generate(idx, n_new, temperature=0.0), ref)


def test_flops_per_token_formula(model: GPT):
    # 2,080 embedding + 2 layers x 12,352 + 32 final norm = 26,816 parameters (tied head counted once)
    assert model.num_params() == 26816
    # 6 * 26,816 = 160,896 ; 12 * 2 layers * 32 dims * 40 tokens = 30,720
    assert model.flops_per_token(40) == 160896 + 30720
    assert model.flops_per_token(8) == 160896 + 6144


def test_sdpa_backend_choice_and_cpu_fallback(monkeypatch: pytest.MonkeyPatch):
    assert GPT(small_config()).attention_backend == "sdpa"  # use_flash_attn=False

    calls = []
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_func = lambda *a, **k: calls.append(1)
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention_backend_available()
    torch.manual_seed(0)
    flashy = GPT(small_config(use_flash_attn=True))
    assert flashy.attention_backend == "flash-attn"
    torch.manual_seed(0)
    plain = GPT(small_config())
    idx = tokens(2, 12)
    torch.testing.assert_close(flashy(idx), plain(idx), rtol=0, atol=0)  # CPU fp32 call falls back to SDPA
    assert calls == []


def _flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_attn_matches_sdpa_bf16():
    if not _flash_attn_installed():
        pytest.skip("flash-attn not installed")
    torch.manual_seed(0)
    flash = GPT(small_config(use_flash_attn=True)).cuda().to(torch.bfloat16).eval()
    sdpa = GPT(small_config()).cuda().to(torch.bfloat16).eval()
    sdpa.load_state_dict(flash.state_dict())
    assert flash.attention_backend == "flash-attn"
    idx = tokens(3, 40).cuda()
    with torch.no_grad():
        torch.testing.assert_close(flash(idx), sdpa(idx), rtol=2e-2, atol=2e-2)
        cf, cs = flash.new_cache(3), sdpa.new_cache(3)
        flash(idx[:, :32], cf), sdpa(idx[:, :32], cs)
        torch.testing.assert_close(flash(idx[:, 32:37], cf), sdpa(idx[:, 32:37], cs), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("use_flash_attn", [False, True])
@pytest.mark.parametrize("autocast", [False, True])  # bf16 weights, or fp32 weights under bf16 autocast
def test_kv_cache_cuda_bf16(use_flash_attn: bool, autocast: bool):
    # bf16 keeps ~3 significant digits; logits here are O(0.1-1), so 3e-2 absolute is a few bf16 ulps
    if use_flash_attn and not _flash_attn_installed():
        pytest.skip("flash-attn not installed")
    torch.manual_seed(0)
    model = GPT(small_config(use_flash_attn=use_flash_attn)).cuda().eval()
    if not autocast:
        model = model.to(torch.bfloat16)
    idx = tokens(2, 40).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        cache = model.new_cache(2)
        assert cache.k.dtype == torch.bfloat16
        model(idx[:, :32], cache)
        chunk = model(idx[:, 32:35], cache)
        torch.testing.assert_close(chunk, model(idx[:, :35])[:, 32:], rtol=3e-2, atol=3e-2)
        for t in range(35, 40):
            step = model(idx[:, t:t + 1], cache)[:, -1]
            torch.testing.assert_close(step, model(idx[:, :t + 1])[:, -1], rtol=3e-2, atol=3e-2)
        out = model.generate(idx[:, :30], 15, top_k=5, generator=torch.Generator("cuda").manual_seed(0))
        assert out.shape == (2, 45) and out.is_cuda


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("use_flash_attn", [False, True])
def test_shared_prefix_cuda_bf16_autocast(use_flash_attn: bool):
    """The GRPO update's path on a GPU: bf16 autocast, flash-attn's bottom-right causal mask or SDPA's."""
    if use_flash_attn and not _flash_attn_installed():
        pytest.skip("flash-attn not installed")
    torch.manual_seed(0)
    model = GPT(small_config(use_flash_attn=use_flash_attn)).cuda()
    prefix, cont, full = (t.cuda() for t in shared_prefix_case(model))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        shared, expected = model(cont, prefix=prefix), model(full)[:, 31:]
        torch.testing.assert_close(shared, expected, rtol=3e-2, atol=3e-2)
        shared.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
