"""Tests of the static decode step (GPT.decode_at) and the CUDA-graph rollout (USE_CUDA_GRAPHS).

On a CPU the Decoder runs its static step eagerly (capture=False); the GPU-marked tests capture and
replay the graph, including after the old policy's weights are refreshed in place.
"""

from __future__ import annotations

import pytest
import torch

from avatarl.algorithms.grpo import rollout
from avatarl.cuda_graphs import GraphedDecoding
from avatarl.model import GPT, GPTConfig
from tests.helpers import run_cli

ATOL_FP32 = 1e-5


def tiny_gpt(seed: int, device: str = "cpu") -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=65, block_size=40, n_layer=2, n_head=4, n_emb=32, use_flash_attn=False))
    with torch.no_grad():  # sharper than the 0.02 init, so samples depend on the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    return model.to(device).eval()


def contexts(batch: int, length: int, device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, 65, (batch, length), generator=torch.Generator().manual_seed(3)).to(device)


def test_decode_at_matches_the_cached_forward():
    model, idx = tiny_gpt(0), contexts(3, 40)
    with torch.no_grad():
        moving, static = model.new_cache(3), model.new_cache(3)
        model(idx[:, :30], moving), model(idx[:, :30], static)
        for t in range(30, 40):
            expected = model(idx[:, t:t + 1], moving)[:, -1]
            torch.testing.assert_close(model.decode_at(idx[:, t:t + 1], static, torch.tensor(t)), expected,
                                       rtol=0, atol=ATOL_FP32)
        torch.testing.assert_close(static.k, moving.k, rtol=0, atol=ATOL_FP32)
        assert static.pos == 30  # decode_at never advances the host-side position


def assert_same_rollout(model: GPT, graphs: GraphedDecoding, ctx: torch.Tensor, atol: float) -> None:
    eager = rollout(model, ctx, 4, 8, 1.3, torch.Generator(ctx.device).manual_seed(5))
    graphed = rollout(model, ctx, 4, 8, 1.3, torch.Generator(ctx.device).manual_seed(5), graphs)
    assert torch.equal(graphed.samples, eager.samples)
    torch.testing.assert_close(graphed.old_logp, eager.old_logp, rtol=0, atol=atol)


def test_static_decoder_rollout_equals_the_eager_rollout_and_follows_weight_refreshes():
    model = tiny_gpt(0)
    graphs = GraphedDecoding(model, capture=False)
    assert_same_rollout(model, graphs, contexts(3, 32), ATOL_FP32)
    first = graphs.decoder
    model.load_state_dict(tiny_gpt(1).state_dict())  # the old-policy refresh: in place, same tensors
    assert_same_rollout(model, graphs, contexts(3, 32), ATOL_FP32)
    assert graphs.decoder is first  # same shape: the decoder (on CUDA, its graph) is reused
    assert_same_rollout(model, graphs, contexts(5, 32), ATOL_FP32)
    assert graphs.decoder is not first and graphs.decoder.cache.batch_size == 20  # new shape: a new decoder


def test_decoder_copies_each_prefilled_row_to_its_samples():
    model = tiny_gpt(0)
    with torch.no_grad():
        prefilled = model.new_cache(3, max_len=39)
        model(contexts(3, 32), prefilled)
        decoder = GraphedDecoding(model, capture=False).prepare(prefilled, 4)
    for row in range(12):
        for cached, source in ((decoder.cache.k, prefilled.k), (decoder.cache.v, prefilled.v)):
            torch.testing.assert_close(cached[:, row, :32], source[:, row // 4, :32], rtol=0, atol=0)


def test_training_with_cuda_graphs_on_a_cpu_says_it_decodes_eagerly(tiny_env, tmp_path):
    result = run_cli(["train"], tmp_path, **tiny_env, USE_CUDA_GRAPHS="true")
    assert result.returncode == 0, result.stderr
    expected = "USE_CUDA_GRAPHS: rollout decode steps eager (CUDA graphs need CUDA)"
    assert expected in result.stdout + result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [False, True])
def test_captured_graph_rollout_equals_eager_and_sees_refreshed_weights(autocast: bool):
    model, ctx = tiny_gpt(0, "cuda"), contexts(16, 32, "cuda")
    graphs = GraphedDecoding(model, capture=True)

    def both() -> tuple:
        eager = rollout(model, ctx, 4, 8, 1.3, torch.Generator("cuda").manual_seed(5))
        graphed = rollout(model, ctx, 4, 8, 1.3, torch.Generator("cuda").manual_seed(5), graphs)
        if autocast:  # bf16 rounding differs between the two attention paths and may flip a near-tie draw
            assert (graphed.samples == eager.samples).float().mean().item() > 0.95
        else:
            assert torch.equal(graphed.samples, eager.samples)
            torch.testing.assert_close(graphed.old_logp, eager.old_logp, rtol=0, atol=ATOL_FP32)
        assert torch.isfinite(graphed.old_logp).all()
        return graphed, graphs.decoder.graph

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        before, graph = both()
        assert graph is not None
        model.load_state_dict(tiny_gpt(1, "cuda").state_dict())  # the old-policy refresh, in place
        after, replayed = both()
    assert replayed is graph  # the same graph replayed, not captured again
    assert not torch.equal(after.samples, before.samples)  # and it read the new weights
