"""Triton kernels of :mod:`trtlm.runtime.kernels.fused` (imported only when a CUDA tensor needs them).

One program per token row; each kernel reads its rows once and writes them once.  Rounding
follows the torch references step by step (see :mod:`.fused`), which is why every launch passes
``enable_fp_fusion=False``: with fusion on, the compiler narrows ``x*cos + r*sin`` (two products
rounded to bf16, then a rounded sum) into one bf16 FMA that rounds once -- 11% of RoPE's outputs
then differed from torch's by one unit in the last place (seen on an H200).  These kernels are
memory-bound; the FMA bought nothing.  The launches depend on shapes
only, so they are captured in the engine's CUDA graphs like everything else.  Each launches with
programmatic dependent launch where the GPU has it (:mod:`.pdl`), waiting for the kernel before
in its first instruction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtlm.runtime.kernels.pdl import pdl_options, pdl_release, pdl_wait


@triton.jit
def _add_rms_norm_kernel(X, D, W, OUT, RES, A, stride_x, stride_d, stride_o, stride_r, n_cols, eps,
                         HAS_DELTA: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    pdl_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:  # the residual add, rounded to the activation dtype as torch's `x + delta`
        d = tl.load(D + row * stride_d + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(RES + row * stride_r + cols, x, mask=mask)
    h = x.to(tl.float32)
    mean_sq = tl.sum(h * h, axis=0) / n_cols
    normed = (h * tl.math.rsqrt(mean_sq + eps)).to(X.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    if QUANT:  # the next linear's FP8 input: rounded to the activation dtype first, as unfused
        y = tl.math.div_rn(out.to(X.dtype.element_ty).to(tl.float32), tl.load(A))
        tl.store(OUT + row * stride_o + cols, tl.minimum(tl.maximum(y, -448.0), 448.0).to(OUT.dtype.element_ty),
                 mask=mask)
    else:
        tl.store(OUT + row * stride_o + cols, out.to(OUT.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, fp8_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.stride(-1) != 1:
        x = x.contiguous()
    if delta is not None and delta.stride(-1) != 1:
        delta = delta.contiguous()
    n, h = x.shape
    dtype = torch.float8_e4m3fn if fp8_scale is not None else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty((n, h), dtype=dtype, device=x.device)
    res = torch.empty_like(x) if delta is not None else x
    if n:
        block = triton.next_power_of_2(h)
        _add_rms_norm_kernel[(n,)](
            x, delta if delta is not None else x, weight, out, res, fp8_scale if fp8_scale is not None else weight,
            x.stride(0), delta.stride(0) if delta is not None else 0, out.stride(0), res.stride(0), h, float(eps),
            HAS_DELTA=delta is not None, QUANT=fp8_scale is not None, BLOCK=block, **pdl_options(x.device),
            num_warps=max(1, min(16, block // 256)), enable_fp_fusion=False)
    return res, out


@triton.jit
def _rope_kernel(X, COS, SIN, OUT, stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh, n_heads,
                 HALF: tl.constexpr, H_PAD: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    pdl_release(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, H_PAD)[:, None]
    j = tl.arange(0, HALF)[None, :]
    mask = h < n_heads
    x_lo = tl.load(X + t * stride_xt + h * stride_xh + j, mask=mask, other=0.0).to(tl.float32)
    x_hi = tl.load(X + t * stride_xt + h * stride_xh + HALF + j, mask=mask, other=0.0).to(tl.float32)
    c_lo = tl.load(COS + t * stride_ct + j).to(tl.float32)
    c_hi = tl.load(COS + t * stride_ct + HALF + j).to(tl.float32)
    s_lo = tl.load(SIN + t * stride_st + j).to(tl.float32)
    s_hi = tl.load(SIN + t * stride_st + HALF + j).to(tl.float32)
    dt = OUT.dtype.element_ty
    # x * cos + rotated * sin, each product rounded to the activation dtype as torch rounds it
    lo = (x_lo * c_lo).to(dt).to(tl.float32) + (-x_hi * s_lo).to(dt).to(tl.float32)
    hi = (x_hi * c_hi).to(dt).to(tl.float32) + (x_lo * s_hi).to(dt).to(tl.float32)
    tl.store(OUT + t * stride_ot + h * stride_oh + j, lo.to(dt), mask=mask)
    tl.store(OUT + t * stride_ot + h * stride_oh + HALF + j, hi.to(dt), mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Requires an even, power-of-two head size (the dispatcher checks)."""
    n, heads, d = x.shape
    cos2, sin2 = cos.reshape(n, d), sin.reshape(n, d)
    out = torch.empty((n, heads, d), dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    if n:
        _rope_kernel[(n,)](x, cos2, sin2, out, x.stride(0), x.stride(1), cos2.stride(0), sin2.stride(0),
                           out.stride(0), out.stride(1), heads, HALF=d // 2,
                           H_PAD=triton.next_power_of_2(heads), **pdl_options(x.device), num_warps=4,
                           enable_fp_fusion=False)
    return out


@triton.jit
def _silu_mul_kernel(X, OUT, stride_x, stride_o, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    pdl_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    a = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(X + row * stride_x + inter + cols, mask=mask, other=0.0)
    dt = OUT.dtype.element_ty
    s = (a / (1.0 + tl.exp(-a))).to(dt)  # F.silu's result in the activation dtype
    tl.store(OUT + row * stride_o + cols, (s.to(tl.float32) * g.to(tl.float32)).to(dt), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    n, two_i = x.shape
    inter = two_i // 2
    out = torch.empty((n, inter), dtype=x.dtype, device=x.device)
    if n:
        block = 1024
        _silu_mul_kernel[(n, triton.cdiv(inter, block))](x, out, x.stride(0), out.stride(0), inter, BLOCK=block,
                                                         **pdl_options(x.device), num_warps=4, enable_fp_fusion=False)
    return out


@triton.jit
def _silu_mul_fp8_kernel(Y, S, A, OUT, stride_y, stride_o, inter, DT: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    pdl_wait(PDL)
    pdl_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    # each half scaled by its weight scale and rounded to the activation dtype, as each linear outputs it
    a = (tl.load(Y + row * stride_y + cols, mask=mask, other=0.0)
         * tl.load(S + cols, mask=mask, other=0.0)).to(DT).to(tl.float32)
    g = (tl.load(Y + row * stride_y + inter + cols, mask=mask, other=0.0)
         * tl.load(S + inter + cols, mask=mask, other=0.0)).to(DT)
    s = (a / (1.0 + tl.exp(-a))).to(DT)
    v = (s.to(tl.float32) * g.to(tl.float32)).to(DT)
    y = tl.math.div_rn(v.to(tl.float32), tl.load(A))
    tl.store(OUT + row * stride_o + cols, tl.minimum(tl.maximum(y, -448.0), 448.0).to(OUT.dtype.element_ty),
             mask=mask)


#: torch -> Triton dtypes, for kernels that take the activation dtype as a constexpr
TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def silu_mul_fp8(y: torch.Tensor, col_scale: torch.Tensor, dtype: torch.dtype, fp8_scale: torch.Tensor) -> torch.Tensor:
    n, two_i = y.shape
    inter = two_i // 2
    out = torch.empty((n, inter), dtype=torch.float8_e4m3fn, device=y.device)
    if n:
        block = 1024
        _silu_mul_fp8_kernel[(n, triton.cdiv(inter, block))](
            y, col_scale, fp8_scale, out, y.stride(0), out.stride(0), inter, DT=TL_DTYPES[dtype], BLOCK=block,
            **pdl_options(y.device), num_warps=4, enable_fp_fusion=False)
    return out
