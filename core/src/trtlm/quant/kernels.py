"""Fast low-precision matrix products for quantized linears on CUDA.

The runtime modules (:mod:`trtlm.quant.runtime`) ask :func:`linear_plan` which path a linear
takes on its device, once, in their load-time ``prepare()``; everything here is only used on CUDA
(every format falls back to the emulation of :mod:`trtlm.quant.formats` elsewhere).

Paths (the strings modules expose as ``kernel_path``), and which kernel runs at which size (the
choices come from the H200 measurements in docs/benchmarks.md, "quantized kernels"; the module
constants below switch them):

``"triton"`` -- weight-only int8 (and int4 where tinygemm does not apply; all MoE experts):
    the tiled Triton dequant-GEMM (``dequant_mm_kernel``): it streams the stored codes (int8,
    packed int4 as stored, fp8) and their scales, converts them in registers, ``tl.dot`` with
    float32 accumulation, group scales applied to each group's partial sum, AWQ's pre-quant scale
    applied to the activation tile, split-K with float32 atomics at decode.  Gathered MoE experts
    (decode) use the one-row GEMV (``dequant_gemv_kernel``): an expert id per row selects the
    weights, so only the *routed* experts' codes are read and no dequantized copy is made.  Beyond
    decode sizes MoE experts are dequantized by one Triton pass each (:func:`dequantize_fast`)
    into the dense MoE path.  The checkpoint layout is used as is (no repacking).
``"int4pack"`` -- int4 (wo and AWQ) with bfloat16 activations: ``torch._weight_int4pack_mm``
    (tinygemm) up to :data:`INT4PACK_MAX_ROWS` rows, weights repacked once in ``prepare()`` (a
    second copy of the int4 weight, the checkpoint's tensors are kept for ``state_dict``); its
    scales are bfloat16.  The tiled Triton kernel beyond.
``"w4"`` -- int4 (wo and AWQ, group a multiple of 64) where NVRTC compiles CUDA C: the tensor-core
    kernels of :mod:`trtlm.quant.w4_gemv` up to :data:`W4_GEMM_ROWS` rows (weights repacked
    once in ``prepare()``), ``mixed_mm`` beyond.  Chosen over ``"int4pack"`` where both apply.
``"scaled_mm"`` -- FP8 W8A8: ``torch._scaled_mm`` (cuBLASLt, sm_89+), the activation quantized
    with the checkpoint's static scale; per-channel weight scales are applied to the float32
    output.
``"int_mm"`` -- SmoothQuant W8A8 from 17 rows on: ``torch._int_mm`` (int8 x int8 -> int32,
    exact), then ``acc * a_scale * w_scale``; below (``_int_mm`` needs M > 16) the activation is
    fake-quantized (the same rounding) and the tiled Triton kernel runs on the int8 codes.
``"emulation"`` -- dequantize then ``F.linear`` (any device, any dtype).

Whatever the path, at one row (decode at batch 1) int8 and FP8 linears up to
:data:`trtlm.quant.gemv.GEMV_MAX_OUT` outputs take the bandwidth-bound GEMV of
:mod:`trtlm.quant.gemv` instead (faster than each of the above there, docs/benchmarks.md "one-row GEMV").
The ``"w4"`` path's GEMV takes 1-8 rows and its GEMM the rows up to :data:`W4_GEMM_ROWS`
(docs/benchmarks.md, runs 16-18).

Numerics: every fast path computes what the emulation computes up to accumulation order and the
rounding of partial products (codes are exact in fp16/bf16; scales are applied in float32).
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch

__all__ = ["EMULATION", "TRITON", "SCALED_MM", "INT_MM", "INT4PACK", "W4", "triton_available", "cuda_capability",
           "linear_plan", "choose_path", "dequant_mm", "quantize_activation", "dequantize_fast", "fp8_scaled_mm", "int8_int_mm", "repack_int4pack", "int4pack_mm",
           "INT_MM_MIN_ROWS", "MixedWeight", "repack_for_mm", "mixed_mm", "mixed_mm_supports", "mixed_mm_applies",
           "MIXED_MM_MIN_ROWS"]

EMULATION = "emulation"
TRITON = "triton"
SCALED_MM = "scaled_mm"
INT_MM = "int_mm"
INT4PACK = "int4pack"
W4 = "w4"

#: ``torch._int_mm`` on CUDA requires more than 16 rows
INT_MM_MIN_ROWS = 17
#: weight-only linears from this many rows on: dequantize in one Triton pass, then cuBLAS (0: off).
#: Off: measured slower than the tuned tiled kernel on 4 of 6 shape/format pairs at 64 rows.
#: (MoE experts beyond decode sizes always take that pass, into the dense MoE path.)
DENSE_MIN_ROWS = 0
#: rows up to which the int4 path takes ``torch._weight_int4pack_mm`` when INT4_KERNEL is INT4PACK
INT4PACK_MAX_ROWS = 16

#: int4 linears take the tensor-core GEMV of :mod:`trtlm.quant.w4_gemv` up to 8 rows (where NVRTC is)
W4_GEMV = True
#: ... and its GEMM (:func:`trtlm.quant.w4_gemv.w4_gemm`) from 9 rows up to this many (8: off; the kernel
#: takes up to :data:`trtlm.quant.w4_gemv.W4_GEMM_MAX_ROWS`).  64: at 16-32 rows it is 1.3-2.1x faster
#: than ``mixed_mm`` (and 1.2-1.8x faster than bf16 at 16 rows), at 64 rows level with it (0.90-1.08x
#: by shape); and it spares tinygemm's repacked copy (docs/benchmarks.md, run 18)
W4_GEMM_ROWS = 64

#: the W4A16 kernel (TRITON or INT4PACK), chosen by measurement (docs/benchmarks.md, "quantized kernels")
INT4_KERNEL = INT4PACK

_WKIND = {"int8": 0, "int4": 1, "fp8": 2}
_SKIND = {"tensor": 0, "channel": 1, "group": 2}


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton imports (its kernels are only launched on CUDA tensors)."""
    if os.environ.get("TRTLM_NO_TRITON"):
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def cuda_capability(device: torch.device | str) -> tuple[int, int] | None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def linear_plan(weight: str, activation: str | None, device: torch.device | str, dtype: torch.dtype,
                in_features: int, out_features: int) -> tuple[str, str]:
    """``(path, why)``: the product a quantized linear uses on ``device`` with activations ``dtype``.

    ``weight``/``activation`` are a :class:`~trtlm.quant.schemes.QuantFormat`'s properties.  The
    reason is for the one-line report ``trtlm run``/``bench`` print.
    """
    device = torch.device(device)
    return choose_path(weight, activation, device.type, cuda_capability(device), dtype, in_features, out_features,
                       triton_available(), hasattr(torch, "_scaled_mm"))


def choose_path(weight: str, activation: str | None, device_type: str, capability: tuple[int, int] | None,
                dtype: torch.dtype, in_features: int, out_features: int, triton: bool,
                scaled_mm: bool = True) -> tuple[str, str]:
    """The decision of :func:`linear_plan` from plain facts (testable without a GPU)."""
    if device_type != "cuda" or capability is None:
        return EMULATION, f"no fast kernel on {device_type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return EMULATION, f"fast kernels need float16/bfloat16 activations, not {str(dtype).replace('torch.', '')}"
    if in_features % 16 or out_features % 16:
        return EMULATION, f"shape {out_features}x{in_features} is not a multiple of 16"
    cap = capability
    if weight == "fp8":
        if cap < (8, 9) or not scaled_mm:
            return EMULATION, f"FP8 needs compute capability 8.9+ (this GPU: {cap[0]}.{cap[1]})"
        return SCALED_MM, "torch._scaled_mm"
    if not triton:
        if activation == "int8":
            return INT_MM, "torch._int_mm above 16 rows, emulation below (Triton is not installed)"
        return EMULATION, "Triton is not installed"
    if cap < (8, 0):
        return EMULATION, f"the Triton kernels need compute capability 8.0+ (this GPU: {cap[0]}.{cap[1]})"
    if activation == "int8":
        return INT_MM, "torch._int_mm above 16 rows, Triton on the int8 codes below"
    how = "tiled Triton dequant-GEMM"
    if DENSE_MIN_ROWS:
        how += f", Triton dequantize + cuBLAS from {DENSE_MIN_ROWS} rows"
    return TRITON, f"{weight} weights: {how}"


# ----------------------------------------------------------------------------- Triton kernel

@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    # module globals, not locals: Triton's interpreter re-executes a kernel's source with its
    # module's globals only
    global pdl_release, pdl_wait
    from trtlm.runtime.kernels.pdl import pdl_release, pdl_wait

    @triton.jit
    def dequant_mm_kernel(
        x_ptr, w_ptr, s_ptr, p_ptr, ids_ptr, y_ptr,
        M, N, K, ITERS,
        stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_sg, stride_ym,
        XDIV: tl.constexpr, GROUP: tl.constexpr, WKIND: tl.constexpr, SKIND: tl.constexpr,
        HAS_P: tl.constexpr, HAS_IDS: tl.constexpr, ATOMIC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
    ):
        # Output columns come in pairs (2j, 2j+1): int4 stores the two rows of a pair in one
        # byte; int8/fp8 rows are loaded the same way so one code path serves all three.
        HALF: tl.constexpr = BN // 2
        pdl_wait(PDL)  # (trtlm.runtime.kernels.pdl: the launch overlaps the kernel before)
        pdl_release(PDL)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_j = pid_n * HALF + tl.arange(0, HALF)
        j_mask = offs_j < N // 2
        offs_k = tl.arange(0, BK)
        if HAS_IDS:  # one row per program; its expert from ids, its input row = row // XDIV
            rows = pid_m + tl.arange(0, BM) * 0
            m_mask = tl.arange(0, BM) == 0
            e = tl.load(ids_ptr + pid_m).to(tl.int64)
        else:
            rows = pid_m * BM + tl.arange(0, BM)
            m_mask = rows < M
            e = 0
        x_rows = rows // XDIV
        w_base = w_ptr + e * stride_we
        s_base = s_ptr + e * stride_se
        acc_e = tl.zeros((BM, HALF), dtype=tl.float32)
        acc_o = tl.zeros((BM, HALF), dtype=tl.float32)
        k_start = pid_k * (ITERS * BK)  # split-K: host ints only in the loop bounds
        for it in range(0, ITERS):
            k0 = k_start + it * BK
            kk = k0 + offs_k
            x = tl.load(x_ptr + x_rows[:, None].to(tl.int64) * stride_xm + kk[None, :], mask=m_mask[:, None], other=0.0)
            if HAS_P:
                x = (x * tl.load(p_ptr + kk)[None, :]).to(x_ptr.dtype.element_ty)
            if WKIND == 1:
                b = tl.load(w_base + offs_j[None, :].to(tl.int64) * stride_wn + kk[:, None], mask=j_mask[None, :], other=0)
                w_e = ((b << 4).to(tl.int8) >> 4).to(x_ptr.dtype.element_ty)  # low nibble, sign-extended
                w_o = (b >> 4).to(x_ptr.dtype.element_ty)  # high nibble (arithmetic shift keeps the sign)
            else:
                ne = (2 * offs_j)[None, :].to(tl.int64) * stride_wn
                b_e = tl.load(w_base + ne + kk[:, None], mask=j_mask[None, :], other=0)
                b_o = tl.load(w_base + ne + stride_wn + kk[:, None], mask=j_mask[None, :], other=0)
                if WKIND == 2:
                    w_e = b_e.to(tl.float8e4nv, bitcast=True).to(x_ptr.dtype.element_ty)
                    w_o = b_o.to(tl.float8e4nv, bitcast=True).to(x_ptr.dtype.element_ty)
                else:
                    w_e = b_e.to(x_ptr.dtype.element_ty)
                    w_o = b_o.to(x_ptr.dtype.element_ty)
            d_e = tl.dot(x, w_e)
            d_o = tl.dot(x, w_o)
            if SKIND == 2:  # one scale per (row, group): BK divides GROUP
                g = k0 // GROUP
                s_e = tl.load(s_base + (2 * offs_j) * stride_sn + g * stride_sg, mask=j_mask, other=0.0)
                s_o = tl.load(s_base + (2 * offs_j + 1) * stride_sn + g * stride_sg, mask=j_mask, other=0.0)
                acc_e += d_e * s_e[None, :]
                acc_o += d_o * s_o[None, :]
            else:
                acc_e += d_e
                acc_o += d_o
        if SKIND == 1:
            acc_e = acc_e * tl.load(s_base + (2 * offs_j) * stride_sn, mask=j_mask, other=0.0)[None, :]
            acc_o = acc_o * tl.load(s_base + (2 * offs_j + 1) * stride_sn, mask=j_mask, other=0.0)[None, :]
        elif SKIND == 0:
            s = tl.load(s_base)
            acc_e = acc_e * s
            acc_o = acc_o * s
        y_e = y_ptr + rows[:, None].to(tl.int64) * stride_ym + (2 * offs_j)[None, :]
        mask = m_mask[:, None] & j_mask[None, :]
        if ATOMIC:
            tl.atomic_add(y_e, acc_e, mask=mask)
            tl.atomic_add(y_e + 1, acc_o, mask=mask)
        else:
            tl.store(y_e, acc_e.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(y_e + 1, acc_o.to(y_ptr.dtype.element_ty), mask=mask)

    return dequant_mm_kernel


@functools.lru_cache(maxsize=None)
def _gemv_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dequant_gemv_kernel(
        x_ptr, w_ptr, s_ptr, p_ptr, ids_ptr, y_ptr,
        N, K, ITERS,
        stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_sg, stride_ym,
        XDIV: tl.constexpr, GROUP: tl.constexpr, WKIND: tl.constexpr, SKIND: tl.constexpr,
        HAS_P: tl.constexpr, HAS_IDS: tl.constexpr, ATOMIC: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr,
    ):
        # One input row per program (decode, gathered experts): a matrix-vector product on the
        # CUDA cores, weight tiles read along K (coalesced), float32 accumulation.
        HALF: tl.constexpr = BN // 2
        row = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        if HAS_IDS:
            e = tl.load(ids_ptr + row).to(tl.int64)
        else:
            e = 0
        x_base = x_ptr + (row // XDIV).to(tl.int64) * stride_xm
        w_base = w_ptr + e * stride_we
        s_base = s_ptr + e * stride_se
        offs_j = pid_n * HALF + tl.arange(0, HALF)
        j_mask = offs_j < N // 2
        offs_k = tl.arange(0, BK)
        acc_e = tl.zeros((HALF,), dtype=tl.float32)
        acc_o = tl.zeros((HALF,), dtype=tl.float32)
        k_start = pid_k * (ITERS * BK)  # split-K: host ints only in the loop bounds
        for it in range(0, ITERS):
            k0 = k_start + it * BK
            kk = k0 + offs_k
            x = tl.load(x_base + kk).to(tl.float32)
            if HAS_P:
                x = x * tl.load(p_ptr + kk).to(tl.float32)
            if WKIND == 1:
                b = tl.load(w_base + offs_j[:, None].to(tl.int64) * stride_wn + kk[None, :], mask=j_mask[:, None], other=0)
                w_e = ((b << 4).to(tl.int8) >> 4).to(tl.float32)
                w_o = (b >> 4).to(tl.float32)
            else:
                ne = (2 * offs_j)[:, None].to(tl.int64) * stride_wn
                b_e = tl.load(w_base + ne + kk[None, :], mask=j_mask[:, None], other=0)
                b_o = tl.load(w_base + ne + stride_wn + kk[None, :], mask=j_mask[:, None], other=0)
                if WKIND == 2:
                    w_e = b_e.to(tl.float8e4nv, bitcast=True).to(tl.float32)
                    w_o = b_o.to(tl.float8e4nv, bitcast=True).to(tl.float32)
                else:
                    w_e = b_e.to(tl.float32)
                    w_o = b_o.to(tl.float32)
            d_e = tl.sum(w_e * x[None, :], axis=1)
            d_o = tl.sum(w_o * x[None, :], axis=1)
            if SKIND == 2:
                g = k0 // GROUP
                acc_e += d_e * tl.load(s_base + (2 * offs_j) * stride_sn + g * stride_sg, mask=j_mask, other=0.0)
                acc_o += d_o * tl.load(s_base + (2 * offs_j + 1) * stride_sn + g * stride_sg, mask=j_mask, other=0.0)
            else:
                acc_e += d_e
                acc_o += d_o
        if SKIND == 1:
            acc_e = acc_e * tl.load(s_base + (2 * offs_j) * stride_sn, mask=j_mask, other=0.0)
            acc_o = acc_o * tl.load(s_base + (2 * offs_j + 1) * stride_sn, mask=j_mask, other=0.0)
        elif SKIND == 0:
            s = tl.load(s_base)
            acc_e = acc_e * s
            acc_o = acc_o * s
        y_e = y_ptr + row.to(tl.int64) * stride_ym + 2 * offs_j
        if ATOMIC:
            tl.atomic_add(y_e, acc_e, mask=j_mask)
            tl.atomic_add(y_e + 1, acc_o, mask=j_mask)
        else:
            tl.store(y_e, acc_e.to(y_ptr.dtype.element_ty), mask=j_mask)
            tl.store(y_e + 1, acc_o.to(y_ptr.dtype.element_ty), mask=j_mask)

    return dequant_gemv_kernel


@functools.lru_cache(maxsize=None)
def _dequant_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_sg, stride_on,
                       GROUP: tl.constexpr, WKIND: tl.constexpr, SKIND: tl.constexpr,
                       BN: tl.constexpr, BK: tl.constexpr):
        # codes * scales -> the activation dtype, one pass (read codes, write the dense tile)
        HALF: tl.constexpr = BN // 2
        offs_j = tl.program_id(0) * HALF + tl.arange(0, HALF)
        kk = tl.program_id(1) * BK + tl.arange(0, BK)
        mask = (offs_j < N // 2)[:, None] & (kk < K)[None, :]
        if WKIND == 1:
            b = tl.load(w_ptr + offs_j[:, None].to(tl.int64) * stride_wn + kk[None, :], mask=mask, other=0)
            w_e = ((b << 4).to(tl.int8) >> 4).to(tl.float32)
            w_o = (b >> 4).to(tl.float32)
        else:
            ne = (2 * offs_j)[:, None].to(tl.int64) * stride_wn
            b_e = tl.load(w_ptr + ne + kk[None, :], mask=mask, other=0)
            b_o = tl.load(w_ptr + ne + stride_wn + kk[None, :], mask=mask, other=0)
            if WKIND == 2:
                w_e = b_e.to(tl.float8e4nv, bitcast=True).to(tl.float32)
                w_o = b_o.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:
                w_e = b_e.to(tl.float32)
                w_o = b_o.to(tl.float32)
        if SKIND == 2:
            gk = (kk // GROUP)[None, :] * stride_sg
            w_e = w_e * tl.load(s_ptr + (2 * offs_j)[:, None] * stride_sn + gk, mask=mask, other=0.0)
            w_o = w_o * tl.load(s_ptr + (2 * offs_j + 1)[:, None] * stride_sn + gk, mask=mask, other=0.0)
        elif SKIND == 1:
            w_e = w_e * tl.load(s_ptr + (2 * offs_j) * stride_sn, mask=offs_j < N // 2, other=0.0)[:, None]
            w_o = w_o * tl.load(s_ptr + (2 * offs_j + 1) * stride_sn, mask=offs_j < N // 2, other=0.0)[:, None]
        else:
            s = tl.load(s_ptr)
            w_e = w_e * s
            w_o = w_o * s
        o = out_ptr + (2 * offs_j)[:, None].to(tl.int64) * stride_on + kk[None, :]
        tl.store(o, w_e.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o + stride_on, w_o.to(out_ptr.dtype.element_ty), mask=mask)

    return dequant_kernel


def dequantize_fast(weight: torch.Tensor, scale: torch.Tensor, *, weight_kind: str, scale_kind: str,
                    group_size: int = 0, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None,
                    out_features: int | None = None) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype`` from one linear's codes and scales, in one Triton pass.

    Used where a dense GEMM beats any dequantizing GEMM (many rows): ``F.linear(x, dequantize_fast(..))``.
    """
    wk, sk = _WKIND[weight_kind], _SKIND[scale_kind]
    K = weight.shape[-1]
    N = out_features or (weight.shape[-2] * 2 if wk == 1 else weight.shape[-2])
    w = weight.view(torch.uint8) if wk == 2 else weight
    if out is None:
        out = torch.empty(N, K, dtype=dtype, device=weight.device)
    bn, bk = 32, 128
    sn = scale.stride(-2) if sk == 2 else (scale.stride(-1) if sk == 1 else 0)
    sg = scale.stride(-1) if sk == 2 else 0
    _dequant_kernel()[(math.ceil(N / bn), math.ceil(K / bk))](
        w, scale, out, N, K, w.stride(-2), sn, sg, out.stride(0),
        GROUP=group_size if sk == 2 else 1, WKIND=wk, SKIND=sk, BN=bn, BK=bk, num_warps=4)
    return out


def _divisor_at_most(n: int, want: int) -> int:
    """The largest divisor of ``n`` not above ``want`` (split-K parts of equal length)."""
    want = max(1, min(n, int(want)))
    return max(d for d in range(1, want + 1) if n % d == 0)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _config(M: int, N: int, K: int, bk_max: int, device: torch.device, rows_per_program: int | None):
    """Tiles and split-K for the tiled kernel, from the sweeps in docs/benchmarks.md (H200):
    64-wide output tiles; split-K 8 (<= 16 rows) / 4 (more rows) when N <= 4096, none for wider N
    (enough output tiles already)."""
    if rows_per_program is not None or M <= 16:  # one row per program (gathered experts), or few rows
        bm = 16
    elif M <= 32:
        bm = 32
    else:
        bm = 64
    bn = 64
    bk = min(bk_max, 128 if M <= 16 else 64)
    iters = K // bk
    want = (8 if M <= 16 else 4) if N <= 4096 else 1
    split = _divisor_at_most(iters, want)
    return bm, bn, bk, split, iters // split


def dequant_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, weight_kind: str, scale_kind: str,
               group_size: int = 0, prequant: torch.Tensor | None = None, expert_ids: torch.Tensor | None = None,
               rows_per_id: int = 1, out_features: int | None = None,
               config: dict | None = None) -> torch.Tensor:
    """``y = (x [* prequant]) @ dequant(weight)^T`` without materialising the dense weight.

    :param x: ``[M, K]`` float16/bfloat16 (or, with ``expert_ids``, ``[S / rows_per_id, K]``).
    :param weight: codes ``[N, K]`` (int8, float8_e4m3fn) or ``[N/2, K]`` packed int4; with
        ``expert_ids`` an expert stack ``[E, ...]``.
    :param scale: per tensor ``[1]`` / ``[E, 1]``, per channel ``[N]`` / ``[E, N]``, per group
        ``[N, K/group]`` / ``[E, N, K/group]``, float32.
    :param expert_ids: ``[S]`` int: row ``s`` of the output uses expert ``expert_ids[s]`` and input
        row ``s // rows_per_id`` (MoE: ``rows_per_id = top_k`` for ``fc``, 1 for ``proj``).
    :param config: override tile sizes (``bn``, ``bk``, ``split``, ``num_warps``, ``num_stages``)
        -- for measuring; the defaults come from :func:`_config`.
    :return: ``[M or S, N]`` in ``x.dtype``.
    """
    from trtlm.runtime.kernels.pdl import pdl_options  # (imports Triton)

    kern = _kernel()
    wk, sk = _WKIND[weight_kind], _SKIND[scale_kind]
    x = x.contiguous()
    K = x.shape[-1]
    experts = expert_ids is not None
    N = out_features or (weight.shape[-2] * 2 if wk == 1 else weight.shape[-2])
    w = weight.view(torch.uint8) if wk == 2 else weight
    if experts:
        S = expert_ids.shape[0]
        rows = S
        stride_we = w.stride(0)
    else:
        rows = x.shape[0]
        stride_we = 0
    if sk == 2:
        bk_max = min(group_size, 128) if group_size % 16 == 0 and group_size >= 16 else 0
        if not bk_max or group_size % bk_max:
            raise ValueError(f"group size {group_size} is not a multiple of 16 (up to 128) or of 128")
    else:
        bk_max = 128
    if K % bk_max:
        bk_max = 64 if K % 64 == 0 else 32 if K % 32 == 0 else 16
    kernel = (config or {}).get("kernel", "gemv" if experts else "dot")  # (plain linears: trtlm.quant.gemv)
    if kernel == "gemv" and not (experts or rows == 1):
        raise ValueError("the GEMV kernel takes one row per program (1 row, or expert ids)")
    if kernel == "gemv":
        return _gemv(x, w, scale, wk, sk, group_size, prequant, expert_ids, rows_per_id, N, K, rows, config)
    bm, bn, bk, split, k_per = _config(rows, N, K, bk_max, x.device, rows if experts else None)
    warps, stages = 4, 3
    if config:
        bn, bk = config.get("bn", bn), min(config.get("bk", bk), bk_max)
        warps, stages = config.get("num_warps", warps), config.get("num_stages", stages)
        split = _divisor_at_most(K // bk, config.get("split", split))
        k_per = K // bk // split
    if K % bk:
        raise ValueError(f"in_features {K} is not a multiple of {bk}")
    atomic = split > 1
    y = torch.zeros(rows, N, dtype=torch.float32, device=x.device) if atomic else torch.empty(
        rows, N, dtype=x.dtype, device=x.device)
    s = scale
    if sk == 0:
        stride_se, stride_sn, stride_sg = (s.stride(0) if experts and s.dim() > 0 else 0), 0, 0
    elif sk == 1:
        stride_se, stride_sn, stride_sg = (s.stride(0) if experts else 0), s.stride(-1), 0
    else:
        stride_se, stride_sn, stride_sg = (s.stride(0) if experts else 0), s.stride(-2), s.stride(-1)
    grid = (rows if experts else math.ceil(rows / bm), math.ceil(N / bn), split)
    kern[grid](
        x, w, s, prequant if prequant is not None else x, expert_ids if experts else x, y,
        rows, N, K, k_per,
        x.stride(0), stride_we, w.stride(-2), stride_se, stride_sn, stride_sg, y.stride(0),
        XDIV=rows_per_id if experts else 1, GROUP=group_size if sk == 2 else 1, WKIND=wk, SKIND=sk,
        HAS_P=prequant is not None, HAS_IDS=experts, ATOMIC=atomic, BM=bm, BN=bn, BK=bk,
        **pdl_options(x.device), num_warps=warps, num_stages=stages,
    )
    return y.to(x.dtype) if atomic else y


#: GEMV tiles (output rows per program up to N = 4096 -- 16 for int8/fp8 and 32 for int4 beyond --,
#: K per step), set from the sweep in docs/benchmarks.md
GEMV_BN, GEMV_BK = 64, 256


def _gemv(x, w, scale, wk, sk, group_size, prequant, expert_ids, rows_per_id, N, K, rows, config):
    experts = expert_ids is not None
    bn = (config or {}).get("bn", GEMV_BN if N <= 4096 else (32 if wk == 1 else 16))
    bk = (config or {}).get("bk", GEMV_BK)
    if sk == 2:
        bk = min(bk, group_size)
        while group_size % bk:
            bk //= 2
    while K % bk:
        bk //= 2
    if bk < 16:
        raise ValueError(f"in_features {K} / group size {group_size} too small for the GEMV kernel")
    iters = K // bk
    n_blocks = math.ceil(N / bn)
    if config and "split" in config:
        split = config["split"]
    else:  # enough programs to keep every SM streaming weights
        sms = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
            if x.device.type == "cuda" else 132
        split = max(1, min(iters, math.ceil(4 * sms / (rows * n_blocks))))
    split = _divisor_at_most(iters, split)
    per = iters // split
    atomic = split > 1
    y = torch.zeros(rows, N, dtype=torch.float32, device=x.device) if atomic else torch.empty(
        rows, N, dtype=x.dtype, device=x.device)
    if sk == 0:
        se, sn, sg = (scale.stride(0) if experts and scale.dim() > 0 else 0), 0, 0
    elif sk == 1:
        se, sn, sg = (scale.stride(0) if experts else 0), scale.stride(-1), 0
    else:
        se, sn, sg = (scale.stride(0) if experts else 0), scale.stride(-2), scale.stride(-1)
    _gemv_kernel()[(rows, n_blocks, split)](
        x, w, scale, prequant if prequant is not None else x, expert_ids if experts else x, y,
        N, K, per,
        x.stride(0), w.stride(0) if experts else 0, w.stride(-2), se, sn, sg, y.stride(0),
        XDIV=rows_per_id if experts else 1, GROUP=group_size if sk == 2 else 1, WKIND=wk, SKIND=sk,
        HAS_P=prequant is not None, HAS_IDS=experts, ATOMIC=atomic, BN=bn, BK=bk,
        num_warps=(config or {}).get("num_warps", 4))
    return y.to(x.dtype) if atomic else y


# ----------------------------------------------------------------------------- mixed-input GEMM (many rows)

#: rows from which int4/int8 weight-only linears take :func:`mixed_mm` instead of the tiled
#: ``dequant_mm`` (None: never; measured by ``bench/quant_kernels_bench.py --mixed-mm`` and the
#: engine benchmark, docs/benchmarks.md).  See :func:`mixed_mm_applies`.
MIXED_MM_MIN_ROWS: int | None = 17


class MixedWeight(NamedTuple):
    """A weight-only linear repacked once (:func:`repack_for_mm`) for :func:`mixed_mm`.

    ``weight``: int4 -> int32 ``[K/8, N]``, word ``[i, n]`` holding the codes of rows
    ``k = 8i .. 8i+7`` of output ``n``, ``k = 8i + j`` in bits ``4j .. 4j+3`` (two's complement
    nibble, the same signed code as the checkpoint's); int8 -> int8 ``[K, N]``.  K-major, N
    contiguous: a ``[BK, BN]`` tile is BK rows of contiguous bytes.
    ``scales``: int4 -> ``[K/group, N]`` (float32, or the activation dtype); int8 -> ``[N]`` float32.
    """
    weight: torch.Tensor
    scales: torch.Tensor
    weight_kind: str  # "int4" or "int8"
    group_size: int  # int4's group (0 for int8)

    @property
    def in_features(self) -> int:
        return self.weight.shape[0] * (8 if self.weight_kind == "int4" else 1)

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]


def mixed_mm_supports(weight_kind: str, scale_kind: str, in_features: int, group_size: int = 0) -> bool:
    """Whether a weight-only linear can take :func:`mixed_mm` at all (decided once, at load time).

    False while :data:`MIXED_MM_MIN_ROWS` is None.  int4 needs group scales with a group that is a
    multiple of 64 (BK divides it); int8 per-channel scales.
    """
    if MIXED_MM_MIN_ROWS is None:
        return False
    if weight_kind == "int4":
        return scale_kind == "group" and group_size % 64 == 0 and in_features % group_size == 0
    return weight_kind == "int8" and scale_kind == "channel" and in_features % 64 == 0


def mixed_mm_applies(weight_kind: str, scale_kind: str, rows: int, in_features: int, group_size: int = 0) -> bool:
    """Whether a weight-only linear's product of ``rows`` rows takes :func:`mixed_mm`."""
    return MIXED_MM_MIN_ROWS is not None and rows >= MIXED_MM_MIN_ROWS and \
        mixed_mm_supports(weight_kind, scale_kind, in_features, group_size)


@torch.no_grad()
def repack_for_mm(packed: torch.Tensor, scales: torch.Tensor, weight_kind: str, group_size: int = 0,
                  scale_dtype: torch.dtype = torch.float32) -> MixedWeight:
    """The checkpoint's codes (int4 packed ``[N/2, K]`` as :func:`trtlm.quant.formats.pack_int4`
    stores them, or int8 ``[N, K]``) and float32 scales (``[N, K/group]`` / ``[N]``) -> :class:`MixedWeight`.

    Done once at load time (a second copy of the codes, same size).  ``scale_dtype`` applies to
    int4 group scales: float32 makes the kernel's dequantized tile bit-identical to the emulation's
    ``(q * s).to(dtype)``; the activation dtype saves a float32 multiply per weight element (one
    extra rounding of each scale, 2**-9 relative for bfloat16).
    """
    from trtlm.quant.formats import unpack_int4

    if weight_kind == "int8":
        return MixedWeight(packed.t().contiguous(), scales.reshape(-1).float().contiguous(), "int8", 0)
    if weight_kind != "int4":
        raise ValueError(f"mixed_mm takes int4 or int8 weights, not {weight_kind}")
    q = unpack_int4(packed).t()  # [K, N] signed codes in [-8, 7]
    K, N = q.shape
    if K % 8 or K % group_size or scales.shape[-1] * group_size != K:
        raise ValueError(f"in_features {K} vs group size {group_size} / scales {tuple(scales.shape)}")
    q = q.reshape(K // 8, 8, N).to(torch.int32)
    # nibble j at bits 4j..4j+3; the top one as a signed multiple of 2**28 (no int32 overflow)
    w = q[:, 7] * (1 << 28)
    for j in range(7):
        w |= (q[:, j] & 0xF) << (4 * j)
    return MixedWeight(w.contiguous(), scales.t().to(scale_dtype).contiguous(), "int4", group_size)


@functools.lru_cache(maxsize=None)
def _mixed_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def mixed_mm_kernel(
        x_ptr, w_ptr, s_ptr, p_ptr, y_ptr,
        M, N, ITERS, stride_xm, stride_ym,
        GROUP: tl.constexpr, WKIND: tl.constexpr, HAS_P: tl.constexpr, ATOMIC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        # One [BM, BN] output tile per program (split-K over axis 2).  Per K step: the x tile, the
        # weight tile read row-contiguously from the K-major repacked codes, unpacked and scaled to
        # a [BK, BN] tile in the activation dtype, then ONE tl.dot into a float32 accumulator --
        # the shape Hopper's tensor cores want (the older kernel does two half-width dots on a
        # transposed load).  WKIND: 1 int4 (group scales before the dot), 0 int8 (per-channel
        # scales on the accumulator).
        BKW: tl.constexpr = BK // 8 if WKIND == 1 else BK  # weight rows per K step
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        m_mask = rows < M
        n_mask = cols < N
        k_start = pid_k * ITERS * BK
        offs_k = k_start + tl.arange(0, BK)
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + (k_start // (BK // BKW) + tl.arange(0, BKW))[:, None].to(tl.int64) * N + cols[None, :]
        p_ptrs = p_ptr + offs_k
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for it in range(0, ITERS):
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            if HAS_P:  # AWQ: `x * prequant.to(x.dtype)`, the product rounded to x's dtype as torch does
                p = tl.load(p_ptrs).to(x_ptr.dtype.element_ty)
                x = (x.to(tl.float32) * p.to(tl.float32)[None, :]).to(x_ptr.dtype.element_ty)
                p_ptrs += BK
            b = tl.load(w_ptrs, mask=n_mask[None, :], other=0)
            if WKIND == 1:
                # [BK/8, BN] int32 -> [BK/8, 8, BN]: nibble j shifted to the top, arithmetic shift
                # back sign-extends it -> row-major reshape puts k = 8i + j at row 8i + j
                sh = 28 - 4 * tl.arange(0, 8)
                q = tl.reshape((b[:, None, :] << sh[None, :, None]) >> 28, (BK, BN))
                g = (k_start + it * BK) // GROUP  # BK divides GROUP: one group per step
                s = tl.load(s_ptr + g * N + cols, mask=n_mask, other=0.0)
                w = (q.to(s_ptr.dtype.element_ty) * s[None, :]).to(x_ptr.dtype.element_ty)
            else:
                w = b.to(x_ptr.dtype.element_ty)  # int8 codes are exact in fp16/bf16
            acc = tl.dot(x, w, acc)
            x_ptrs += BK
            w_ptrs += BKW * N
        if WKIND == 0:
            acc = acc * tl.load(s_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        if ATOMIC:
            tl.atomic_add(y_ptrs, acc, mask=mask)
        else:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    return mixed_mm_kernel


def _mm_config(M: int, N: int, K: int, group_size: int = 0, sms: int = 132, config: dict | None = None) -> dict:
    """Tiles for :func:`mixed_mm`: ``bm``, ``bn``, ``bk``, ``split``, ``num_warps``, ``num_stages``,
    the defaults below updated with ``config`` (a sweep's overrides; without ``split`` there, the
    split rule is applied to the overridden tiles).

    Defaults from ``quant_kernels_bench.py --mixed-mm`` on an H200 (bench/results/h200_engine/run6):
    up to 128 rows, 64x64 tiles with BK 128, 4 warps, 4 stages won for int4 and int8 at every
    Mistral-7B shape and 32/64/128 rows (1.05-1.45x the 128-wide tiles); beyond, 128x128 tiles for
    the compute-bound prefill. BK 64 where that is what divides K or the group; split-K only when the
    output tiles fill fewer than ~3/4 of the SMs (N = 4096 at 64 rows: 64 tiles on 132 SMs -> 2),
    each part keeping at least 4 K steps.
    """
    bm = 16 if M <= 16 else 64 if M <= 128 else 128
    bk = 128 if (K % 128 == 0 and (not group_size or group_size % 128 == 0)) else 64
    bn = 64 if M <= 128 else 128
    cfg = {"bm": bm, "bn": bn, "bk": bk, "num_warps": 8 if bm >= 128 else 4, "num_stages": 3 if bm >= 128 else 4,
           **(config or {})}
    iters = max(1, K // cfg["bk"])
    if "split" not in cfg:
        tiles = math.ceil(M / cfg["bm"]) * math.ceil(N / cfg["bn"])
        cfg["split"] = 1 if 4 * tiles >= 3 * sms else min(math.ceil(sms / tiles), max(1, iters // 4))
    cfg["split"] = _divisor_at_most(iters, cfg["split"])
    return cfg


def mixed_mm(x: torch.Tensor, w: MixedWeight, prequant: torch.Tensor | None = None,
             config: dict | None = None) -> torch.Tensor:
    """``y = (x [* prequant]) @ dequant(w)^T`` for many rows (decode batches, prefill): ``x [M, K]`` float16/bfloat16
    -> ``[M, N]`` in ``x.dtype``, from the repacked weight of :func:`repack_for_mm`.

    :param prequant: AWQ's pre-quant scale ``[K]``, applied to x as ``x * prequant.to(x.dtype)``.
    :param config: overrides of :func:`_mm_config`'s keys, for sweeps (``split`` is rounded down
        to a divisor of the K steps).
    """
    x = x.contiguous()
    M, K = x.shape
    N = w.out_features
    if K != w.in_features:
        raise ValueError(f"x has {K} columns, the weight {w.in_features} inputs")
    wk = _WKIND[w.weight_kind]
    sms = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.device.type == "cuda" else 132
    cfg = _mm_config(M, N, K, w.group_size, sms, config)
    bm, bn, bk, split = cfg["bm"], cfg["bn"], cfg["bk"], cfg["split"]
    if K % bk or (wk == 1 and w.group_size % bk):
        raise ValueError(f"BK {bk} must divide in_features {K}" + (f" and the group {w.group_size}" if wk == 1 else ""))
    iters = K // bk
    atomic = split > 1
    y = torch.zeros(M, N, dtype=torch.float32, device=x.device) if atomic else torch.empty(
        M, N, dtype=x.dtype, device=x.device)
    grid = (math.ceil(M / bm), math.ceil(N / bn), split)
    _mixed_kernel()[grid](
        x, w.weight, w.scales, prequant if prequant is not None else x, y,
        M, N, iters // split, x.stride(0), y.stride(0),
        GROUP=w.group_size if wk == 1 else 1, WKIND=wk, HAS_P=prequant is not None, ATOMIC=atomic,
        BM=bm, BN=bn, BK=bk, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.to(x.dtype) if atomic else y


# ----------------------------------------------------------------------------- activation quantization

@functools.lru_cache(maxsize=None)
def _act_quant_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def act_quant_kernel(x_ptr, p_ptr, a_ptr, out_ptr, K, stride_x, stride_o,
                         HAS_P: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr):
        # static per-tensor quantization of one row tile: (x [* p]) / a, rounded and clamped
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < K
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_P:  # `x * prequant.to(x.dtype)`: the product rounded to the activation dtype, as torch does
            p = tl.load(p_ptr + cols, mask=mask, other=0.0).to(x_ptr.dtype.element_ty)
            x = (x.to(tl.float32) * p.to(tl.float32)).to(x_ptr.dtype.element_ty)
        y = tl.math.div_rn(x.to(tl.float32), tl.load(a_ptr))  # IEEE division, as torch's `/`
        if KIND == 0:  # float8_e4m3fn: clamp to the finite range, round to nearest even
            q = tl.minimum(tl.maximum(y, -448.0), 448.0).to(out_ptr.dtype.element_ty)
        else:  # int8: round half to even, clamp
            f = tl.floor(y)
            d = y - f
            odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
            r = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
            q = tl.minimum(tl.maximum(r, -128.0), 127.0).to(tl.int8)
        tl.store(out_ptr + row * stride_o + cols, q, mask=mask)

    return act_quant_kernel


def quantize_activation(x: torch.Tensor, a_scale: torch.Tensor, kind: str,
                        prequant: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K]`` (times ``prequant``) quantized with the static per-tensor scale ``a_scale``:
    ``kind`` ``"fp8"`` -> float8_e4m3fn, ``"int8"`` -> int8 (round half to even).  One Triton kernel
    on CUDA (torch's ops take four or five: multiply, divide, round, clamp, cast); torch elsewhere."""
    a = a_scale.float().reshape(())
    if not (x.is_cuda and triton_available() and x.dim() == 2 and x.stride(-1) == 1):
        xs = x * prequant.to(x.dtype) if prequant is not None else x
        y = xs.float() / a
        if kind == "fp8":
            from trtlm.quant.formats import FP8_MAX

            return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return y.round().clamp(-128, 127).to(torch.int8)
    M, K = x.shape
    out = torch.empty((M, K), dtype=torch.float8_e4m3fn if kind == "fp8" else torch.int8, device=x.device)
    if M:
        block = 1024
        _act_quant_kernel()[(M, math.ceil(K / block))](
            x, prequant if prequant is not None else x, a.reshape(1), out, K, x.stride(0), out.stride(0),
            HAS_P=prequant is not None, KIND=0 if kind == "fp8" else 1, BLOCK=block, num_warps=4)
    return out


# ----------------------------------------------------------------------------- torch's kernels

def fp8_scaled_mm(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """FP8 W8A8 with a static activation scale: ``x`` ``[M, K]`` -> ``[M, N]`` in ``out_dtype``
    (default ``x.dtype``).  ``x`` may already be FP8, quantized with ``a_scale`` by the op that
    produced it (a fused RMSNorm or SwiGLU); otherwise it is quantized here.

    ``w_scale`` per tensor ``[1]`` or per output channel ``[N]`` (the latter applied to the
    float32 output, since cuBLASLt's row-wise scaling is limited to bfloat16 outputs).
    """
    out_dtype = out_dtype or x.dtype
    a = a_scale.float().reshape(())
    xq = x if x.dtype == torch.float8_e4m3fn else quantize_activation(x, a, "fp8")
    if w_scale.numel() == 1:
        return torch._scaled_mm(xq, weight.t(), scale_a=a, scale_b=w_scale.float().reshape(()), out_dtype=out_dtype)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    y = torch._scaled_mm(xq, weight.t(), scale_a=a, scale_b=one, out_dtype=torch.float32)
    return (y * w_scale.float()).to(out_dtype)


def int8_int_mm(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor,
                prequant: torch.Tensor | None) -> torch.Tensor:
    """SmoothQuant W8A8: ``round((x * p) / a).clamp(-128, 127)`` int8 times int8 weight, int32 exact.

    ``x`` ``[M, K]`` with M > 16 (``torch._int_mm``'s requirement), output in ``x.dtype``.
    """
    a = a_scale.float().reshape(())
    xq = quantize_activation(x, a, "int8", prequant)
    acc = torch._int_mm(xq, weight.t())
    return (acc.float() * (a * w_scale.float())).to(x.dtype)


def repack_int4pack(packed: torch.Tensor, scales: torch.Tensor, inner_k_tiles: int = 8):
    """trtlm's packed int4 ``[N/2, K]`` + float32 group scales ``[N, K/g]`` -> tinygemm's operands.

    tinygemm dequantizes ``(u - 8) * scale + zero`` with ``u`` unsigned 4-bit; trtlm's signed
    codes ``q`` are ``u - 8`` with zero 0.  Input to ``_convert_weight_to_int4pack``: uint8
    ``[N, K/2]``, the even ``k`` in the high nibble.
    """
    from trtlm.quant.formats import unpack_int4

    q = unpack_int4(packed).to(torch.int32) + 8  # [N, K] in [0, 15]
    u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    w = torch._convert_weight_to_int4pack(u8.contiguous(), inner_k_tiles)
    sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1).to(torch.bfloat16).contiguous()
    return w, sz


def int4pack_mm(x: torch.Tensor, w: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
                prequant: torch.Tensor | None) -> torch.Tensor:
    xs = x * prequant.to(x.dtype) if prequant is not None else x
    return torch._weight_int4pack_mm(xs.to(torch.bfloat16), w, group_size, scales_zeros).to(x.dtype)
