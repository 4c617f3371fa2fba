"""Quantized linear execution: kernel dispatch, the emulation fallback, routed-expert MoE, byte counts.

CPU tests cover the dispatch decision (:func:`trtlm.quant.kernels.choose_path`), the emulation
fallback every format takes without a fast kernel, the quantized MoE reading only routed experts and
the roofline byte count.  The Triton kernel itself is checked on the CPU through Triton's
interpreter when the ``triton`` package is installed, and every fast kernel is checked against the
emulation on CUDA (skipped without a GPU).

Tolerances: outputs are bfloat16; the fast paths multiply the exact integer/fp8 codes and apply
the float32 scales to partial sums, while the emulation first rounds the dequantized weight to
bfloat16 (2**-9 relative per element), and accumulation order differs.  Both errors are a few
bfloat16 ulps of the output at most, so ``max|fast - emulation| <= 2**-6 * max|emulation|``; a
wrong scale, nibble order or group index gives errors of order 1.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from trtlm.quant import formats as qf
from trtlm.quant import kernels as qk
from trtlm.quant import schemes
from trtlm.quant.runtime import QuantExpertWeights, QuantLinear, kernel_paths, prepare_model, quant_moe_forward
from trtlm.quant.w4_gemv import w4_gemv_available

TOL = 2.0 ** -6
FORMATS = {
    "fp8": {"quant_algo": "FP8"},
    "int8-wo": {"quant_algo": "W8A16"},
    "int4-wo": {"quant_algo": "W4A16_AWQ", "group_size": 64, "pre_quant_scale": False},
    "int4-awq": {"quant_algo": "W4A16_AWQ", "group_size": 64, "pre_quant_scale": True},
    "int8-sq": {"quant_algo": "W8A8_SQ_PER_CHANNEL"},
}


def _fill_linear(m: QuantLinear, name: str, gen: torch.Generator) -> None:
    """Real quantized tensors (trtlm.quant.formats) of a random weight into ``m``'s buffers."""
    dev = m.weight.device
    w = torch.randn(m.out_features, m.in_features, generator=gen).to(dev) * 0.05
    b = dict(m.named_buffers())
    with torch.no_grad():
        p = (torch.rand(m.in_features, generator=gen) + 0.5).to(dev)
        if name == "fp8":
            s = qf.fp8_weight_scale(w)
            b["weight"].copy_(qf.quantize_fp8(w, s))
            b["activation_scaling_factor"].copy_(qf.fp8_activation_scale(3.0))
        elif name == "int8-wo":
            s = qf.int8_weight_scale(w)
            b["weight"].copy_(qf.quantize_int8(w, s))
        elif name.startswith("int4"):
            ws = w / p if name == "int4-awq" else w
            s = qf.int4_group_scales(ws, m.group_size)
            b["weight"].copy_(qf.pack_int4(qf.quantize_int4(ws, s, m.group_size)))
            if name == "int4-awq":
                b["prequant_scaling_factor"].copy_(p.to(m.dtype))
        else:
            s = qf.int8_weight_scale(w / p)
            b["weight"].copy_(qf.quantize_int8(w / p, s))
            b["prequant_scaling_factor"].copy_(p.to(m.dtype))
            b["activation_scaling_factor"].copy_(torch.tensor([4.5 / 127]))
        b["weights_scaling_factor"].copy_(s)


def _linear(name: str, out_f: int, in_f: int, dtype, device, seed: int = 0) -> QuantLinear:
    q = FORMATS[name]
    m = QuantLinear(q["quant_algo"], {"quantization": q}, in_f, out_f, False, dtype, device)
    _fill_linear(m, name, torch.Generator().manual_seed(seed))
    return m


def _experts(name: str, E: int, out_f: int, in_f: int, dtype, device, seed: int) -> QuantExpertWeights:
    q = dict(FORMATS[name], pre_quant_scale=False)
    m = QuantExpertWeights(q["quant_algo"], {"quantization": q}, E, out_f, in_f, dtype, device)
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(E, out_f, in_f, generator=gen) * 0.05).to(device)
    b = dict(m.named_buffers())
    with torch.no_grad():
        if name == "fp8":
            s = qf.fp8_expert_weight_scale(w)
            b["weight"].copy_(qf.quantize_fp8(w, s))
            b["activation_scaling_factor"].copy_(qf.fp8_activation_scale(3.0))
        elif name.startswith("int8"):
            s = qf.int8_weight_scale(w)
            b["weight"].copy_(qf.quantize_int8(w, s))
            if name == "int8-sq":
                b["activation_scaling_factor"].copy_(torch.tensor([3.0 / 127]))
        else:
            s = qf.int4_group_scales(w, m.group_size)
            b["weight"].copy_(qf.pack_int4(qf.quantize_int4(w, s, m.group_size)))
        b["weights_scaling_factor"].copy_(s)
    return m


# ----------------------------------------------------------------------------- formats registry

def test_formats_registry_drives_cli_plan_and_runtime():
    from trtlm.commands.convert import QUANT_MODES
    from trtlm.family import ALL_QUANT
    from trtlm.quant.plan import QUANT_ALGOS
    from trtlm.quant.runtime import SUPPORTED

    assert QUANT_MODES == ALL_QUANT == schemes.names() == tuple(QUANT_ALGOS)
    assert set(SUPPORTED) == {f.quant_algo for f in schemes.FORMATS.values()}
    # what a linear stores is one declaration, shared by plan and runtime
    awq = schemes.get("int4-awq")
    assert awq.tensors(256, 512, group_size=128) == {
        "weight": ((128, 512), "int8"), "weights_scaling_factor": ((256, 4), "float32"),
        "prequant_scaling_factor": ((512,), None)}
    m = QuantLinear("W4A16_AWQ", {"quantization": {"quant_algo": "W4A16_AWQ", "group_size": 128,
                                                   "pre_quant_scale": True}}, 512, 256, dtype=torch.float16)
    assert {n: tuple(t.shape) for n, t in m.named_buffers()} == {
        n: shape for n, (shape, _) in awq.tensors(256, 512, group_size=128).items()}
    assert schemes.for_algo("W4A16_AWQ", {"quantization": {"pre_quant_scale": False}}).name == "int4-wo"
    assert schemes.get("int8-sq").tensors(8, 16, experts=4) == {
        "weight": ((4, 8, 16), "int8"), "weights_scaling_factor": ((4, 8), "float32"),
        "activation_scaling_factor": ((1,), "float32")}
    with pytest.raises(ValueError, match="already registered"):
        schemes.register(schemes.get("fp8"))


# ----------------------------------------------------------------------------- dispatch (CPU)

@pytest.mark.parametrize("fmt, cap, dtype, triton, want", [
    ("fp8", (9, 0), torch.bfloat16, True, qk.SCALED_MM),
    ("fp8", (8, 0), torch.bfloat16, True, qk.EMULATION),  # no FP8 before Ada
    ("int4-awq", (9, 0), torch.float16, True, qk.TRITON),
    ("int4-wo", (9, 0), torch.float16, False, qk.EMULATION),  # no Triton
    ("int8-wo", (8, 0), torch.bfloat16, True, qk.TRITON),
    ("int8-sq", (9, 0), torch.bfloat16, True, qk.INT_MM),
    ("int8-sq", (9, 0), torch.bfloat16, False, qk.INT_MM),
    ("int8-wo", (9, 0), torch.float32, True, qk.EMULATION),  # fp32 activations
    ("int8-wo", (7, 5), torch.float16, True, qk.EMULATION),
])
def test_choose_path(fmt, cap, dtype, triton, want):
    f = schemes.get(fmt)
    path, why = qk.choose_path(f.weight, f.activation, "cuda", cap, dtype, 4096, 4096, triton)
    assert path == want, why
    assert why  # always a reason for the one-line report
    assert qk.choose_path(f.weight, f.activation, "cpu", None, dtype, 4096, 4096, triton)[0] == qk.EMULATION
    assert qk.choose_path(f.weight, f.activation, "cuda", cap, dtype, 4096, 4104, triton)[0] == qk.EMULATION


@pytest.mark.parametrize("name", list(FORMATS))
def test_cpu_runs_the_emulation_and_says_so(name):
    m = _linear(name, 64, 128, torch.float32, "cpu")
    assert m.prepare() == qk.EMULATION and m.kernel_path == qk.EMULATION and "cpu" in m.kernel_reason
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    y = m(x)
    assert y.shape == (3, 5, 64)
    assert torch.equal(y, m.emulate(x))
    # and the emulation is the format's math: close to the float weight's product
    dense = m.dense_weight(torch.float32)
    assert (y - m.emulate(x)).abs().max() == 0 and torch.isfinite(dense).all()


def test_prepare_model_reports_each_layer_type_once():
    model = nn.Module()
    model.layers = nn.ModuleList()
    for i in range(2):
        layer = nn.Module()
        layer.attention = nn.Module()
        layer.attention.qkv = _linear("int8-wo", 32, 64, torch.float32, "cpu", seed=i)
        layer.mlp = nn.Module()
        layer.mlp.fc = _experts("int4-wo", 4, 32, 64, torch.float32, "cpu", seed=i)
        model.layers.append(layer)
    paths = prepare_model(model)
    assert set(paths) == {"attention.qkv", "mlp.fc (experts)"}
    assert all(p.startswith("emulation:") for p in paths.values())
    assert kernel_paths(model) == paths


# ----------------------------------------------------------------------------- MoE (CPU)

@pytest.mark.parametrize("name", ["fp8", "int8-wo", "int4-wo", "int8-sq"])
@pytest.mark.parametrize("tokens, strategy", [(1, "gather"), (6, "dense"), (300, "sorted")])
def test_quant_moe_equals_moe_forward_on_dense_weights(name, tokens, strategy, monkeypatch):
    """Same routing and combination as moe_forward; at decode sizes only routed experts are dequantized."""
    from trtlm.runtime.moe import moe_forward, select_strategy

    E, H, inter, k = 8, 64, 128, 2
    fc = _experts(name, E, 2 * inter, H, torch.float32, "cpu", seed=3)
    proj = _experts(name, E, H, inter, torch.float32, "cpu", seed=4)
    gen = torch.Generator().manual_seed(5)
    router = torch.randn(E, H, generator=gen)
    x = torch.randn(tokens, H, generator=gen)
    assert select_strategy(tokens, k, E) == strategy
    ref = moe_forward(fc.quantize_input(x), router, fc.dense(), proj.dense(), k, 1)
    if strategy == "gather":  # reading every expert is exactly what must not happen at decode
        monkeypatch.setattr(QuantExpertWeights, "dense", lambda *a, **kw: pytest.fail("dequantized all experts"))
    got = quant_moe_forward(x, router, fc, proj, k, 1)
    # float32 on the CPU: same dequantized values, same GEMM shapes per pair; 1e-5 covers BLAS blocking
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- roofline bytes

def test_weight_bytes_per_token_counts_stored_codes_and_scales():
    from trtlm.bench import weight_bytes_per_token

    model = nn.Module()
    model.vocab_embedding = nn.Embedding(100, 64)  # only the looked-up rows are read
    model.qkv = _linear("int4-awq", 128, 256, torch.float16, "cpu")
    model.dense = _linear("fp8", 64, 128, torch.float16, "cpu")
    int4 = 128 // 2 * 256 + 128 * (256 // 64) * 4 + 256 * 2  # packed codes + f32 group scales + f16 prequant
    fp8 = 64 * 128 + 4 + 4  # codes + weight scale + activation scale
    emb = 64 * 4
    assert weight_bytes_per_token(model) == int4 + fp8 + emb
    assert weight_bytes_per_token(model, batch=3) == int4 + fp8 + 3 * emb


# ----------------------------------------------------------------------------- Triton interpreter (CPU)

def _interpret(code: str) -> None:
    """Run ``code`` in a fresh interpreter with Triton's CPU interpreter on (it must print ``ok``)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a CUDA device runs the compiled kernels (the CUDA tests below); the interpreter is for "
                           "machines without one (Triton 3.6's interpreter also cannot index with a loaded scalar)")
def test_triton_kernel_in_interpreter():
    """The Triton kernel's arithmetic (nibble order, group scales, split-K, expert ids) on the CPU."""
    pytest.importorskip("triton", reason="needs the triton package (Triton's CPU interpreter runs the kernel)")
    code = textwrap.dedent("""
        import torch
        from trtlm.quant import formats as qf, kernels as qk
        torch.manual_seed(0)
        for wk, sk, g, experts, p in [("int4", "group", 64, 0, True), ("int8", "channel", 0, 0, False),
                                      ("fp8", "tensor", 0, 3, False), ("int4", "group", 128, 3, False)]:
            shape = (experts, 64, 256) if experts else (64, 256)
            w = torch.randn(*shape) * 0.05
            if wk == "int4":
                s = qf.int4_group_scales(w, g); q = qf.pack_int4(qf.quantize_int4(w, s, g))
                dense = qf.dequantize_int4(q, s, torch.float32)
            elif wk == "int8":
                s = qf.int8_weight_scale(w); q = qf.quantize_int8(w, s); dense = qf.dequantize_int8(q, s, torch.float32)
            else:
                s = qf.fp8_expert_weight_scale(w); q = qf.quantize_fp8(w, s); dense = qf.dequantize_fp8(q, s, torch.float32)
            x = torch.randn(3, 256).half()
            pq = (torch.rand(256) + 0.5).half() if p else None
            if experts:
                ids = torch.tensor([2, 0, 1, 1, 0, 2])
                y = qk.dequant_mm(x, q, s, weight_kind=wk, scale_kind=sk, group_size=g, expert_ids=ids,
                                  rows_per_id=2, out_features=64)
                ref = torch.bmm(dense[ids], x.float().repeat_interleave(2, 0).unsqueeze(-1)).squeeze(-1)
            else:
                y = qk.dequant_mm(x, q, s, weight_kind=wk, scale_kind=sk, group_size=g, prequant=pq)
                ref = (x.float() * (pq.float() if p else 1)) @ dense.t()
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            assert err <= 2 ** -8, (wk, sk, experts, err)  # fp16 output rounding
        print("ok")
    """)
    _interpret(code)


# ----------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fast kernels run only on CUDA)")


def _rel(y, ref) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("rows", [1, 5, 33])  # GEMV, tiled Triton GEMM / torch kernels, dequantize + cuBLAS
def test_fast_kernel_matches_emulation(name, rows):
    m = _linear(name, 512, 1024, torch.bfloat16, "cuda")
    path = m.prepare()
    f = schemes.get(name)
    want, _ = qk.linear_plan(f.weight, f.activation, "cuda", torch.bfloat16, 1024, 512)
    if want == qk.TRITON and f.weight == "int4":  # bfloat16 activations, group 64: tinygemm's shapes
        want = qk.W4 if w4_gemv_available(torch.device("cuda")) else qk.INT4PACK  # (and the tensor-core kernels')
    assert path == want
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    y, ref = m(x), m.emulate(x)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert _rel(y, ref) <= TOL, (path, _rel(y, ref))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fp8", "int8-wo", "int4-wo", "int8-sq"])
@pytest.mark.parametrize("tokens", [1, 16])
def test_fast_moe_matches_emulation(name, tokens):
    from trtlm.runtime.moe import moe_forward

    E, H, inter, k = 8, 256, 512, 2
    fc = _experts(name, E, 2 * inter, H, torch.bfloat16, "cuda", seed=3)
    proj = _experts(name, E, H, inter, torch.bfloat16, "cuda", seed=4)
    router = torch.randn(E, H, device="cuda")
    x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
    emulated = [qf.dequantize(m.algo, dict(m.named_buffers()), torch.bfloat16) for m in (fc, proj)]
    ref = moe_forward(fc.quantize_input(x), router, *emulated, k, 1)
    got = quant_moe_forward(x, router, fc, proj, k, 1)
    assert _rel(got, ref) <= TOL


@cuda
@pytest.mark.gpu
def test_alternative_kernels_match_emulation():
    """The measured alternatives stay correct too: tinygemm int4 (repacked once) and per-channel FP8."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs compute capability 8.9+ (FP8)")
    m = _linear("int4-awq", 512, 1024, torch.bfloat16, "cuda")
    x = torch.randn(2, 1024, device="cuda", dtype=torch.bfloat16)
    packed = qk.repack_int4pack(m.weight, m.weights_scaling_factor)
    y = qk.int4pack_mm(x, *packed, m.group_size, m.prequant_scaling_factor)
    assert _rel(y, m.emulate(x)) <= TOL
    w = torch.randn(256, 512, device="cuda") * 0.05
    s = qf.fp8_per_channel_scale(w)
    a = qf.fp8_activation_scale(3.0).cuda()
    xb = torch.randn(20, 512, device="cuda", dtype=torch.bfloat16)
    y = qk.fp8_scaled_mm(xb, qf.quantize_fp8(w, s), s, a)
    ref = torch.nn.functional.linear(qf.fake_quant_fp8(xb, a), qf.dequantize_fp8(qf.quantize_fp8(w, s), s, xb.dtype))
    assert _rel(y, ref) <= TOL


# ----------------------------------------------------------------------------- mixed-input GEMM (many rows)

def test_repack_for_mm_layout_and_config():
    """The repacked layout decoded by torch (no Triton): int4 word [i, n] holds rows k = 8i + j in
    bits 4j..4j+3 (signed nibbles), int8 is the transpose; scales [K/g, N].  And the tile rules."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * 0.05
    s = qf.int4_group_scales(w, 128)
    q = qf.quantize_int4(w, s, 128)
    mw = qk.repack_for_mm(qf.pack_int4(q), s, "int4", 128)
    assert mw.weight.dtype == torch.int32 and mw.weight.shape == (32, 64) and mw.scales.shape == (2, 64)
    assert (mw.in_features, mw.out_features) == (256, 64)
    nib = torch.stack([(mw.weight << (28 - 4 * j)) >> 28 for j in range(8)], dim=1)  # [K/8, 8, N], arithmetic >>
    assert torch.equal(nib.reshape(256, 64).t().to(torch.int8), q)
    assert torch.equal(mw.scales, s.t())
    s8 = qf.int8_weight_scale(w)
    m8 = qk.repack_for_mm(qf.quantize_int8(w, s8), s8, "int8")
    assert torch.equal(m8.weight, qf.quantize_int8(w, s8).t()) and m8.weight.is_contiguous()
    assert qk.mixed_mm_applies("int4", "group", 64, 4096, 128) and qk.mixed_mm_applies("int8", "channel", 64, 4096)
    assert not qk.mixed_mm_applies("int4", "group", qk.MIXED_MM_MIN_ROWS - 1, 4096, 128)
    for M, N, K, g in [(17, 4096, 4096, 128), (64, 4096, 14336, 128), (128, 14336, 4096, 0), (64, 512, 1024, 64)]:
        c = qk._mm_config(M, N, K, g)
        assert K % c["bk"] == 0 and (not g or g % c["bk"] == 0) and (K // c["bk"]) % c["split"] == 0, c
        assert c["bm"] >= 16 and c["split"] * 4 <= max(4, K // c["bk"])


MIXED_MM_CHECK = textwrap.dedent("""
    import torch
    from trtlm.quant import formats as qf, kernels as qk

    def check(name, N, K, rows, dtype, device, configs, group=128):
        g = torch.Generator().manual_seed(N + K)
        w = torch.randn(N, K, generator=g) * 0.05
        p = torch.rand(K, generator=g) + 0.5 if name == "int4-awq" else None
        if name.startswith("int4"):
            ws = w / p if p is not None else w
            s = qf.int4_group_scales(ws, group)
            codes = qf.pack_int4(qf.quantize_int4(ws, s, group))
            dense = qf.dequantize_int4(codes, s, torch.float32, p)  # the emulation's weight, prequant folded
            mw = qk.repack_for_mm(codes.to(device), s.to(device), "int4", group)
        else:
            s = qf.int8_weight_scale(w)
            codes = qf.quantize_int8(w, s)
            dense = qf.dequantize_int8(codes, s, torch.float32)
            mw = qk.repack_for_mm(codes.to(device), s.to(device), "int8")
        pq = p.to(dtype).to(device) if p is not None else None
        for M in rows:
            x = torch.randn(M, K, generator=g).to(dtype)
            ref = x.float() @ dense.t()
            for cfg in configs:
                y = qk.mixed_mm(x.to(device), mw, prequant=pq, config=cfg)
                assert y.dtype == dtype and y.shape == (M, N), (y.dtype, y.shape)
                err = ((y.float().cpu() - ref).abs().max() / ref.abs().max()).item()
                assert err <= 2 ** -6, (name, N, K, M, cfg, err)
""")


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a CUDA device runs the compiled kernel (test below); the interpreter is for machines without one")
def test_mixed_mm_in_interpreter():
    """``mixed_mm`` (int4-wo, int4-awq with prequant, int8-wo) under Triton's CPU interpreter, float16.

    Tolerance 2**-6 of max|ref| against the float32 product with the emulation's dequantized
    weight, as the CUDA tests: the kernel rounds the output to float16 (2**-11) and, for AWQ,
    ``x * prequant`` to float16 first (the module's rounding), where the reference folds prequant
    into the float32 weight; a wrong nibble, sign, group or scale index gives errors of order 1.
    Configs cover row masks (17, 100 rows), split-K with a part starting mid-group (K = 384,
    BK = 64, 3 steps per part), a column mask (N = 384, BN = 256) and BK = group = 64.
    """
    pytest.importorskip("triton", reason="needs the triton package (Triton's CPU interpreter runs the kernel)")
    code = MIXED_MM_CHECK + textwrap.dedent("""
        cfgs = [None, {"bm": 32, "bn": 64, "bk": 64, "split": 2}]
        for name in ("int4-wo", "int4-awq", "int8-wo"):
            check(name, 256, 512, (17, 64, 100), torch.float16, "cpu", cfgs)
            check(name, 384, 384, (17,), torch.float16, "cpu", [{"bm": 16, "bn": 256, "bk": 64, "split": 2}])
        check("int4-wo", 128, 256, (33,), torch.float16, "cpu", [None], group=64)
        print("ok")
    """)
    _interpret(code)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int4-wo", "int4-awq", "int8-wo"])
def test_mixed_mm_matches_emulation(name):
    """The compiled kernel, bfloat16, against the module's emulation (same tolerance as above)."""
    pytest.importorskip("triton", reason="needs Triton")
    m = _linear(name, 512, 1024, torch.bfloat16, "cuda")  # group 64 (FORMATS): BK 64
    wk = "int4" if name.startswith("int4") else "int8"
    p = getattr(m, "prequant_scaling_factor", None)
    for scale_dtype in (torch.float32, torch.bfloat16):
        mw = qk.repack_for_mm(m.weight, m.weights_scaling_factor, wk, m.group_size, scale_dtype=scale_dtype)
        for rows in (17, 64, 100, 256):
            x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
            for cfg in (None, {"bm": 64, "bn": 256, "bk": 64, "split": 1, "num_warps": 8, "num_stages": 3}):
                y = qk.mixed_mm(x, mw, prequant=p, config=cfg)
                assert y.dtype == torch.bfloat16 and _rel(y, m.emulate(x)) <= TOL, (rows, cfg, _rel(y, m.emulate(x)))


# ----------------------------------------------------------------------------- activation quantization
ACT_QUANT_CHECK = textwrap.dedent("""
    import torch
    from trtlm.quant import kernels as qk

    def reference(x, a, kind, p):
        xs = x * p.to(x.dtype) if p is not None else x
        y = xs.float() / a.float().reshape(())
        if kind == "fp8":
            return y.clamp(-448, 448).to(torch.float8_e4m3fn)
        return y.round().clamp(-128, 127).to(torch.int8)

    def run(device, kinds, force_triton=False):
        g = torch.Generator().manual_seed(0)
        for kind in kinds:
            for dtype in (torch.float16, torch.bfloat16) if device == "cuda" else (torch.float16,):
                for p_on in (False, True):
                    x = (3 * torch.randn(5, 1500, generator=g)).to(dtype)
                    x[0, :4] = torch.tensor([0.5, 1.5, -2.5, 1e4])  # ties (with a = 1) and a clamped value
                    a = torch.tensor([1.0 if kind == "int8" else 0.01])
                    p = (torch.rand(1500, generator=g) + 0.5).to(dtype) if p_on else None
                    x, a = x.to(device), a.to(device)
                    p = p.to(device) if p is not None else None
                    if force_triton:  # the interpreter: call the kernel directly on CPU tensors
                        M, K = x.shape
                        out = torch.empty((M, K), dtype=torch.int8)
                        qk._act_quant_kernel()[(M, 2)](x, p if p is not None else x, a.float(), out, K, x.stride(0),
                                                       out.stride(0), HAS_P=p is not None, KIND=1, BLOCK=1024)
                    else:
                        out = qk.quantize_activation(x, a, kind, p)
                    want = reference(x, a, kind, p)
                    assert out.dtype == want.dtype and out.shape == want.shape
                    # one IEEE division and one rounding each side; allow a code's step on a rounding
                    # boundary (torch may divide by a scalar through its reciprocal), never more
                    diff = (out.view(torch.int8).int() - want.view(torch.int8).int()).abs()
                    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3, (kind, dtype, p_on)
                    if kind == "int8" and not p_on:
                        assert out[0, :4].tolist()[:3] == [0, 2, -2] and int(out[0, 3]) == 127
        print("ok")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device runs the compiled kernel (test below)")
def test_activation_quant_kernel_in_interpreter():
    """The int8 path of the activation-quantization kernel (prequant multiply, IEEE division, ties
    to even, clamp) under Triton's CPU interpreter (fp8 casts need a GPU)."""
    pytest.importorskip("triton", reason="needs the triton package (Triton's CPU interpreter runs the kernel)")
    _interpret(ACT_QUANT_CHECK + "\nrun('cpu', ['int8'], force_triton=True)\n")


def test_activation_quant_cpu_is_the_reference():
    namespace: dict = {}
    exec(ACT_QUANT_CHECK, namespace)
    namespace["run"]("cpu", ["int8", "fp8"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_activation_quant_kernel_on_gpu():
    pytest.importorskip("triton", reason="needs Triton")
    namespace: dict = {}
    exec(ACT_QUANT_CHECK, namespace)
    namespace["run"]("cuda", ["int8", "fp8"])


# ----------------------------------------------------------------------------- one-row GEMV (decode, batch 1)

GEMV_CHECK = textwrap.dedent("""
    import torch
    from trtlm.quant import formats as qf
    from trtlm.quant.gemv import gemv

    def check(kind, N, K, dtype, device, quant_x=True, config=None, out_dtype=None):
        g = torch.Generator().manual_seed(N * 7 + K)
        w = torch.randn(N, K, generator=g) * 0.05
        x = torch.randn(1, K, generator=g).to(dtype)
        kw = {}
        if kind == "int8":
            s = qf.int8_weight_scale(w); codes = qf.quantize_int8(w, s); sk = "channel"
            dense = qf.dequantize_int8(codes, s, torch.float32); xr = x.float()
        elif kind.startswith("int4"):
            p = torch.rand(K, generator=g) + 0.5 if kind == "int4-awq" else None
            ws = w / p if p is not None else w
            s = qf.int4_group_scales(ws, 128); codes = qf.pack_int4(qf.quantize_int4(ws, s, 128)); sk = "group"
            dense = qf.dequantize_int4(codes, s, torch.float32); kw["group_size"] = 128
            xr = (x * p.to(dtype)).float() if p is not None else x.float()
            if p is not None:
                kw["prequant"] = p.to(dtype).to(device)
            kind = "int4"
        else:  # fp8, per tensor or per channel
            s = qf.fp8_per_channel_scale(w) if kind == "fp8-channel" else qf.fp8_weight_scale(w)
            sk = "channel" if kind == "fp8-channel" else "tensor"
            codes = qf.quantize_fp8(w, s); dense = qf.dequantize_fp8(codes, s, torch.float32)
            a = qf.fp8_activation_scale(3.0)
            kw["input_scale"] = a.to(device)
            xr = qf.dequantize_fp8(qf.quantize_fp8(x, a), a, torch.float32)
            if not quant_x:  # the codes the fused RMSNorm / SwiGLU kernels hand over
                x = qf.quantize_fp8(x, a)
            kind = "fp8"
        ref = xr @ dense.t()
        y = gemv(x.to(device), codes.to(device), s.to(device), weight_kind=kind, scale_kind=sk, config=config,
                 out_dtype=out_dtype, **kw)
        assert y.shape == (1, N) and y.dtype == (out_dtype or (dtype if x.dtype != torch.float8_e4m3fn
                                                                else torch.bfloat16)), (y.shape, y.dtype)
        err = ((y.float().cpu() - ref).abs().max() / ref.abs().max()).item()
        assert err <= 2 ** -7, (kind, N, K, dtype, config, err)
""")


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a CUDA device runs the compiled kernel (test below); the interpreter is for CPUs")
def test_gemv_in_interpreter():
    """The one-row GEMV's bit tricks (int8 and int4 codes to float by masking into 2^23's bit
    pattern, e4m3 codes moved into float32's fields), group scales, AWQ's pre-quant scale and the
    row mask (N = 200 is not a multiple of the 8- and 16-row tiles), under Triton's interpreter.

    Tolerance 2**-7 of max|ref| against the float32 product of the dequantized weight: the kernel
    rounds its output to float16/bfloat16 (2**-9 relative at worst) and otherwise differs only in
    summation order; a wrong bias, nibble, group or scale gives errors of order 1.  FP8 inputs are
    given as codes here: Triton 3.6's interpreter rounds float32 -> e4m3 wrongly when the rounding
    carries into the exponent (-126 becomes -64), so in-kernel quantization is checked on CUDA only.
    """
    pytest.importorskip("triton", reason="needs the triton package (Triton's CPU interpreter runs the kernel)")
    code = GEMV_CHECK + textwrap.dedent("""
        for kind in ("int8", "int4-wo", "int4-awq", "fp8", "fp8-channel"):
            check(kind, 200, 256, torch.float16, "cpu", quant_x=False, config={"bk": 128, "bn": 16})
        check("fp8", 64, 256, torch.float16, "cpu", quant_x=False, config={"bk": 128, "fp8_bits": 1})
        check("int8", 64, 512, torch.float16, "cpu", out_dtype=torch.float32)
        print("ok")
    """)
    _interpret(code)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_matches_the_dequantized_product(dtype):
    """The compiled GEMV, every weight kind, FP8 input quantized in the kernel or handed over as
    codes, the default tiles and the sweep's alternatives, int8 codes converted by ``prmt`` (the
    default on CUDA) or by masking (same tolerance as the interpreter test)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs compute capability 8.9+ (FP8)")
    exec(compile(GEMV_CHECK, "GEMV_CHECK", "exec"), ns := {})
    check = ns["check"]
    for kind in ("int8", "int4-wo", "int4-awq", "fp8", "fp8-channel"):
        for N, K in ((200, 1024), (6144, 4096), (4096, 14336)):
            check(kind, N, K, dtype, "cuda")
            if kind.startswith("fp8"):
                check(kind, N, K, dtype, "cuda", quant_x=False, out_dtype=torch.float32)
    for cfg in ({"bn": 4, "bk": 512}, {"bn": 16, "bk": 1024, "num_warps": 8}, {"fp8_bits": 1}, {"no_prmt": 1}):
        check("fp8", 4096, 4096, dtype, "cuda", config=cfg)
        check("int8", 4096, 4096, dtype, "cuda", config={k: v for k, v in cfg.items() if k != "fp8_bits"})


@cuda
@pytest.mark.gpu
def test_one_row_takes_the_gemv_where_measured_faster():
    """int8-wo and FP8 linears up to GEMV_MAX_OUT outputs take the GEMV at one row (and say so);
    int4 takes the tensor-core int4 GEMV up to 8 rows, its GEMM beyond; the kernels agree."""
    from trtlm.quant.gemv import GEMV_MAX_OUT

    for name, want in (("int8-wo", True), ("fp8", True), ("int4-wo", False), ("int8-sq", False)):
        m = _linear(name, 512, 1024, torch.bfloat16, "cuda")
        m.prepare()
        assert m._gemv is want and ("Triton GEMV" in m.kernel_reason) is want, (name, m.kernel_reason)
        w4 = name == "int4-wo" and w4_gemv_available(torch.device("cuda"))
        assert (m._w4 is not None) is w4 and ("tensor-core int4 GEMV" in m.kernel_reason) is w4
        x = torch.randn(12, 1024, device="cuda", dtype=torch.bfloat16)
        one, two, many = m(x[:1]), m(x[:2]), m(x)  # (int4: w4_gemv, w4_gemv, w4_gemm)
        assert _rel(one, many[:1]) <= TOL and _rel(two, many[:2]) <= TOL
    wide = _linear("int8-wo", GEMV_MAX_OUT + 512, 1024, torch.bfloat16, "cuda")
    wide.prepare()
    assert not wide._gemv


# ----------------------------------------------------------------------------- tensor-core int4 GEMV (few rows)

def test_w4_tiles_hold_each_lanes_mma_fragment(monkeypatch):
    """Lane L's word j of 16-row tile r and 64-slice c holds the eight codes of its A fragment of
    ``mma.m16n8k16`` (PTX ISA, "Matrix Fragments for mma.m16n8k16", .bf16/.f16): register i is
    ``((word >> 4i) & 0x000F000F)`` as ``u = q + 8``, its low half the element at row
    ``16r + L//4 (+8 for odd i)``, column ``64c + 16j + 2(L%4) (+8 for i >= 2)``, its high half the
    next column.  ``unpack_w4_tiles`` inverts the repack."""
    from trtlm.quant.w4_gemv import repack_w4_tiles, unpack_w4_tiles

    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (32, 128), generator=gen, dtype=torch.int8)
    tiles = repack_w4_tiles(qf.pack_int4(q), torch.ones(1, 32), 128)
    assert tiles.weight.shape == (2, 2, 32, 4) and (tiles.out_features, tiles.in_features) == (32, 128)
    assert torch.equal(unpack_w4_tiles(tiles), q)
    import trtlm.quant.w4_gemv as w4  # (built 16 rows at a time: the same words)
    monkeypatch.setattr(w4, "_REPACK_ROWS", 16)
    assert torch.equal(repack_w4_tiles(qf.pack_int4(q), torch.ones(1, 32), 128).weight, tiles.weight)
    words = tiles.weight.to(torch.int64) & 0xFFFFFFFF
    for r in range(2):
        for c in range(2):
            for lane in range(32):
                for j in range(4):
                    word = int(words[r, c, lane, j])
                    for i in range(4):
                        row = 16 * r + lane // 4 + 8 * (i % 2)
                        col = 64 * c + 16 * j + 2 * (lane % 4) + 8 * (i // 2)
                        assert ((word >> 4 * i) & 0xF) - 8 == q[row, col]
                        assert ((word >> (16 + 4 * i)) & 0xF) - 8 == q[row, col + 1]


def test_w4_gemv_configs_tile_their_shapes():
    from trtlm.quant.w4_gemv import (W4_DEFAULT, W4_MEASURED, _GEMV_SHARED_MAX, _gemm_shared, _gemm_window, _gemv_shared,
                                     gemm_cols, w4_configs, w4_gemm_config, w4_gemm_configs, w4_gemv_config,
                                     w4_gemv_supports)

    shape = (W4_DEFAULT["warps"], W4_DEFAULT["tiles"], W4_DEFAULT["stages"])
    for N, K in ((512, 1024), (6144, 4096), (28672, 4096), (4096, 14336), (57344, 4096), (8192, 28672)):
        default = w4_gemv_config(N, K)
        assert default is not None and default in w4_configs(N, K)
        if (N, K) not in W4_MEASURED:
            assert (default.warps, default.tiles, default.stages) == shape
        for cfg in w4_configs(N, K):
            assert K % (cfg.splits * cfg.slices * 64) == 0 and N % (16 * cfg.tiles * cfg.warps) == 0
            assert _gemv_shared(cfg, K, 8) <= _GEMV_SHARED_MAX and cfg.tiles * cfg.slices <= 8
        for cols in (2, 4, 8):  # (the GEMM: x in windows, so every shape has configurations at 64 rows)
            assert w4_gemm_config(N, K, cols) in w4_gemm_configs(N, K, cols)
            for cfg in w4_gemm_configs(N, K, cols):
                window = _gemm_window(cfg, K, cols)
                assert K % (cfg.splits * cfg.slices * 64) == 0 and N % (16 * cfg.tiles * cfg.warps) == 0
                assert (K // cfg.splits) % window == 0 and window % (64 * cfg.slices) == 0
                assert _gemm_shared(cfg, K, cols) <= _GEMV_SHARED_MAX and cfg.tiles * cols * 4 <= 128
    for (N, K), cfg in W4_MEASURED.items():
        assert cfg in w4_configs(N, K)
    # a grid with a block per SM already streams K whole, in stages of four 64-slices; a small one is
    # split along K until the GPU holds about 16 warps per SM, in stages of one slice
    assert w4_gemv_config(57344, 4096, 132)[2:] == (4, 4, 1)
    assert w4_gemv_config(512, 1024, 132) == (4, 2, 1, 4, 16)
    assert w4_gemv_config(96, 1024) is not None  # (fewer warps where the shape is small)
    assert w4_gemv_supports(64, 512, 1024) and w4_gemv_supports(128, 4096, 14336)
    assert not w4_gemv_supports(32, 512, 1024)  # a scale per 64-slice at most
    assert not w4_gemv_supports(128, 200, 1024) and not w4_gemv_supports(128, 512, 1000)
    # a GEMM kernel per power of two of 8-row groups: 9-16 rows, 17-32, 33-64
    assert [gemm_cols(r) for r in (9, 16, 17, 32, 33, 64)] == [2, 2, 4, 4, 8, 8]


def test_w4_gemv_needs_cuda():
    assert not w4_gemv_available(torch.device("cpu"))
    m = _linear("int4-awq", 512, 1024, torch.bfloat16, "cpu")
    m.prepare()
    assert m._w4 is None and m.kernel_path == qk.EMULATION


#: kind -> (row counts, whether the reference rounds each dequantized weight to x's dtype)
W4_KINDS = {"gemv": ((1, 3, 8), False), "gemm": ((9, 17, 33, 64), True)}


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", list(W4_KINDS))
def test_w4_kernels_match_the_dequantized_product(kind, dtype, monkeypatch):
    """The GEMV (1-8 rows) and the GEMM (9-64 rows), group 64 and 128, with and without AWQ's
    pre-quant scale, the default and other configurations, against the float32 product of the
    dequantized weight and x (times the pre-quant scale, rounded to x's dtype as the kernels round
    it; the GEMM also rounds each dequantized weight ``q * scale`` to x's dtype, as the emulation
    does).  Same tolerance as every fast path: the output is rounded to x's dtype once; a wrong
    fragment, scale or offset is off by O(1).  The split-K sum has a fixed order, so repeated calls,
    and CUDA-graph replays (the counters reset themselves), give the same bits; so does the GEMM
    with AWQ's scale applied to x before it rather than in every block (the same rounding)."""
    from trtlm.quant import w4_gemv as w4

    if not w4_gemv_available(torch.device("cuda")):
        pytest.skip("NVRTC (part of PyTorch's CUDA builds) is not available to compile the kernel")
    product, default, sweep = {  # (the GEMM's configurations depend on the rows' 8-row groups too)
        "gemv": (w4.w4_gemv, lambda N, K, rows: w4.w4_gemv_config(N, K), lambda N, K, rows: w4.w4_configs(N, K)),
        "gemm": (w4.w4_gemm, lambda N, K, rows: w4.w4_gemm_config(N, K, w4.gemm_cols(rows)),
                 lambda N, K, rows: w4.w4_gemm_configs(N, K, w4.gemm_cols(rows)))}[kind]
    row_counts, rounds_weight = W4_KINDS[kind]
    gen = torch.Generator("cuda").manual_seed(0)
    for N, K, group in ((512, 1024, 64), (6144, 4096, 128), (4096, 14336, 128)):
        w = torch.randn(N, K, device="cuda", generator=gen) * 0.02
        s = qf.int4_group_scales(w, group)
        q = qf.quantize_int4(w, s, group)
        tiles = w4.repack_w4_tiles(qf.pack_int4(q), s.t().contiguous(), group)
        deq = (q.float().reshape(N, K // group, group) * s[..., None]).reshape(N, K)
        deq = deq.to(dtype).float() if rounds_weight else deq
        p = (torch.rand(K, device="cuda", generator=gen) + 0.5).to(dtype)
        for rows in row_counts:
            x = torch.randn(rows, K, device="cuda", generator=gen).to(dtype)
            for pre in (None, p):
                xs = (x.float() * pre.float()).to(dtype) if pre is not None else x
                ref = xs.float() @ deq.t()
                # (every configuration compiles a kernel: about eight alternatives, on the smallest shape only)
                cands = sweep(N, K, rows)
                others = cands[::max(1, len(cands) // 8)] if N == 512 and pre is None else []
                for cfg in [default(N, K, rows)] + others:
                    y = product(x, tiles, pre, config=cfg)
                    assert y.dtype == dtype and y.shape == (rows, N)
                    assert _rel(y, ref) <= TOL, (N, K, rows, pre is not None, cfg, _rel(y, ref))
                assert torch.equal(product(x, tiles, pre), product(x, tiles, pre))
    if kind == "gemm":  # AWQ's scale applied to x once first (large blocks) gives the kernel's bits
        x = torch.randn(64, K, device="cuda", generator=gen).to(dtype)
        in_kernel = product(x, tiles, p)
        monkeypatch.setattr(w4, "_PREQUANT_ONCE", 0)
        assert torch.equal(product(x, tiles, p), in_kernel)
    x = torch.randn(row_counts[1], K, device="cuda", generator=gen).to(dtype)
    want = product(x, tiles)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = product(x, tiles)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
    x.copy_(torch.randn(row_counts[1], K, device="cuda", generator=gen).to(dtype))
    graph.replay()
    assert torch.equal(out, product(x, tiles))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w4_gemv_applies_the_swiglu_as_it_stages_x(dtype):
    """The GEMV given the SwiGLU's input ``[a | g]`` (the stacked fc/gate output) computes
    ``proj(silu(a) * g)``: against the float32 product with ``silu_mul``'s reference (``silu(a)``
    rounded to x's dtype, then the product rounded), AWQ's pre-quant scale after it, at 1-8 rows.
    Same tolerance as every fast path (the exponentials differ in their last bits, so a rounded
    ``silu(a)`` may differ by one unit of x's dtype; a wrong half or a missing activation is off
    by O(1)).  The engine's MLP then takes it instead of the SwiGLU's own kernel."""
    from trtlm.quant import w4_gemv as w4
    from trtlm.runtime.kernels.fused import silu_mul_ref

    if not w4_gemv_available(torch.device("cuda")):
        pytest.skip("NVRTC (part of PyTorch's CUDA builds) is not available to compile the kernel")
    gen = torch.Generator("cuda").manual_seed(1)
    N, K = 512, 1024
    w = torch.randn(N, K, device="cuda", generator=gen) * 0.02
    s = qf.int4_group_scales(w, 128)
    q = qf.quantize_int4(w, s, 128)
    tiles = w4.repack_w4_tiles(qf.pack_int4(q), s.t().contiguous(), 128)
    deq = (q.float().reshape(N, K // 128, 128) * s[..., None]).reshape(N, K)
    p = (torch.rand(K, device="cuda", generator=gen) + 0.5).to(dtype)
    for rows in (1, 3, 8):
        y = (torch.randn(rows, 2 * K, device="cuda", generator=gen) * 2).to(dtype)
        for pre in (None, p):
            x = silu_mul_ref(y)
            x = (x.float() * pre.float()).to(dtype) if pre is not None else x
            out = w4.w4_gemv(y, tiles, pre, swiglu=True)
            assert out.shape == (rows, N) and out.dtype == dtype
            assert _rel(out, x.float() @ deq.t()) <= TOL, (rows, pre is not None)
    with pytest.raises(ValueError, match="inputs"):  # (the SwiGLU's input is twice as wide as x)
        w4.w4_gemv(y[:, :K], tiles, swiglu=True)


@cuda
@pytest.mark.gpu
def test_int4_falls_back_when_the_cuda_c_kernels_do_not_compile(monkeypatch):
    """A real NVRTC failure (source that does not compile) leaves the int4 linear on the other
    kernels, still correct, and its one-line report says why; nothing raises at load time."""
    from trtlm.quant import w4_gemv as w4

    if not w4_gemv_available(torch.device("cuda")):
        pytest.skip("NVRTC (part of PyTorch's CUDA builds) is not available to compile the kernel")
    monkeypatch.setattr(w4, "_SOURCE", w4._SOURCE + "\nthis is not CUDA C;\n")
    w4._source.cache_clear()
    try:
        m = _linear("int4-awq", 512, 1024, torch.bfloat16, "cuda")
        m.prepare()
        assert m._w4 is None and m.kernel_path != qk.W4
        assert "did not compile" in m.kernel_reason, m.kernel_reason
        x = torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)
        assert _rel(m(x), m.emulate(x)) <= TOL
    finally:
        monkeypatch.undo()
        w4._source.cache_clear()
