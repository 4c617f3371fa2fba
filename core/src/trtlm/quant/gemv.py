"""The one-row product of a decode step with quantized weights: ``y = x @ dequant(W)^T`` for one
input row, streaming the stored codes once at (close to) the GPU's copy bandwidth.

At batch 1 a decode step reads every weight once and does two flops per weight, so each linear is
a matrix-vector product bound by the bytes it reads.  A quantized format is only faster than bf16
there if its kernel streams its fewer bytes as fast as cuBLAS streams bf16's.  What this kernel does
for that (each choice measured on the H200, docs/benchmarks.md, "one-row GEMV"):

- **Full K per program, no split-K.**  Each program owns ``BN`` output rows and walks all of K, so
  there are no float32 atomics, no zero-filled buffer and no cast afterwards: one kernel per linear
  instead of three.  Mistral-7B's narrowest linear (4096 rows) still makes 256+ programs.
- **A 2-D float32 accumulator**, reduced across K once at the end (int8/fp8, per-channel or
  per-tensor scales), or once per quantization group (int4), not once per tile.
- **Integer codes become floats with bit operations and one add** (the "magic number" trick of
  FasterTransformer/Marlin): ``float(2^23 + u)`` is the bit pattern ``0x4B000000 | u``, so
  ``u = code + bias`` is masked into it and the bias plus 2^23 subtracted exactly.  The GPU's
  integer-to-float conversion runs at a quarter of the FMA rate on Hopper, which capped our first
  GEMV at ~2.3 TB/s (int8) and ~1 TB/s (int4).  On CUDA, int8 codes go four at a time through
  ``prmt`` (one byte permute per weight instead of extract-mask-or): 3-8% faster on Mistral-7B's
  int8 products than the masking, measured in the same call.
- **Programmatic dependent launch** (:mod:`trtlm.runtime.kernels.pdl`): each GEMV starts while
  the kernel before it ends.
- Codes are read in the checkpoint's own layout (int8/fp8 ``[N, K]``; int4 ``[N/2, K]``, two
  output rows per byte), so nothing is repacked or kept twice.

Numerics: the codes and scales are exact in float32 and products accumulate in float32; only the
summation order differs from the emulation in :mod:`trtlm.quant.formats` (which rounds the
dequantized weight to the activation dtype first).  FP8 activations are quantized with the
checkpoint's static scale exactly as ``fake_quant_fp8`` does (or arrive already quantized, from the
fused RMSNorm/SwiGLU kernels).
"""
from __future__ import annotations

import functools

import torch

from trtlm.quant.kernels import _SKIND, _WKIND  # (the codes every quantized kernel takes)

__all__ = ["gemv", "gemv_supports", "gemv_applies", "GEMV_CONFIGS", "GEMV_WEIGHTS", "GEMV_MAX_OUT"]


#: (weight kind, N > 4096) -> tiles, the best of the sweep at Mistral-7B's shapes
#: (``bench/quant_kernels_bench.py --gemv``, docs/benchmarks.md "one-row GEMV"): wide K steps and
#: 8 warps for the 4096-row products, 4 warps for 6144 rows (more programs per SM)
GEMV_CONFIGS: dict[tuple[str, bool], dict[str, int]] = {
    ("int8", False): {"bn": 8, "bk": 1024, "num_warps": 8, "num_stages": 3},
    ("int8", True): {"bn": 8, "bk": 512, "num_warps": 4, "num_stages": 4},
    ("fp8", False): {"bn": 8, "bk": 1024, "num_warps": 8, "num_stages": 3},
    ("fp8", True): {"bn": 4, "bk": 512, "num_warps": 4, "num_stages": 3},
    ("int4", False): {"bn": 32, "bk": 128, "num_warps": 8, "num_stages": 4},
    ("int4", True): {"bn": 32, "bk": 128, "num_warps": 8, "num_stages": 4},
}
#: FP8 with the input quantized in the kernel: every program divides all of x by the scale, so the
#: 6144-row product wants more rows per program (10.9 us against 15.6 with 4); the 4096-row
#: default is already the best there (7.9 us; quantizing in a kernel of its own first: 9.1 us)
GEMV_CONFIGS_QUANT_X: dict[tuple[str, bool], dict[str, int]] = {
    ("fp8", True): {"bn": 8, "bk": 512, "num_warps": 4, "num_stages": 3},
}


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    # module globals, not locals: Triton's interpreter re-executes a kernel's source with its
    # module's globals only
    global pdl_release, pdl_wait
    from trtlm.runtime.kernels.pdl import pdl_release, pdl_wait

    @triton.jit
    def gemv_kernel(
        x_ptr, w_ptr, s_ptr, p_ptr, a_ptr, y_ptr,
        N, K, stride_wn, stride_sn, stride_sg,
        WKIND: tl.constexpr, SKIND: tl.constexpr, GROUP: tl.constexpr, HAS_P: tl.constexpr,
        X_FP8: tl.constexpr, QUANT_X: tl.constexpr, FP8_BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        PDL: tl.constexpr, PRMT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_k = tl.arange(0, BK)
        if WKIND == 1:  # int4: byte row j holds output rows 2j (low nibble) and 2j+1 (high nibble)
            HALF: tl.constexpr = BN // 2
            rows = pid * HALF + tl.arange(0, HALF)
            row_ok = rows < N // 2
            acc_e = tl.zeros((HALF,), dtype=tl.float32)
            acc_o = tl.zeros((HALF,), dtype=tl.float32)
        else:
            rows = pid * BN + tl.arange(0, BN)
            row_ok = rows < N
            acc = tl.zeros((BN, BK), dtype=tl.float32)
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        pdl_wait(PDL)  # (trtlm.runtime.kernels.pdl: the launch overlaps the kernel before)
        pdl_release(PDL)
        for k0 in range(0, K, BK):
            kk = k0 + offs_k
            if X_FP8:  # FP8 codes from the op before (quantized with this linear's input scale)
                x = tl.load(x_ptr + kk).to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:
                x = tl.load(x_ptr + kk).to(tl.float32)
                if HAS_P:  # AWQ's pre-quant scale, rounded to the activation dtype as x * p would be
                    x = (x * tl.load(p_ptr + kk).to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
                if QUANT_X:  # FP8 W8A8 on an unquantized input: quantize as fake_quant_fp8 does
                    a = tl.load(a_ptr)
                    x = tl.clamp(tl.math.div_rn(x, a), -448.0, 448.0).to(tl.float8e4nv).to(tl.float32)
            raw = tl.load(w_ptrs, mask=row_ok[:, None], other=0)
            b = raw.to(tl.int32)
            w_ptrs += BK
            if WKIND == 0 and PRMT:  # four int8 codes (one register) -> four exact float32 values: flip
                # the sign bits (c + 128 as a byte), `prmt` each byte under the exponent byte 0x4B (the
                # float 2^23 + c + 128), subtract 2^23 + 128.  Nine instructions for four weights
                # against five per weight by byte extraction and masking (FasterTransformer's int8 ->
                # fp16 conversion, in float32)
                w = tl.inline_asm_elementwise(
                    "{ .reg .b32 t; xor.b32 t, $4, 0x80808080; "
                    "prmt.b32 $0, t, 0x4B000000, 0x7440; prmt.b32 $1, t, 0x4B000000, 0x7441; "
                    "prmt.b32 $2, t, 0x4B000000, 0x7442; prmt.b32 $3, t, 0x4B000000, 0x7443; "
                    "sub.f32 $0, $0, 0f4B000080; sub.f32 $1, $1, 0f4B000080; "
                    "sub.f32 $2, $2, 0f4B000080; sub.f32 $3, $3, 0f4B000080; }",
                    "=r,=r,=r,=r,r", [raw], dtype=tl.float32, is_pure=True, pack=4)
                acc += w * x[None, :]
            elif WKIND == 0:  # int8 code c: bits of 2^23 + (c + 128), minus 2^23 + 128
                w = (((b & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
                acc += w * x[None, :]
            elif WKIND == 2:
                if FP8_BITS:  # e4m3's sign, exponent and mantissa moved into float32's fields: a
                    # factor 2^-120 off, applied with the scales at the end
                    w = (((b & 0x80) << 24) | ((b & 0x7F) << 20)).to(tl.float32, bitcast=True)
                else:
                    w = b.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
                acc += w * x[None, :]
            else:  # signed int4 nibbles; the high one comes out times 16 (undone at the end)
                lo = (((b ^ 0x08) & 0x0F) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                hi = (((b ^ 0x80) & 0xF0) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
                d_e = tl.sum(lo * x[None, :], axis=1)
                d_o = tl.sum(hi * x[None, :], axis=1)
                if SKIND == 2:  # one group per K step (BK == GROUP)
                    g = k0 // GROUP
                    d_e *= tl.load(s_ptr + (2 * rows) * stride_sn + g * stride_sg, mask=row_ok, other=0.0)
                    d_o *= tl.load(s_ptr + (2 * rows + 1) * stride_sn + g * stride_sg, mask=row_ok, other=0.0)
                acc_e += d_e
                acc_o += d_o
        if WKIND == 1:
            if SKIND == 1:
                acc_e *= tl.load(s_ptr + (2 * rows) * stride_sn, mask=row_ok, other=0.0)
                acc_o *= tl.load(s_ptr + (2 * rows + 1) * stride_sn, mask=row_ok, other=0.0)
            elif SKIND == 0:
                acc_e *= tl.load(s_ptr)
                acc_o *= tl.load(s_ptr)
            out = y_ptr + 2 * rows
            tl.store(out, acc_e.to(y_ptr.dtype.element_ty), mask=row_ok)
            tl.store(out + 1, (acc_o * 0.0625).to(y_ptr.dtype.element_ty), mask=row_ok)
        else:
            y = tl.sum(acc, axis=1)
            if WKIND == 2 and FP8_BITS:
                y *= 1.329227995784916e36  # 2^120
            if SKIND == 1:
                y *= tl.load(s_ptr + rows * stride_sn, mask=row_ok, other=0.0)
            else:
                y *= tl.load(s_ptr)
            if X_FP8 or QUANT_X:
                y *= tl.load(a_ptr)
            tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    return gemv_kernel


#: weight kinds whose linears take the GEMV at one row, and up to which output width: where it beat
#: the alternative in the engine (int8: the tiled kernel; fp8: ``torch._scaled_mm``; int4 has its own
#: tensor-core GEMV, :mod:`trtlm.quant.w4_gemv` -- this kernel's per-group reductions made it 1.2-4x
#: slower than tinygemm: docs/benchmarks.md, runs 15 and 16).  The stacked SwiGLU input
#: (28672 rows) streams faster through the other kernels: an int8 decode step took 3.06 ms with
#: the GEMV there against 2.88 without (docs/benchmarks.md, run 14), although the GEMV won the
#: isolated kernel bench (38 against 44 us).
GEMV_WEIGHTS = frozenset({"int8", "fp8"})
GEMV_MAX_OUT = 8192


def gemv_applies(weight_kind: str, activation: str | None, scale_kind: str, in_features: int, out_features: int,
                 group_size: int = 0) -> bool:
    """Whether a linear of this format and shape takes :func:`gemv` at one row (by measurement,
    :data:`GEMV_WEIGHTS`, :data:`GEMV_MAX_OUT`).  FP8 activations are quantized in the kernel;
    SmoothQuant's int8 activations are not supported."""
    return (weight_kind in GEMV_WEIGHTS and (activation is None or activation == weight_kind == "fp8")
            and out_features <= GEMV_MAX_OUT and gemv_supports(weight_kind, scale_kind, in_features, group_size))


def gemv_supports(weight_kind: str, scale_kind: str, in_features: int, group_size: int = 0) -> bool:
    """Whether :func:`gemv` takes this layout: K a multiple of the K step (and, for int4 groups,
    the group size equal to its K step of 128)."""
    if weight_kind not in _WKIND or scale_kind not in _SKIND:
        return False
    if weight_kind == "int4":
        bk = GEMV_CONFIGS["int4", False]["bk"]
        return (scale_kind != "group" or group_size == bk) and in_features % bk == 0
    return scale_kind != "group" and in_features % 64 == 0


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, weight_kind: str, scale_kind: str,
         group_size: int = 0, prequant: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None, config: dict | None = None) -> torch.Tensor:
    """``[1, K] x [N, K]^T -> [1, N]`` for quantized weights (see the module docstring).

    :param x: one row ``[1, K]`` (or ``[K]``): float16/bfloat16, or FP8 codes already quantized with
        ``input_scale`` (``float8_e4m3fn``).
    :param weight: int8 / float8_e4m3fn codes ``[N, K]``, or packed int4 ``[N/2, K]``.
    :param scale: float32 weight scales: ``[1]`` per tensor, ``[N]`` per channel, ``[N, K/group]``.
    :param prequant: AWQ's pre-quant scale ``[K]`` (weight-only formats).
    :param input_scale: FP8 W8A8's static activation scale ``[1]``: a float ``x`` is quantized with it
        in the kernel; FP8 ``x`` is taken as quantized with it.
    :param out_dtype: the output dtype (default: ``x``'s, or bfloat16 for FP8 ``x``).
    :param config: tiles (``bn``, ``bk``, ``num_warps``, ``num_stages``), ``fp8_bits`` or
        ``no_prmt`` (the other code conversions) -- for measuring.
    """
    wk, sk = _WKIND[weight_kind], _SKIND[scale_kind]
    K = x.shape[-1]
    x = x.reshape(K)
    N = weight.shape[-2] * 2 if wk == 1 else weight.shape[-2]
    x_fp8 = x.dtype == torch.float8_e4m3fn
    quant_x = wk == 2 and not x_fp8
    cfg = dict(GEMV_CONFIGS[weight_kind, N > 4096])
    if quant_x:
        cfg.update(GEMV_CONFIGS_QUANT_X.get((weight_kind, N > 4096), {}))
    cfg.update(config or {})
    bn, bk = cfg["bn"], cfg["bk"]
    if wk == 1 and sk == 2 and group_size != bk:
        raise ValueError(f"int4 GEMV: group size {group_size} must equal the K step {bk}")
    while wk != 1 and K % bk and bk > 64:
        bk //= 2
    if K % bk:
        raise ValueError(f"GEMV: in_features {K} is not a multiple of the K step {bk}")
    if (x_fp8 or wk == 2) and input_scale is None:
        raise ValueError("GEMV: FP8 activations need input_scale")
    out_dtype = out_dtype or (torch.bfloat16 if x_fp8 else x.dtype)
    y = torch.empty(1, N, dtype=out_dtype, device=x.device)
    w = weight.view(torch.uint8) if weight.dtype == torch.float8_e4m3fn else weight
    stride_sn = scale.stride(0) if sk >= 1 else 0
    stride_sg = scale.stride(1) if sk == 2 else 0
    grid = (-(-N // bn),)
    from trtlm.runtime.kernels.pdl import pdl_options  # (imports Triton)
    pdl = pdl_options(x.device)
    _kernel()[grid](
        x.view(torch.uint8) if x_fp8 else x, w, scale, prequant if prequant is not None else x,
        input_scale if input_scale is not None else scale, y,
        N, K, w.stride(0), stride_sn, stride_sg,
        WKIND=wk, SKIND=sk, GROUP=group_size if sk == 2 else 1, HAS_P=prequant is not None,
        X_FP8=x_fp8, QUANT_X=quant_x, FP8_BITS=bool(cfg.get("fp8_bits", 0)), BN=bn, BK=bk,
        PRMT=x.device.type == "cuda" and not cfg.get("no_prmt"), **pdl,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y
