"""Fused elementwise ops of the decoder layer: residual add + RMSNorm, RoPE, SiLU-and-multiply.

Why: at decode a layer's matrix products read megabytes while its elementwise ops read
kilobytes, yet written in torch each op is several kernels (RMSNorm alone is eight: cast, pow,
mean, add, rsqrt, multiply, cast, multiply).  A 7B model's decode step then launches about a
thousand kernels, and even replayed from a CUDA graph each costs a couple of microseconds of
GPU time — milliseconds per token at batch 1, where the weights take 3.4 ms.  Each op below is
one kernel, with one read and one write of its rows.

Every op has a torch reference here (``*_ref``): what the CPU runs, and the tests' oracle.  The
Triton kernels round where the reference rounds (every intermediate the reference stores in the
activation dtype is rounded to it in the kernel too), so they differ from it only in the order
of a float32 sum (RMSNorm's mean of squares) and in transcendental functions' last bits (SiLU's
``exp``): about one unit in the last place of bf16, not more.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- references
def add_rms_norm_ref(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + delta`` (the residual stream) and its RMSNorm, as transformers computes it: float32
    statistics, normalized value cast back to ``x.dtype``, then scaled by ``weight``."""
    if delta is not None:
        x = x + delta
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return x, weight * h.to(x.dtype)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [N, heads, D]`` (GPT-NeoX halves) with ``cos``/``sin`` ``[N, 1, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``silu(a) * g`` for ``x = [a | g]`` ``[N, 2I]`` -> ``[N, I]``."""
    a, g = x.chunk(2, dim=-1)
    return F.silu(a) * g


def quantize_fp8_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor FP8 activation quantization: ``float8_e4m3fn(clamp(x / scale))`` in
    float32 (what :func:`trtlm.quant.kernels.quantize_activation` computes)."""
    from trtlm.quant.formats import quantize_fp8

    return quantize_fp8(x, scale)


def add_rms_norm_fp8_ref(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                         scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_rms_norm_ref` with its normalized output quantized to FP8 for the next linear."""
    x, h = add_rms_norm_ref(x, delta, weight, eps)
    return x, quantize_fp8_ref(h, scale)


def silu_mul_fp8_ref(y: torch.Tensor, col_scale: torch.Tensor, dtype: torch.dtype,
                     scale: torch.Tensor) -> torch.Tensor:
    """The SwiGLU of an FP8 gate/up product, quantized for the down projection: ``y [N, 2I]`` is
    the float32 product before the weight scales, ``col_scale [2I]`` the per-column weight scales;
    each half is scaled and rounded to ``dtype`` (what each linear alone would output), then
    ``silu(a) * g`` in ``dtype``, then FP8 with the down projection's activation scale."""
    return quantize_fp8_ref(silu_mul_ref((y * col_scale.float()).to(dtype)), scale)


# ----------------------------------------------------------------------------- dispatch
@functools.lru_cache(maxsize=1)
def _triton_present() -> bool:
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and _triton_present()


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + delta, rms_norm(x + delta) * weight)`` for ``x [N, H]`` (``delta`` may be None)."""
    if _use_triton(x) and x.dim() == 2:
        from trtlm.runtime.kernels import fused_triton

        return fused_triton.add_rms_norm(x, delta, weight, eps)
    return add_rms_norm_ref(x, delta, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x [N, heads, D]`` (any strides in N and heads) -> a new contiguous tensor."""
    d = x.shape[-1]
    if _use_triton(x) and x.dim() == 3 and x.stride(-1) == 1 and d % 2 == 0 and d & (d - 1) == 0:
        from trtlm.runtime.kernels import fused_triton

        return fused_triton.rope(x, cos, sin)
    return rope_ref(x, cos, sin)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(a) * g`` for ``x = [a | g]`` ``[N, 2I]``."""
    if _use_triton(x) and x.dim() == 2 and x.stride(-1) == 1:
        from trtlm.runtime.kernels import fused_triton

        return fused_triton.silu_mul(x)
    return silu_mul_ref(x)


# FP8 activations: the quantization of a linear's input fused into the op that produces it
# (issue 15: one kernel fewer per FP8 linear, and the SwiGLU's products as one FP8 GEMM).
def add_rms_norm_fp8(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + delta, fp8(rms_norm(x + delta) * weight / scale))``: the residual stream, and the
    normalized activations already quantized for an FP8 linear with static input ``scale``."""
    if _use_triton(x) and x.dim() == 2 and x.dtype == weight.dtype:
        from trtlm.runtime.kernels import fused_triton

        return fused_triton.add_rms_norm(x, delta, weight, eps, scale)
    return add_rms_norm_fp8_ref(x, delta, weight, eps, scale)


def silu_mul_fp8(y: torch.Tensor, col_scale: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    """See :func:`silu_mul_fp8_ref`; one kernel on the GPU."""
    if _use_triton(y) and y.dim() == 2 and y.stride(-1) == 1:
        from trtlm.runtime.kernels import fused_triton

        return fused_triton.silu_mul_fp8(y, col_scale, dtype, scale)
    return silu_mul_fp8_ref(y, col_scale, dtype, scale)
