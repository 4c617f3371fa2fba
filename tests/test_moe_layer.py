"""Tests for the runtime MoE layer (trtlm.runtime.moe): every strategy against a plain per-token loop, a routing
example worked by hand, expert- and tensor-parallel splits, and transformers' MixtralSparseMoeBlock."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

try:
    from trtlm.runtime import moe
except ImportError:  # a checkout where core/ is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core" / "src"))
    from trtlm.runtime import moe

from trtlm.runtime.moe import NORMALIZE_NONE, NORMALIZE_RENORMALIZE, STRATEGIES, moe_forward, route

MODES = [NORMALIZE_NONE, NORMALIZE_RENORMALIZE]


# ----------------------------------------------------------------------------------------------------------------
# The reference: one token at a time, one expert at a time, plain Python floats (double precision).
# ----------------------------------------------------------------------------------------------------------------
def naive_moe(x, router_weight, fc, proj, top_k, mode, expert_offset=0):
    """Per-token loop, written to be obviously right rather than fast."""
    num_tokens, hidden = x.shape
    num_total = router_weight.shape[0]
    num_local = fc.shape[0]
    inter = fc.shape[1] // 2
    x, router_weight, fc, proj = (t.double().tolist() for t in (x, router_weight, fc, proj))
    out = [[0.0] * hidden for _ in range(num_tokens)]
    for t in range(num_tokens):
        logits = [sum(x[t][h] * router_weight[e][h] for h in range(hidden)) for e in range(num_total)]
        chosen = sorted(range(num_total), key=lambda e: -logits[e])[:top_k]
        if mode == NORMALIZE_NONE:  # softmax over all experts, keep the top k
            denom = sum(math.exp(logits[e]) for e in range(num_total))
        else:  # softmax over the chosen experts only
            denom = sum(math.exp(logits[e]) for e in chosen)
        for e in chosen:
            scale = math.exp(logits[e]) / denom
            el = e - expert_offset
            if not 0 <= el < num_local:
                continue  # another rank's expert
            act = []
            for i in range(inter):
                up = sum(fc[el][i][h] * x[t][h] for h in range(hidden))  # up rows first
                gate = sum(fc[el][inter + i][h] * x[t][h] for h in range(hidden))  # gate rows second
                act.append(gate / (1.0 + math.exp(-gate)) * up)  # silu(gate) * up
            for h in range(hidden):
                out[t][h] += scale * sum(proj[el][h][i] * act[i] for i in range(inter))
    return torch.tensor(out, dtype=torch.float64)


def make_weights(num_tokens=6, hidden=8, inter=6, experts=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    router_weight = torch.randn(experts, hidden, generator=g)  # large logits -> well separated top-k
    fc = torch.randn(experts, 2 * inter, hidden, generator=g) / math.sqrt(hidden)
    proj = torch.randn(experts, hidden, inter, generator=g) / math.sqrt(inter)
    return x.to(dtype), router_weight, fc.to(dtype), proj.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Routing worked by hand
# ----------------------------------------------------------------------------------------------------------------
# logits [2, 1, 0]: exp = [7.389056, 2.718282, 1.0], sum = 11.107338
#   softmax over all three = [0.665241, 0.244728, 0.090031]
#   softmax over the top two [2, 1] = [e/(e+1), 1/(e+1)] = [0.731059, 0.268941]
HAND_CASES = [
    (1, NORMALIZE_NONE, [0.665241], [0]),
    (1, NORMALIZE_RENORMALIZE, [1.0], [0]),
    (2, NORMALIZE_NONE, [0.665241, 0.244728], [0, 1]),
    (2, NORMALIZE_RENORMALIZE, [0.731059, 0.268941], [0, 1]),
    (3, NORMALIZE_NONE, [0.665241, 0.244728, 0.090031], [0, 1, 2]),
    (3, NORMALIZE_RENORMALIZE, [0.665241, 0.244728, 0.090031], [0, 1, 2]),
]


@pytest.mark.parametrize("top_k,mode,scales,ids", HAND_CASES)
def test_route_by_hand(top_k, mode, scales, ids):
    # Expert order scrambled, to check the ids refer to columns: logits of experts 0,1,2 are 1, 0, 2.
    got_scales, got_ids = route(torch.tensor([[1.0, 0.0, 2.0]]), top_k, mode)
    perm = [2, 0, 1]  # hand ids above are for logits [2, 1, 0]; map to the scrambled columns
    assert got_ids.dtype == torch.int64 and got_scales.dtype == torch.float32
    assert got_ids[0].tolist() == [perm[i] for i in ids]
    torch.testing.assert_close(got_scales[0], torch.tensor(scales), atol=1e-6, rtol=0)


def test_route_upcasts_bf16_logits():
    scales, _ = route(torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.bfloat16), 2, NORMALIZE_RENORMALIZE)
    assert scales.dtype == torch.float32
    torch.testing.assert_close(scales[0], torch.tensor([0.731059, 0.268941]), atol=1e-6, rtol=0)


# Whole layer by hand: H=2, I=1, three experts, x = [1, 0].
#   router rows [2,0], [1,0], [0,0]      -> logits [2, 1, 0]
#   expert e: up row [c_e, 0] with c = (1, 2, 3), gate row [1, 0], proj [[1], [-1]]
#   -> gate = 1, silu(1) = 0.731059, act_e = 0.731059 * c_e, y_e = [act_e, -act_e]
#   act = [0.731059, 1.462117, 2.193176]
#   top-2 RENORMALIZE: 0.731059*0.731059 + 0.268941*1.462117 = 0.534447 + 0.393224 = 0.927671
#   top-2 NONE:        0.665241*0.731059 + 0.244728*1.462117 = 0.486331 + 0.357821 = 0.844152
#   top-1 NONE:        0.665241*0.731059                                          = 0.486331
#   top-3 either:      0.486331 + 0.357821 + 0.090031*2.193176 = 0.844152 + 0.197454 = 1.041606
HAND_LAYER = [
    (2, NORMALIZE_RENORMALIZE, 0.927671),
    (2, NORMALIZE_NONE, 0.844152),
    (1, NORMALIZE_NONE, 0.486331),
    (1, NORMALIZE_RENORMALIZE, 0.731059),
    (3, NORMALIZE_NONE, 1.041606),
    (3, NORMALIZE_RENORMALIZE, 1.041606),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("top_k,mode,expected", HAND_LAYER)
def test_layer_by_hand(strategy, top_k, mode, expected):
    x = torch.tensor([[1.0, 0.0]])
    router_weight = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    fc = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[2.0, 0.0], [1.0, 0.0]], [[3.0, 0.0], [1.0, 0.0]]])  # [E, 2I=2, H]
    proj = torch.tensor([[[1.0], [-1.0]]] * 3)  # [E, H, I=1]
    out = moe_forward(x, router_weight, fc, proj, top_k, mode, strategy=strategy)
    torch.testing.assert_close(out, torch.tensor([[expected, -expected]]), atol=2e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Every strategy == the per-token loop
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", [None, *STRATEGIES])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("top_k", [1, 2, 4])  # 4 == E: every expert
def test_strategies_match_naive(strategy, mode, top_k):
    x, router_weight, fc, proj = make_weights(num_tokens=7, experts=4, seed=top_k)
    ref = naive_moe(x, router_weight, fc, proj, top_k, mode)
    out = moe_forward(x, router_weight, fc, proj, top_k, mode, strategy=strategy)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_single_token_and_leading_dims(strategy):
    x, router_weight, fc, proj = make_weights(num_tokens=6, experts=8, seed=3)
    ref = naive_moe(x, router_weight, fc, proj, 2, NORMALIZE_RENORMALIZE)
    one = moe_forward(x[:1], router_weight, fc, proj, 2, NORMALIZE_RENORMALIZE, strategy=strategy)
    torch.testing.assert_close(one.double(), ref[:1], atol=1e-5, rtol=0)
    batched = moe_forward(x.view(2, 3, -1), router_weight, fc, proj, 2, NORMALIZE_RENORMALIZE, strategy=strategy)
    assert batched.shape == (2, 3, x.shape[-1])
    torch.testing.assert_close(batched.reshape(6, -1).double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_input(strategy):
    x, router_weight, fc, proj = make_weights(num_tokens=0)
    assert moe_forward(x, router_weight, fc, proj, 2, NORMALIZE_RENORMALIZE, strategy=strategy).shape == (0, 8)


# ----------------------------------------------------------------------------------------------------------------
# Parallel splits
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("top_k", [1, 2, 6])
def test_expert_parallel_sum(strategy, ranks, top_k):
    x, router_weight, fc, proj = make_weights(num_tokens=9, experts=6, seed=10 + top_k)
    full = moe_forward(x, router_weight, fc, proj, top_k, NORMALIZE_RENORMALIZE, strategy=strategy)
    per = 6 // ranks
    parts = [
        moe_forward(x, router_weight, fc[r * per : (r + 1) * per], proj[r * per : (r + 1) * per], top_k,
                    NORMALIZE_RENORMALIZE, expert_offset=r * per, strategy=strategy)
        for r in range(ranks)
    ]
    torch.testing.assert_close(sum(parts), full, atol=1e-6, rtol=0)
    ref = naive_moe(x, router_weight, fc[:per], proj[:per], top_k, NORMALIZE_RENORMALIZE, expert_offset=0)
    torch.testing.assert_close(parts[0].double(), ref, atol=1e-5, rtol=0)
    ref = naive_moe(x, router_weight, fc[per : 2 * per], proj[per : 2 * per], top_k, NORMALIZE_RENORMALIZE, per)
    torch.testing.assert_close(parts[1].double(), ref, atol=1e-5, rtol=0)


def test_expert_parallel_rank_with_no_tokens():
    """A rank whose experts nobody picked returns exact zeros (all strategies)."""
    x, router_weight, fc, proj = make_weights(num_tokens=5, experts=4, seed=2)
    router_weight.zero_()
    router_weight[0, 0] = router_weight[1, 0] = 1.0
    x[:, 0] = 50.0  # logits [50, 50, 0, 0]: experts 0 and 1 always win, rank 1 (experts 2, 3) gets nothing
    for strategy in STRATEGIES:
        out = moe_forward(x, router_weight, fc[2:], proj[2:], 2, NORMALIZE_RENORMALIZE, 2, strategy=strategy)
        assert torch.equal(out, torch.zeros_like(x)), strategy


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("tp", [2, 3])
def test_expert_tensor_parallel_sum(strategy, tp):
    x, router_weight, fc, proj = make_weights(num_tokens=8, inter=6, experts=4, seed=21)
    full = moe_forward(x, router_weight, fc, proj, 2, NORMALIZE_RENORMALIZE, strategy=strategy)
    up, gate = fc.chunk(2, dim=1)
    step = 6 // tp
    parts = []
    for r in range(tp):
        sl = slice(r * step, (r + 1) * step)
        fc_r = torch.cat([up[:, sl], gate[:, sl]], dim=1).contiguous()  # this rank's up slice, then gate slice
        proj_r = proj[:, :, sl].contiguous()
        parts.append(moe_forward(x, router_weight, fc_r, proj_r, 2, NORMALIZE_RENORMALIZE, strategy=strategy))
    torch.testing.assert_close(sum(parts), full, atol=1e-6, rtol=0)


def test_expert_and_tensor_parallel_together():
    x, router_weight, fc, proj = make_weights(num_tokens=8, inter=4, experts=4, seed=5)
    ref = naive_moe(x, router_weight, fc, proj, 2, NORMALIZE_RENORMALIZE)
    up, gate = fc.chunk(2, dim=1)
    total = torch.zeros_like(x)
    for ep in range(2):
        ex = slice(2 * ep, 2 * ep + 2)
        for tp in range(2):
            sl = slice(2 * tp, 2 * tp + 2)
            fc_r = torch.cat([up[ex, sl], gate[ex, sl]], dim=1)
            total += moe_forward(x, router_weight, fc_r, proj[ex][:, :, sl].contiguous(), 2,
                                 NORMALIZE_RENORMALIZE, expert_offset=2 * ep)
    torch.testing.assert_close(total.double(), ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Strategy selection, and no data-dependent shapes where capture matters
# ----------------------------------------------------------------------------------------------------------------
def test_select_strategy():
    # Mixtral 8x7B: E=8, k=2.
    assert moe.select_strategy(1, 2, 8) == "gather"
    assert moe.select_strategy(2, 2, 8) == "dense"
    assert moe.select_strategy(64, 2, 8) == "dense"
    assert moe.select_strategy(moe.DENSE_MAX_TOKENS, 2, 8) == "dense"
    assert moe.select_strategy(moe.DENSE_MAX_TOKENS + 1, 2, 8) == "sorted"
    assert moe.select_strategy(4096, 2, 8) == "sorted"
    # Expert-parallel rank of Mixtral with 4 experts: a gathered copy per pair no longer pays.
    assert moe.select_strategy(1, 2, 4) == "dense"
    # Many small experts.
    assert moe.select_strategy(3, 6, 64) == "gather"
    with pytest.raises(ValueError):
        moe_forward(*make_weights(), 2, NORMALIZE_RENORMALIZE, strategy="loop")


@pytest.mark.parametrize("strategy", ["gather", "dense"])
@pytest.mark.parametrize("expert_offset", [0, 2])
def test_graph_safe_strategies_run_on_meta(strategy, expert_offset):
    """Meta tensors carry no values: any host sync (.item(), .tolist(), nonzero, data-dependent shapes) raises.

    So running on 'meta' is a CPU proxy for "CUDA-graph capturable"; the sorted strategy must fail here.
    """
    x, router_weight, fc, proj = (t.to("meta") for t in make_weights(experts=4))
    fc_l, proj_l = (fc[:2], proj[:2]) if expert_offset else (fc, proj)
    out = moe_forward(x, router_weight, fc_l, proj_l, 2, NORMALIZE_RENORMALIZE, expert_offset, strategy=strategy)
    assert out.shape == x.shape and out.device.type == "meta"


def test_sorted_needs_values():
    x, router_weight, fc, proj = (t.to("meta") for t in make_weights())
    with pytest.raises((RuntimeError, NotImplementedError)):
        moe_forward(x, router_weight, fc, proj, 2, NORMALIZE_RENORMALIZE, strategy="sorted")


def test_bad_shapes():
    x, router_weight, fc, proj = make_weights()
    with pytest.raises(ValueError):
        moe_forward(x, router_weight, fc, proj[:, :, :-1], 2, NORMALIZE_RENORMALIZE)
    with pytest.raises(ValueError):
        moe_forward(x, router_weight, fc[:2], proj[:2], 2, NORMALIZE_RENORMALIZE, expert_offset=3)
    with pytest.raises(ValueError):
        moe_forward(x, router_weight, fc, proj, 5, NORMALIZE_RENORMALIZE)
    with pytest.raises(ValueError):
        route(torch.zeros(2, 4), 2, 7)


# ----------------------------------------------------------------------------------------------------------------
# transformers' MixtralSparseMoeBlock (transformers 5: experts fused as gate_up_proj [E, 2I, H], GATE first)
# ----------------------------------------------------------------------------------------------------------------
def hf_block(experts=8, top_k=2, hidden=32, inter=48, seed=0, implementation="eager", dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("needs transformers 5's fused experts (gate_up_proj)")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                           num_experts_per_tok=top_k)
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(experts, hidden, generator=g) / math.sqrt(hidden))
        block.experts.gate_up_proj.copy_(torch.randn(experts, 2 * inter, hidden, generator=g) / math.sqrt(hidden))
        block.experts.down_proj.copy_(torch.randn(experts, hidden, inter, generator=g) / math.sqrt(inter))
    return block.to(dtype)


def to_trtllm(block):
    """HF fused experts -> (router_weight float32, fc = cat(up, gate), proj)."""
    gate_up = block.experts.gate_up_proj.detach()
    gate, up = gate_up.chunk(2, dim=1)  # transformers: gate rows first
    fc = torch.cat([up, gate], dim=1).contiguous()  # TensorRT-LLM: up (w3) rows first
    return block.gate.weight.detach().float(), fc, block.experts.down_proj.detach().contiguous()


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("strategy", [None, *STRATEGIES])
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_matches_transformers_float32(implementation, strategy, top_k):
    block = hf_block(top_k=top_k, implementation=implementation)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = block(x)
    router_weight, fc, proj = to_trtllm(block)
    out = moe_forward(x, router_weight, fc, proj, top_k, NORMALIZE_RENORMALIZE, strategy=strategy)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_transformers_bf16(strategy):
    """bf16: same routing (router GEMM in bf16 like transformers), same cast points; only GEMM blocking differs."""
    block = hf_block(implementation="grouped_mm", dtype=torch.bfloat16)
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        expected = block(x)
    router_weight, fc, proj = to_trtllm(block)
    out = moe_forward(x, router_weight, fc, proj, 2, NORMALIZE_RENORMALIZE, strategy=strategy,
                      router_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    # One bf16 ulp of the output magnitude (|y| ~ 1): 2**-7.
    torch.testing.assert_close(out.float(), expected.float(), atol=2**-7, rtol=0)
    # Default float32 router (TensorRT-LLM's): may flip near-tied choices, so compare loosely on average.
    out32 = moe_forward(x, router_weight, fc, proj, 2, NORMALIZE_RENORMALIZE, strategy=strategy)
    assert (out32.float() - expected.float()).abs().mean() < 2e-2


# ----------------------------------------------------------------------------------------------------------------
# CUDA only (skipped in CI): the graph-safe strategies capture and replay
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy,num_tokens", [("gather", 4), ("dense", 4), (None, 1), (None, 300)])
def test_cuda_graph_capture(strategy, num_tokens):
    """gather/dense capture; so does the default at any size (it must not pick sorted while capturing)."""
    x, router_weight, fc, proj = (t.cuda() for t in make_weights(num_tokens=num_tokens, experts=8))
    ref = moe_forward(x, router_weight, fc, proj, 2, NORMALIZE_RENORMALIZE, strategy="sorted")
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moe_forward(static_x, router_weight, fc, proj, 2, NORMALIZE_RENORMALIZE, strategy=strategy)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            static_out = moe_forward(static_x, router_weight, fc, proj, 2, NORMALIZE_RENORMALIZE, strategy=strategy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    torch.testing.assert_close(static_out, ref, atol=1e-5, rtol=0)
    static_x.copy_(-x)
    graph.replay()
    ref2 = moe_forward(-x, router_weight, fc, proj, 2, NORMALIZE_RENORMALIZE, strategy="sorted")
    torch.testing.assert_close(static_out, ref2, atol=1e-5, rtol=0)
