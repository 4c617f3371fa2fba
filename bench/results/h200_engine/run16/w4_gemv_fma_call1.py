"""The one-row int4 product of a decode step (W4A16: int4 weight-only and AWQ), in CUDA C.

At batch 1 every linear is a matrix-vector product bound by the bytes it reads, so int4 can only
be up to 4x faster than bf16 if its kernel keeps the memory system as busy as cuBLAS does for bf16.
Our Triton GEMVs reached 0.6-2.0 TB/s on the H200 (docs/benchmarks.md, run 15): Triton did not
issue a program's loads ahead of the arithmetic that used them, so each SM had too few bytes in
flight to hide DRAM latency.  This kernel is written for exactly that:

- **Every thread issues all the loads of a 128-deep slice of K first** (16 ``[K/8, N]`` words of 2
  or 4 adjacent outputs, 128 or 256 bytes, in registers), **before** ``griddepcontrol.wait``: the
  weights are never written by the kernel before, so with programmatic dependent launch
  (:mod:`trtlm.runtime.kernels.pdl`) they stream while that kernel finishes.  Only then is the
  input read.  The grid splits K across blocks so that every SM holds tens of kilobytes in flight.
- **Nibbles become floats with one byte permute each**: a word's even and odd nibbles are masked
  (and their sign bits flipped, ``u = q + 8``) with one ``lop3`` each; ``prmt`` puts each byte under
  float32's exponent byte 0x3F, the float ``0.5 + u/256``; one FMA accumulates it against x.  The
  offset is removed once per 128-wide slice with the slice's sum of x (computed once per block):
  ``sum x q = 256 sum x f - 136 sum x``.  About 2.4 instructions per weight.
- The input slice is converted to float32 once per block into shared memory (AWQ's pre-quant
  scale applied there), and read back as broadcasts.
- Split K is reduced without atomics on the output: each block writes its partial sums, the last
  block of a column (a counter, reset by that block, so CUDA-graph replays find it zero) adds them
  in a fixed order and writes the output.  Results do not depend on which block finishes last.

Weights are the ``[K/8, N]`` words of :class:`trtlm.quant.kernels.MixedWeight` (the layout the
many-row ``mixed_mm`` reads too), scales ``[K/group, N]`` float32 (per-channel scales: one group of
K).  Compiled with NVRTC (:mod:`trtlm.runtime.kernels.nvrtc`) once per shape configuration.

Numerics: codes, scales and x are exact in float32 and the products accumulate in float32; the
offset removal loses at most a few of float32's 24 bits (the result is rounded to 8 or 11 bits).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from trtlm.quant.kernels import MixedWeight

__all__ = ["W4GemvConfig", "w4_configs", "w4_gemv", "w4_gemv_supports", "w4_gemv_available", "w4_gemv_config", "prepare_w4_gemv"]

_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
#if TN == 2
typedef uint2 wvec;
typedef float2 svec;
#else
typedef uint4 wvec;
typedef float4 svec;
#endif
#define KB (WARPS * SEGS * 128)  /* the k of one block */

__device__ __forceinline__ float to_f32(u16 v) {
#if X_BF16
  return __uint_as_float(((u32)v) << 16);
#else
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f;
#endif
}

__device__ __forceinline__ u16 from_f32(float f) {
  u16 r;
#if X_BF16
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
#endif
  return r;
}

/* (a & 0x0F0F0F0F) ^ 0x08080808 in one lop3: four nibbles, sign bits flipped (u = q + 8) */
__device__ __forceinline__ u32 nibbles(u32 a) {
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0x6a;" : "=r"(r) : "r"(a), "n"(0x0F0F0F0F), "r"(0x08080808u));
  return r;
}

/* 0.5 + u/256 for the byte B of e (u < 16): the byte under exponent byte 0x3F */
#define NIB(e, B) __uint_as_float(__byte_perm((e), 0x3Fu, 0x4055u | ((B) << 8)))

extern "C" __global__ void __launch_bounds__(WARPS * 32)
w4_gemv(const u16* __restrict__ x, const u32* __restrict__ w, const float* __restrict__ scales,
        const u16* __restrict__ pre, float* __restrict__ partial, u32* __restrict__ counters,
        u16* __restrict__ y, int N)
{
  __shared__ __align__(16) float xs[KB];
  __shared__ float xsum[KB / 128];
  __shared__ float red[WARPS][32 * TN];
  __shared__ int last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.x * 32 + lane) * TN;
  const int kb0 = blockIdx.y * KB;
  const int seg0 = warp * SEGS;  /* the warp's first 128-slice within the block */
  const size_t stride = N / TN;  /* one word row, in wvec */
  const wvec* wp = reinterpret_cast<const wvec*>(w + (size_t)((kb0 + seg0 * 128) / 8) * N + n0);

  wvec cur[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) cur[j] = __ldg(wp + j * stride);

  asm volatile("griddepcontrol.wait;" ::: "memory");
  for (int i = threadIdx.x; i < KB; i += WARPS * 32) {
    float v = to_f32(x[kb0 + i]);
#if HAS_PRE
    v *= to_f32(pre[kb0 + i]);
#endif
    xs[i] = v;
  }
  __syncthreads();
  for (int s = warp; s < KB / 128; s += WARPS) {
    const float* q = xs + s * 128;
    float v = (q[lane] + q[lane + 32]) + (q[lane + 64] + q[lane + 96]);
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) xsum[s] = v;
  }
  __syncthreads();
  asm volatile("griddepcontrol.launch_dependents;");

  float acc[TN];
#pragma unroll
  for (int t = 0; t < TN; ++t) acc[t] = 0.f;
#pragma unroll
  for (int s = 0; s < SEGS; ++s) {
    wvec nxt[16];
    if (s + 1 < SEGS) {
#pragma unroll
      for (int j = 0; j < 16; ++j) nxt[j] = __ldg(wp + ((s + 1) * 16 + j) * stride);
    }
    float dot[TN];
#pragma unroll
    for (int t = 0; t < TN; ++t) dot[t] = 0.f;
    const float* xq = xs + (seg0 + s) * 128;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float4 xa = *reinterpret_cast<const float4*>(xq + 8 * j);
      const float4 xb = *reinterpret_cast<const float4*>(xq + 8 * j + 4);
      const u32* wv = reinterpret_cast<const u32*>(&cur[j]);
#pragma unroll
      for (int t = 0; t < TN; ++t) {
        /* word bits 4i..4i+3: the two's complement code of k = 8j + i */
        const u32 e = nibbles(wv[t]), o = nibbles(wv[t] >> 4);
        float d = dot[t];
        d = fmaf(xa.x, NIB(e, 0), d); d = fmaf(xa.y, NIB(o, 0), d);
        d = fmaf(xa.z, NIB(e, 1), d); d = fmaf(xa.w, NIB(o, 1), d);
        d = fmaf(xb.x, NIB(e, 2), d); d = fmaf(xb.y, NIB(o, 2), d);
        d = fmaf(xb.z, NIB(e, 3), d); d = fmaf(xb.w, NIB(o, 3), d);
        dot[t] = d;
      }
    }
    const int g = (kb0 + (seg0 + s) * 128) / GROUP;
    const svec sc = __ldg(reinterpret_cast<const svec*>(scales + (size_t)g * N + n0));
    const float* scv = reinterpret_cast<const float*>(&sc);
    const float c = 136.f * xsum[seg0 + s];
#pragma unroll
    for (int t = 0; t < TN; ++t) acc[t] = fmaf(scv[t], fmaf(256.f, dot[t], -c), acc[t]);
    if (s + 1 < SEGS) {
#pragma unroll
      for (int j = 0; j < 16; ++j) cur[j] = nxt[j];
    }
  }

#pragma unroll
  for (int t = 0; t < TN; ++t) red[warp][lane * TN + t] = acc[t];
  __syncthreads();
  const int n = blockIdx.x * 32 * TN + threadIdx.x;
  if (threadIdx.x < 32 * TN) {
    float v = 0.f;
#pragma unroll
    for (int i = 0; i < WARPS; ++i) v += red[i][threadIdx.x];
#if SPLITS == 1
    y[n] = from_f32(v);
#else
    partial[(size_t)blockIdx.y * N + n] = v;
    __threadfence();
#endif
  }
#if SPLITS > 1
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + blockIdx.x, 1u) == SPLITS - 1;
  __syncthreads();
  if (last) {
    if (threadIdx.x < 32 * TN) {
      float v = 0.f;
      for (int i = 0; i < SPLITS; ++i) v += __ldcg(partial + (size_t)i * N + n);
      y[n] = from_f32(v);
    }
    if (threadIdx.x == 0) counters[blockIdx.x] = 0u;
  }
#endif
}
"""


class W4GemvConfig(NamedTuple):
    """How :func:`w4_gemv` splits a product: ``tn`` outputs per thread (2 or 4), ``warps`` per
    block, ``segs`` 128-deep slices of K per warp, ``splits`` blocks along K.  ``K`` must equal
    ``splits * warps * segs * 128``."""
    tn: int
    warps: int
    segs: int
    splits: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def w4_gemv_config(N: int, K: int, sms: int = 132) -> W4GemvConfig | None:
    """A configuration for ``[N, K]`` (None where the kernel does not apply): two outputs per
    thread, eight warps of one 128-slice each, and as many K splits as give every SM at least
    ~4 blocks (the bytes in flight hide DRAM latency), at most 16."""
    if K % 1024 or N % 64:
        return None
    slices = K // 128
    columns = N // 64
    for splits in _divisors(slices // 8):
        if columns * splits >= 4 * sms or splits == slices // 8:
            return W4GemvConfig(2, 8, slices // 8 // splits, splits)
    return None


def w4_configs(N: int, K: int) -> list[W4GemvConfig]:
    """Every configuration that tiles ``[N, K]`` within sensible limits (the benchmark's sweep)."""
    out = []
    for tn in (2, 4):
        for warps in (4, 8):
            for segs in (1, 2):
                splits, rest = divmod(K, warps * segs * 128)
                if not rest and splits <= 32 and N % (32 * tn) == 0 and warps >= tn:
                    out.append(W4GemvConfig(tn, warps, segs, splits))
    return out


def w4_gemv_supports(weight: MixedWeight) -> bool:
    """Whether the kernel takes this repacked int4 weight (groups a multiple of 128, shapes that
    split evenly)."""
    K, N = weight.in_features, weight.out_features
    return (weight.weight_kind == "int4" and weight.group_size % 128 == 0 and weight.scales.dtype == torch.float32
            and w4_gemv_config(N, K) is not None)


def w4_gemv_available(device: torch.device) -> bool:
    """CUDA C kernels compile here (NVRTC) and the device is sm_80 or newer."""
    from trtlm.runtime.kernels.nvrtc import nvrtc_available
    return (device.type == "cuda" and nvrtc_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


@functools.lru_cache(maxsize=None)
def _source(cfg: W4GemvConfig, group: int, x_bf16: bool, has_pre: bool) -> str:
    head = (f"#define TN {cfg.tn}\n#define WARPS {cfg.warps}\n#define SEGS {cfg.segs}\n"
            f"#define SPLITS {cfg.splits}\n#define GROUP {group}\n#define X_BF16 {int(x_bf16)}\n"
            f"#define HAS_PRE {int(has_pre)}\n")
    return head + _SOURCE


_counters: dict[torch.device, torch.Tensor] = {}


def _counter_buffer(device: torch.device, n: int) -> torch.Tensor:
    """The split-K counters (all zero between launches: the last block of a column resets its own).
    One buffer per device, shared by every linear: a launch waits for the one before to complete
    before it touches them (``griddepcontrol.wait``), and linears run in stream order."""
    buf = _counters.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _counters[device] = buf
    return buf


def _kernel(weight: MixedWeight, dtype: torch.dtype, has_pre: bool, config: W4GemvConfig | None = None):
    from trtlm.runtime.kernels.nvrtc import compile_kernel

    K, N = weight.in_features, weight.out_features
    cfg = config or w4_gemv_config(N, K)
    src = _source(cfg, weight.group_size, dtype == torch.bfloat16, has_pre)
    return cfg, compile_kernel(src, "w4_gemv", weight.weight.device)


def prepare_w4_gemv(weight: MixedWeight, dtype: torch.dtype, has_pre: bool) -> None:
    """Compile the kernel and allocate the counters now (load time, not inside a CUDA-graph capture)."""
    cfg, _ = _kernel(weight, dtype, has_pre)
    _counter_buffer(weight.weight.device, weight.out_features // (32 * cfg.tn))


def w4_gemv(x: torch.Tensor, weight: MixedWeight, prequant: torch.Tensor | None = None,
            config: W4GemvConfig | None = None) -> torch.Tensor:
    """``[1, K] @ dequant(weight)^T -> [1, N]`` in x's dtype (float16 or bfloat16); ``prequant``:
    AWQ's pre-quant scale ``[K]``, applied to x in float32."""
    from trtlm.runtime.kernels.pdl import pdl_available

    K, N = weight.in_features, weight.out_features
    cfg, kernel = _kernel(weight, x.dtype, prequant is not None, config)
    if cfg.splits * cfg.warps * cfg.segs * 128 != K or N % (32 * cfg.tn) or cfg.warps < cfg.tn:
        raise ValueError(f"w4_gemv: config {cfg} does not tile [{N}, {K}]")
    x = x.reshape(-1)
    if not x.is_contiguous():
        x = x.contiguous()
    pre = prequant.reshape(-1).to(x.dtype).contiguous() if prequant is not None else None
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    columns = N // (32 * cfg.tn)
    partial = torch.empty(cfg.splits, N, dtype=torch.float32, device=x.device) if cfg.splits > 1 else None
    counters = _counter_buffer(x.device, columns)
    kernel((columns, cfg.splits, 1), (32 * cfg.warps, 1, 1),
           [x, weight.weight, weight.scales, pre, partial, counters, y, N], pdl=pdl_available(x.device))
    return y
