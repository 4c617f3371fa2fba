"""int4 weight-only products (W4A16: int4-wo and AWQ) at decode sizes, on tensor cores, in CUDA C.

At batch 1 every linear is a matrix-vector product bound by the bytes it reads, so int4 can only be
up to 4x faster than bf16 if its kernel keeps the memory system as busy as cuBLAS does for bf16.
tinygemm (``torch._weight_int4pack_mm``) streamed 1.1-1.8 TB/s on the H200 and our Triton GEMVs
0.6-2.0 TB/s (docs/benchmarks.md, run 15: Triton issued no load of a program ahead of the
arithmetic that used it).  Two kernels here, compiled with NVRTC
(:mod:`trtlm.runtime.kernels.nvrtc`) once per shape configuration:

:func:`w4_gemv` (1-8 rows, the decode step's GEMV):

- **Tensor cores do the multiply-adds** (``mma.m16n8k16``, float32 accumulation): the weight is
  the A operand, x the B operand (its 8 columns are up to 8 rows of x, so 1-8 rows cost the same).
  Per weight that leaves ~1 instruction of conversion, against ~2.5 for a float32 FMA GEMV we
  measured first (run 16), which was ALU-bound (it could not overlap its arithmetic with the stream).
- **Codes become 16-bit floats with one ``lop3`` per two** (``(word >> 4i) & 0x000F000F | MAGIC``:
  bfloat16 ``128 + u`` or float16 ``1024 + u``, ``u = q + 8``), because :func:`repack_w4_tiles` stores
  each lane's A fragment in one word.  The offset (136 or 1032) is removed once per 64-slice with
  that slice's sum of x: ``sum x q = sum x (128 + u) - 136 sum x``.
- **Each warp streams its tiles through a ring of stages** in shared memory (``cp.async``, each
  lane copying its own 16-byte fragment words and the lanes of a chunk its scales), so
  ``stages - 1`` stages are in flight while it computes one.  The first stages are issued before
  ``griddepcontrol.wait`` (the kernel before never writes the weights, so with programmatic
  dependent launch they stream while it finishes); then x's slice is copied in the same way, scaled
  by AWQ's pre-quant scale and summed per 64-slice.  Against run 16's all-loads-first kernel this is
  1.07-1.28x faster alone at one row and 1.12-1.53x at 2-8 rows, but only ~2% in the engine's step
  (run 17: there the step's many kernel boundaries, not the stream, set the pace).  Bulk copies by
  the copy engine (``cp.async.bulk``) and stages held in registers were slower (run 17).
- **The SwiGLU can come with it** (``swiglu=True``): given the stacked fc/gate output ``[a | g]``,
  the staging computes ``silu(a) * g`` (one kernel fewer per layer; run 17: the step 2% faster).
- **The configuration per shape** (:class:`W4GemvConfig`) is the fastest of run 17's sweep at
  Mistral-7B's shapes (:data:`W4_MEASURED`), and a rule elsewhere (:func:`w4_gemv_config`).
- **Split K without atomics on the output**: each block writes its partial sums, the last block of
  a column (a counter it resets, so CUDA-graph replays find zeros) adds them in a fixed order.

:func:`w4_gemm` (9-64 rows; the engine uses it up to :data:`trtlm.quant.kernels.W4_GEMM_ROWS`):
the codes stream through the same ring (:func:`issue_stage`/:func:`read_stage` in the source);
x, up to 64 rows, comes in windows of K double-buffered in shared memory (so K need not be split
for x to fit); each weight is dequantized once in registers (``q * scale`` rounded to x's dtype, as
the emulation rounds it: at 9+ rows its cost is spread over one mma per 8 rows) and x's fragments
come by ``ldmatrix``.  A kernel per power of two of 8-row groups (:func:`gemm_cols`).  Run 18,
against bf16 ``F.linear`` at Mistral-7B's shapes: 1.2-1.8x faster at 16 rows, 0.8-1.25x at 32,
0.5-0.8x at 64 (there the mma's alone, without x or dequantization, take 1.4-1.7x bf16's time at
the two small shapes: ``mma.sync`` at 64 rows is compute-bound where cuBLAS's bf16 is not), and
1.3-2.4x faster than run 16's GEMM (all loads issued at once, one step ahead) at every row count.

Numerics: codes, scales and x are exact in the tensor core's inputs and products accumulate in
float32; the GEMV's offset removal costs a few of float32's bits, the GEMM rounds each weight to
x's dtype; the output is rounded once to x's dtype.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import NamedTuple

import torch

__all__ = ["W4Tiles", "repack_w4_tiles", "unpack_w4_tiles", "W4GemvConfig", "W4_GEMV_MAX_ROWS", "w4_configs",
           "w4_gemv_config", "w4_gemv_supports", "w4_gemv_available", "prepare_w4_gemv", "w4_gemv",
           "W4GemmConfig", "W4_GEMM_MAX_ROWS", "w4_gemm_configs", "w4_gemm_config", "w4_gemm"]

_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
#define XPAD 8                   /* bf16 of padding per x row: the 8 rows' B fragments hit 32 banks */
#if X_BF16
#define MAGIC 0x43004300u        /* bfloat16 128.0 twice: 0x4300 | u is 128 + u */
#define OFFSET 136.f             /* 128 + 8: the code q is u - 8 */
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
#else
#define MAGIC 0x64006400u        /* float16 1024.0 twice */
#define OFFSET 1032.f
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
#endif

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

/* Programmatic dependent launch (sm_90+; trtlm.runtime.kernels.pdl): wait until the kernel before
   has completed and its writes are visible / let the kernel after launch.  No-ops where the launch
   did not ask for it; compiled out below sm_90, which has no griddepcontrol. */
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_release() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

/* (a & 0x000F000F) | MAGIC in one lop3: two codes as the 16-bit floats MAGIC + u */
__device__ __forceinline__ u32 pair(u32 a) {
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "n"(0x000F000F), "r"(MAGIC));
  return r;
}


/* Split K: each block has written its partial sums ([SPLITS, rows, N] float32); the last block of
   this column of blocks (counted in `counters`, which it resets for the next launch and for CUDA
   graph replays) adds them in a fixed order and writes the output. */
__device__ __forceinline__ void finish_splits(const float* partial, u32* counters, u16* y, int N, int rows,
                                              int width) {
#if SPLITS > 1
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + blockIdx.x, 1u) == SPLITS - 1;
  __syncthreads();
  if (last) {
    const int n0 = blockIdx.x * width;
    for (int i = threadIdx.x; i < rows * width; i += blockDim.x) {
      const int r = i / width, n = n0 + i % width;
      float v = 0.f;
      for (int sp = 0; sp < SPLITS; ++sp) v += __ldcg(partial + ((size_t)sp * rows + r) * N + n);
      y[(size_t)r * N + n] = from_f32(v);
    }
    if (threadIdx.x == 0) counters[blockIdx.x] = 0u;
  }
#endif
}

/* One output of a block: to y directly, or to this split's partial sums */
__device__ __forceinline__ void put(float* partial, u16* y, int N, int rows, int r, int n, float v) {
#if SPLITS == 1
  y[(size_t)r * N + n] = from_f32(v);
#else
  partial[((size_t)blockIdx.y * rows + r) * N + n] = v;
#endif
}

/* x times AWQ's pre-quant scale, each product rounded to x's dtype (as the other int4 paths round it) */
__device__ __forceinline__ uint4 scale_x(uint4 v, uint4 p) {
  u32* a = reinterpret_cast<u32*>(&v);
  const u32* b = reinterpret_cast<const u32*>(&p);
#pragma unroll
  for (int i = 0; i < 4; ++i)
    a[i] = (u32)from_f32(to_f32(a[i] & 0xFFFF) * to_f32(b[i] & 0xFFFF))
           | ((u32)from_f32(to_f32(a[i] >> 16) * to_f32(b[i] >> 16)) << 16);
  return v;
}

/* The SwiGLU of 8 pairs: silu(a) * g, rounded as trtlm.runtime.kernels.fused.silu_mul rounds it
   (silu(a) to x's dtype, then the product) */
__device__ __forceinline__ u32 silu_mul2(u32 a, u32 g) {
  u32 r = 0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float af = to_f32((a >> (16 * h)) & 0xFFFF);
    float e;
    asm("ex2.approx.f32 %0, %1;" : "=f"(e) : "f"(-af * 1.4426950408889634f));
    const float s = to_f32(from_f32(af / (1.f + e)));
    r |= (u32)from_f32(s * to_f32((g >> (16 * h)) & 0xFFFF)) << (16 * h);
  }
  return r;
}

__device__ __forceinline__ uint4 swiglu(uint4 a, uint4 g) {
  return make_uint4(silu_mul2(a.x, g.x), silu_mul2(a.y, g.y), silu_mul2(a.z, g.z), silu_mul2(a.w, g.w));
}

#define MMA_ASM(d, a, b0, b1) \
  asm volatile(MMA " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};" \
               : "+f"((d)[0]), "+f"((d)[1]), "+f"((d)[2]), "+f"((d)[3]) \
               : "r"((a)[0]), "r"((a)[1]), "r"((a)[2]), "r"((a)[3]), "r"(b0), "r"(b1))

/* ---- the ring both kernels stream their codes through.  Each warp owns TILES 16-row tiles over
   the block's K range and streams them through a ring of STAGES stages in shared memory (one stage:
   SLICES 64-slices of each tile, 512 B of codes and 64 B of scales per tile and slice), each lane
   copying its own 16-byte pieces with cp.async, so STAGES - 1 stages are in flight while it
   computes one: the stream never waits for the arithmetic.  (Run 17 measured the alternatives:
   bulk copies by the copy engine, and stages in registers, were slower.) */
#define CH (TILES * SLICES)       /* 512-byte chunks (one tile, one 64-slice) per stage */
#define STAGE_BYTES (CH * 576)    /* + the 16 scales of each chunk's tile and slice (64 B) */

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr(smem_dst)), "l"(src) : "memory");
}

/* Issue the warp's stage i (of nst; c0 the block's first 64-slice) into ring slot i % STAGES: tile
   t's SLICES chunks at t * SLICES * 512, chunk m's scales at CH * 512 + 64 m.  Lane L copies its
   own 16 B of each chunk (its fragment words: no other lane reads them), lanes 4m..4m+3 chunk m's
   scales (read by every lane: hence the __syncwarp around a slot's reuse).  Past the last stage
   an empty group keeps cp.async.wait_group's count. */
__device__ __forceinline__ void issue_stage(unsigned char* ring, const uint4* wt, const float* __restrict__ scales,
                                            int i, int nst, int c0, int tile0, int lane, int K, int N) {
  if (i < nst) {
    unsigned char* st = ring + (i % STAGES) * STAGE_BYTES;
    const int c = c0 + i * SLICES;
#pragma unroll
    for (int m = 0; m < CH; ++m)
      cp_async16(st + m * 512 + lane * 16, wt + ((size_t)(m / SLICES) * (K / 64) + c + m % SLICES) * 32 + lane);
    if (lane < 4 * CH) {
      const int m = lane >> 2;
      cp_async16(st + CH * 512 + lane * 16,
                 scales + (size_t)((c + m % SLICES) * 64 / GROUP) * N + (tile0 + m / SLICES) * 16 + 4 * (lane & 3));
    }
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}

/* Wait for the warp's stage i and read it: v[m] the lane's fragment words of chunk m (tile
   m / SLICES, slice m % SLICES), sc[m] the scales of its rows gid and gid + 8 */
__device__ __forceinline__ void read_stage(const unsigned char* ring, int i, int lane, uint4 (&v)[CH],
                                           float (&sc)[CH][2]) {
  asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 1) : "memory");
  __syncwarp();
  const unsigned char* st = ring + (i % STAGES) * STAGE_BYTES;
  const int gid = lane >> 2;
#pragma unroll
  for (int m = 0; m < CH; ++m) {
    v[m] = *reinterpret_cast<const uint4*>(st + m * 512 + lane * 16);
    const float* sp = reinterpret_cast<const float*>(st + CH * 512 + m * 64);
    sc[m][0] = sp[gid];
    sc[m][1] = sp[gid + 8];
  }
}

#if MANY
/* ---- many rows (9..64): the GEMM.  The codes stream through the same ring; x (8 COLS rows) comes
   in windows of XW columns of K, double-buffered in shared memory (the next window loaded into
   registers while this one is computed, then stored, AWQ's pre-quant scale applied, behind one
   barrier), so shared memory stays small at any K range and K need not be split to fit x.  Each
   weight is dequantized once in registers (q * scale, rounded to x's dtype as the emulation rounds
   it: at 8+ rows the per-weight cost is spread over COLS mma's, and no offset sums are needed) and
   used by one mma per 8 rows, x's B fragments read with ldmatrix. */
#define CROWS (8 * COLS)
#define XWR (XW + XPAD)
#define XPT ((CROWS * XW / 8 + WARPS * 32 - 1) / (WARPS * 32))  /* 16-byte pieces of a window per thread */
#if X_BF16
#define ONE2 0x3F803F80u
#define NEG_OFF2 0xC308C308u             /* -136 twice */
#define FMA2 "fma.rn.bf16x2"
#else
#define ONE2 0x3C003C00u
#define NEG_OFF2 0xE408E408u             /* -1032 twice */
#define FMA2 "fma.rn.f16x2"
#endif
#define NEG_ZERO2 0x80008000u

__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
  u32 r;
  asm(FMA2 " %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

__device__ __forceinline__ u32 splat(float f) {
  const u32 h = from_f32(f);
  return h | (h << 16);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
w4_gemm(const u16* __restrict__ x, const uint4* __restrict__ w, const float* __restrict__ scales,
        const u16* __restrict__ pre, float* __restrict__ partial, u32* __restrict__ counters,
        u16* __restrict__ y, int N, int K, int rows)
{
  /* dynamic shared memory: [WARPS][STAGES] stages, then x's two windows [2][CROWS][XWR] */
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int tile0 = (blockIdx.x * WARPS + warp) * TILES;
  const int KB = K / SPLITS, kb0 = blockIdx.y * KB, nst = KB / (64 * SLICES);
  unsigned char* ring = smem + warp * (STAGES * STAGE_BYTES);
  u16* xs = reinterpret_cast<u16*>(smem + WARPS * STAGES * STAGE_BYTES);
  const uint4* wt = w + (size_t)tile0 * (K / 64) * 32;

#pragma unroll 1
  for (int i = 0; i < STAGES - 1; ++i)  /* the codes first: the kernel before never writes them */
    issue_stage(ring, wt, scales, i, nst, kb0 / 64, tile0, lane, K, N);

  /* window wi's pieces: thread T its pieces T, T + 32 WARPS, ...; rows from `rows` on are never
     loaded nor stored: they only reach mma columns whose outputs are not stored */
  uint4 xr[XPT];
  auto load_x = [&](int wi) {
#pragma unroll
    for (int e = 0; e < XPT; ++e) {
      const int p = threadIdx.x + e * WARPS * 32, r = p / (XW / 8), c = (p % (XW / 8)) * 8;
      if (r < rows) xr[e] = *reinterpret_cast<const uint4*>(x + (size_t)r * K + kb0 + wi * XW + c);
    }
  };
  auto store_x = [&](int wi) {
    u16* xb = xs + (wi & 1) * (CROWS * XWR);
#pragma unroll
    for (int e = 0; e < XPT; ++e) {
      const int p = threadIdx.x + e * WARPS * 32, r = p / (XW / 8), c = (p % (XW / 8)) * 8;
      if (r < rows) {
#if HAS_PRE
        xr[e] = scale_x(xr[e], *reinterpret_cast<const uint4*>(pre + kb0 + wi * XW + c));
#endif
        *reinterpret_cast<uint4*>(xb + r * XWR + c) = xr[e];
      }
    }
  };
  pdl_wait();
  load_x(0);
  store_x(0);
  __syncthreads();
  pdl_release();

  float acc[TILES][COLS][4];
#pragma unroll
  for (int t = 0; t < TILES; ++t)
#pragma unroll
    for (int nt = 0; nt < COLS; ++nt) acc[t][nt][0] = acc[t][nt][1] = acc[t][nt][2] = acc[t][nt][3] = 0.f;

  /* ldmatrix: lanes 8m..8m+7 address the rows of matrix m = (8-row group 2np + m/2, k half m%2) */
  const int lrow = 8 * (lane >> 4) + (lane & 7), lcol = 8 * ((lane >> 3) & 1);
  const int per_window = XW / (64 * SLICES), windows = KB / XW;
#pragma unroll 1
  for (int wi = 0; wi < windows; ++wi) {
    if (wi + 1 < windows) load_x(wi + 1);
    const u16* xb = xs + (wi & 1) * (CROWS * XWR);
#pragma unroll 1
    for (int s = 0; s < per_window; ++s) {
      const int i = wi * per_window + s;
      __syncwarp();  /* every lane is done with the slot the next issue refills */
      issue_stage(ring, wt, scales, i + STAGES - 1, nst, kb0 / 64, tile0, lane, K, N);
      uint4 v[CH];
      float sc[CH][2];
      read_stage(ring, i, lane, v, sc);
#pragma unroll
      for (int c = 0; c < SLICES; ++c) {
        u32 S[TILES][2];
#pragma unroll
        for (int t = 0; t < TILES; ++t) { S[t][0] = splat(sc[t * SLICES + c][0]); S[t][1] = splat(sc[t * SLICES + c][1]); }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          /* every group's B fragments first, then the mma's: one basic block, so the next k-step's
             ldmatrix can be scheduled over this one's mma's (rows past `rows` give columns whose
             outputs are not stored) */
          const int k = (s * SLICES + c) * 64 + j * 16;
          u32 b[COLS / 2][4];
#pragma unroll
          for (int np = 0; np < COLS / 2; ++np)
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                         : "=r"(b[np][0]), "=r"(b[np][1]), "=r"(b[np][2]), "=r"(b[np][3])
                         : "r"(smem_addr(xb + (16 * np + lrow) * XWR + k + lcol)));
#pragma unroll
          for (int t = 0; t < TILES; ++t) {
            const uint4 v4 = v[t * SLICES + c];
            const u32 q = j == 0 ? v4.x : j == 1 ? v4.y : j == 2 ? v4.z : v4.w;
            u32 a[4];
#pragma unroll
            for (int h = 0; h < 4; ++h)
              a[h] = fma2(fma2(pair(q >> (4 * h)), ONE2, NEG_OFF2), S[t][h & 1], NEG_ZERO2);
#pragma unroll
            for (int np = 0; np < COLS / 2; ++np) {
              MMA_ASM(acc[t][2 * np], a, b[np][0], b[np][1]);
              MMA_ASM(acc[t][2 * np + 1], a, b[np][2], b[np][3]);
            }
          }
        }
      }
    }
    if (wi + 1 < windows) store_x(wi + 1);
    __syncthreads();
  }
  asm volatile("cp.async.wait_group 0;" ::: "memory");  /* (only empty groups remain) */

  /* C fragment: rows gid / gid + 8 of the tile, columns 2 tig and 2 tig + 1 of 8-row group nt */
#pragma unroll
  for (int t = 0; t < TILES; ++t)
#pragma unroll
    for (int nt = 0; nt < COLS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = nt * 8 + 2 * tig + (e & 1);
        if (r < rows) put(partial, y, N, rows, r, (tile0 + t) * 16 + gid + 8 * (e >> 1), acc[t][nt][e]);
      }
  finish_splits(partial, counters, y, N, rows, WARPS * TILES * 16);
}
#else
/* ---- few rows (1..8): the GEMV.  The ring's stages, and the block's fixed costs (staging x, the
   split-K hand-over) paid once per K range. */
extern "C" __global__ void __launch_bounds__(WARPS * 32)
w4_gemv(const u16* __restrict__ x, const uint4* __restrict__ w, const float* __restrict__ scales,
        const u16* __restrict__ pre, float* __restrict__ partial, u32* __restrict__ counters,
        u16* __restrict__ y, int N, int K, int rows)
{
  /* dynamic shared memory: [WARPS][STAGES] stages, then x's slice sums [rows][KB/64] (padded to 16 B),
     then x's slice [rows][KB + XPAD] (times AWQ's pre-quant scale) */
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;  /* mma fragment coordinates */
  const int tile0 = (blockIdx.x * WARPS + warp) * TILES;  /* the warp's first 16-row tile */
  const int KB = K / SPLITS, kb0 = blockIdx.y * KB, NS = KB / 64;  /* the block's K range, its 64-slices */
  const int nst = NS / SLICES, XR = KB + XPAD;
  unsigned char* ring = smem + warp * (STAGES * STAGE_BYTES);
  float* xsum = reinterpret_cast<float*>(smem + WARPS * STAGES * STAGE_BYTES);
  u16* xs = reinterpret_cast<u16*>(xsum + ((rows * NS + 3) & ~3));

  const uint4* wt = w + (size_t)tile0 * (K / 64) * 32;
#pragma unroll 1
  for (int i = 0; i < STAGES - 1; ++i)  /* the codes first: the kernel before never writes them */
    issue_stage(ring, wt, scales, i, nst, kb0 / 64, tile0, lane, K, N);

  /* the block's slice of x: copied asynchronously (thread T its pieces T, T + 32 WARPS, ...; with
     HAS_ACT computed from the SwiGLU's input instead), then each thread scales its own pieces by
     AWQ's pre-quant scale and the 8 lanes of a 64-slice add its sum (the offset) */
  pdl_wait();
  const int pieces = rows * (KB / 8);
#if HAS_ACT  /* x is the SwiGLU's input [rows, 2K], [a | g]: the product takes silu(a) * g */
  for (int p = threadIdx.x; p < pieces; p += WARPS * 32) {
    const u16* a = x + (size_t)(p / (KB / 8)) * 2 * K + kb0 + 8 * (p % (KB / 8));
    *reinterpret_cast<uint4*>(xs + (p / (KB / 8)) * XR + 8 * (p % (KB / 8))) =
        swiglu(*reinterpret_cast<const uint4*>(a), *reinterpret_cast<const uint4*>(a + K));
  }
#else
  for (int p = threadIdx.x; p < pieces; p += WARPS * 32)
    cp_async16(xs + (p / (KB / 8)) * XR + 8 * (p % (KB / 8)), x + (size_t)(p / (KB / 8)) * K + kb0 + 8 * (p % (KB / 8)));
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory");
#endif
  for (int p0 = 0; p0 < pieces; p0 += WARPS * 32) {  /* (pieces is a multiple of 8: a slice's lanes agree) */
    const int p = p0 + threadIdx.x;
    float v = 0.f;
    if (p < pieces) {
      uint4* q = reinterpret_cast<uint4*>(xs + (p / (KB / 8)) * XR + 8 * (p % (KB / 8)));
#if HAS_PRE
      *q = scale_x(*q, *reinterpret_cast<const uint4*>(pre + kb0 + 8 * (p % (KB / 8))));
#endif
      const u32* e = reinterpret_cast<const u32*>(q);
#pragma unroll
      for (int h = 0; h < 4; ++h) v += to_f32(e[h] & 0xFFFF) + to_f32(e[h] >> 16);
    }
#pragma unroll
    for (int o = 4; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (p < pieces && (p & 7) == 0) xsum[p / 8] = v;
  }
  __syncthreads();
  pdl_release();

  const bool has_row = gid < rows;  /* B column gid is x row gid; the others are zero */
  const u16* xrow = xs + (has_row ? gid : 0) * XR + 2 * tig;
  float acc[TILES][4];
#pragma unroll
  for (int t = 0; t < TILES; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
#pragma unroll 1
  for (int i = 0; i < nst; ++i) {
    __syncwarp();  /* every lane is done with the slot the next issue refills */
    issue_stage(ring, wt, scales, i + STAGES - 1, nst, kb0 / 64, tile0, lane, K, N);
    uint4 v[CH];
    float sc[CH][2];
    read_stage(ring, i, lane, v, sc);
#pragma unroll
    for (int c = 0; c < SLICES; ++c) {
      const int kc = i * SLICES + c;  /* the slice within the block's range */
      float d[TILES][2][4];  /* two mma chains per tile */
#pragma unroll
      for (int t = 0; t < TILES; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) d[t][h][0] = d[t][h][1] = d[t][h][2] = d[t][h][3] = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const u32 b0 = has_row ? *reinterpret_cast<const u32*>(xrow + kc * 64 + j * 16) : 0u;
        const u32 b1 = has_row ? *reinterpret_cast<const u32*>(xrow + kc * 64 + j * 16 + 8) : 0u;
#pragma unroll
        for (int t = 0; t < TILES; ++t) {
          const uint4 v4 = v[t * SLICES + c];
          const u32 q = j == 0 ? v4.x : j == 1 ? v4.y : j == 2 ? v4.z : v4.w;
          const u32 a[4] = {pair(q), pair(q >> 4), pair(q >> 8), pair(q >> 12)};
          MMA_ASM(d[t][j & 1], a, b0, b1);
        }
      }
      /* the slice's scales (a group is a multiple of 64) and offset */
      const float o0 = 2 * tig < rows ? OFFSET * xsum[(2 * tig) * NS + kc] : 0.f;
      const float o1 = 2 * tig + 1 < rows ? OFFSET * xsum[(2 * tig + 1) * NS + kc] : 0.f;
#pragma unroll
      for (int t = 0; t < TILES; ++t) {
        const float s0 = sc[t * SLICES + c][0], s1 = sc[t * SLICES + c][1];
        acc[t][0] = fmaf(s0, d[t][0][0] + d[t][1][0] - o0, acc[t][0]);
        acc[t][1] = fmaf(s0, d[t][0][1] + d[t][1][1] - o1, acc[t][1]);
        acc[t][2] = fmaf(s1, d[t][0][2] + d[t][1][2] - o0, acc[t][2]);
        acc[t][3] = fmaf(s1, d[t][0][3] + d[t][1][3] - o1, acc[t][3]);
      }
    }
  }
  asm volatile("cp.async.wait_group 0;" ::: "memory");  /* (only empty groups remain; none left pending at exit) */

  /* C fragment: rows gid / gid + 8 of the tile, columns (= x rows) 2 tig and 2 tig + 1 */
#pragma unroll
  for (int t = 0; t < TILES; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = 2 * tig + (e & 1), n = (tile0 + t) * 16 + gid + 8 * (e >> 1);
      if (r < rows) put(partial, y, N, rows, r, n, acc[t][e]);
    }
  }
  finish_splits(partial, counters, y, N, rows, WARPS * TILES * 16);
}
#endif
"""


class W4Tiles(NamedTuple):
    """An int4 weight repacked once (:func:`repack_w4_tiles`) for :func:`w4_gemv` and :func:`w4_gemm`.

    ``weight``: int32 ``[N/16, K/64, 32, 4]``: for each 16-row tile and 64-wide slice of K, lane
    ``L``'s four words, word ``j`` holding the eight codes of the lane's tensor-core A fragment
    (``mma.m16n8k16``) of k-step ``j``, as ``u = q + 8`` in bits ``4i`` (first of pair ``i``) and
    ``16 + 4i`` (second), so that ``((word >> 4i) & 0x000F000F) | MAGIC`` is fragment register
    ``i``.  ``scales``: float32 ``[K/group, N]`` (shared with :class:`~trtlm.quant.kernels.MixedWeight`).
    """
    weight: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * 64

    @property
    def out_features(self) -> int:
        return self.weight.shape[0] * 16


@torch.no_grad()
def repack_w4_tiles(packed: torch.Tensor, scales_kn: torch.Tensor, group_size: int) -> W4Tiles:
    """The checkpoint's packed int4 ``[N/2, K]`` -> :class:`W4Tiles` (``scales_kn``: float32
    ``[K/group, N]``, kept as is).  Load time, once; a copy of the codes of the same size.  Built
    :data:`_REPACK_ROWS` rows at a time, so the int64 working copies stay small (the whole
    28672x4096 product at once took ~2 GB of them)."""
    from trtlm.quant.formats import unpack_int4

    N, K = packed.shape[0] * 2, packed.shape[1]
    if N % 16 or K % 64:
        raise ValueError(f"w4 tiles need N % 16 == 0 and K % 64 == 0, not [{N}, {K}]")
    out = torch.empty(N // 16, K // 64, 32, 4, dtype=torch.int32, device=packed.device)
    # fragment register i = 2 colhalf + rowhalf; the pair's first code at bit 4i, its second at 16 + 4i
    shifts = (4 * torch.arange(4).reshape(2, 2, 1) + 16 * torch.arange(2)).to(packed.device)  # [colhalf, rowhalf, h]
    for n0 in range(0, N, _REPACK_ROWS):
        u = unpack_int4(packed[n0 // 2:(n0 + _REPACK_ROWS) // 2]).to(torch.int64) + 8  # [rows, K] in [0, 15]
        rows = u.shape[0]
        # n = 16 r + 8 rowhalf + gid, k = 64 c + 16 j + 8 colhalf + 2 tig + h
        u = u.reshape(rows // 16, 2, 8, K // 64, 4, 2, 4, 2)  # r, rowhalf, gid, c, j, colhalf, tig, h
        u = u.permute(0, 3, 2, 6, 4, 5, 1, 7)  # r, c, gid, tig, j, colhalf, rowhalf, h
        words = (u << shifts).sum(dim=(-3, -2, -1))  # r, c, gid, tig, j
        words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
        out[n0 // 16:(n0 + rows) // 16] = words.reshape(rows // 16, K // 64, 32, 4)
    return W4Tiles(out, scales_kn, group_size)


#: rows of the weight :func:`repack_w4_tiles` converts at a time (a multiple of 16)
_REPACK_ROWS = 2048


def unpack_w4_tiles(tiles: W4Tiles) -> torch.Tensor:
    """Inverse of :func:`repack_w4_tiles` (the signed codes ``[N, K]``), for tests."""
    w = tiles.weight.to(torch.int64) & 0xFFFFFFFF
    R, C = w.shape[:2]
    w = w.reshape(R, C, 8, 4, 4)  # r, c, gid, tig, j
    shifts = (4 * torch.arange(4).reshape(2, 2, 1) + 16 * torch.arange(2)).to(w.device)
    u = (w[..., None, None, None] >> shifts) & 0xF  # r, c, gid, tig, j, colhalf, rowhalf, h
    u = u.permute(0, 6, 2, 1, 4, 5, 3, 7)  # r, rowhalf, gid, c, j, colhalf, tig, h
    return (u.reshape(R * 16, C * 64) - 8).to(torch.int8)


class W4GemvConfig(NamedTuple):
    """How :func:`w4_gemv` splits ``[N, K]``: blocks of ``warps`` warps, each warp streaming
    ``tiles`` 16-row tiles over the block's range of K in stages of ``slices`` 64-slices, ``stages``
    of them in a ring (``stages - 1`` in flight while one is computed); ``splits`` blocks along K
    (``K = splits * range``, the range a multiple of ``64 * slices``)."""
    warps: int
    tiles: int
    slices: int
    stages: int
    splits: int


#: the most rows one launch computes (the mma's 8 columns)
W4_GEMV_MAX_ROWS = 8


def _tiles(cfg: W4GemvConfig, N: int, K: int) -> bool:
    return K % (cfg.splits * 64 * cfg.slices) == 0 and N % (16 * cfg.tiles * cfg.warps) == 0


def _gemv_shared(cfg: W4GemvConfig, K: int, rows: int) -> int:
    """Bytes of dynamic shared memory: the warps' rings, x's slice sums and x's slice (see the kernel)."""
    kb = K // cfg.splits
    sums = (rows * (kb // 64) + 3) // 4 * 16
    return cfg.warps * cfg.stages * cfg.tiles * cfg.slices * 576 + sums + rows * (kb + 8) * 2


#: the most dynamic shared memory a configuration may ask for at 8 rows (sm_80's 163 KB per block, less room)
_GEMV_SHARED_MAX = 160 * 1024


def w4_configs(N: int, K: int) -> list[W4GemvConfig]:
    """Every configuration that tiles ``[N, K]`` within sensible limits (the benchmark's sweep)."""
    out = []
    for warps in (1, 2, 4, 8):
        for tiles in (1, 2, 4):
            for slices in (1, 2, 4):
                for stages in (2, 4, 8):
                    for splits in range(1, 65):
                        cfg = W4GemvConfig(warps, tiles, slices, stages, splits)
                        if (_tiles(cfg, N, K) and tiles * slices <= 8  # (lanes copying scales: 4 per chunk)
                                and _gemv_shared(cfg, K, W4_GEMV_MAX_ROWS) <= _GEMV_SHARED_MAX):
                            out.append(cfg)
    return out


#: the GEMV's shape of a warp's work where no measured configuration applies: two 16-row tiles, four
#: stages in the ring, four warps a block (run 17's sweep: with the splits and slices of
#: :func:`w4_gemv_config`, 0-17% slower than the best at Mistral-7B's four shapes)
W4_DEFAULT = {"warps": 4, "tiles": 2, "stages": 4}
#: ... and about this many warps per SM where the grid needs K split to fill the GPU
W4_WARPS_PER_SM = 16
#: the fastest configuration of run 17's sweep (H200, one row, bf16; docs/benchmarks.md) for the
#: shapes of Mistral-7B's linears: up to 17% faster than the rule below alone, 4.5% on the step
W4_MEASURED = {(6144, 4096): W4GemvConfig(4, 2, 1, 4, 8), (4096, 4096): W4GemvConfig(8, 2, 1, 2, 16),
               (28672, 4096): W4GemvConfig(8, 1, 4, 4, 1), (4096, 14336): W4GemvConfig(4, 2, 2, 2, 28)}


@functools.lru_cache(maxsize=None)
def w4_gemv_config(N: int, K: int, sms: int = 132) -> W4GemvConfig | None:
    """The configuration for ``[N, K]`` on ``sms`` SMs (None where the kernel does not apply): the
    measured one (:data:`W4_MEASURED`), else :data:`W4_DEFAULT`'s shape with K unsplit where the
    grid already has a block per SM, otherwise split to about :data:`W4_WARPS_PER_SM` warps per SM;
    stages of the most 64-slices (up to 4) that leave eight stages in a block's K range (a stage
    per 64-slice where there are fewer), so the ring's fixed cost per stage is spread over more
    bytes where the range is long."""
    if (N, K) in W4_MEASURED:
        return W4_MEASURED[N, K]
    cands = w4_configs(N, K)
    shape = (W4_DEFAULT["warps"], W4_DEFAULT["tiles"], W4_DEFAULT["stages"])
    shaped = [c for c in cands if (c.warps, c.tiles, c.stages) == shape]
    if not shaped:  # (a small or odd shape: the nearest configuration, fewest splits)
        return min(cands, key=lambda c: (sum(a != b for a, b in zip((c.warps, c.tiles, c.stages), shape)),
                                         c.splits, c.slices)) if cands else None
    blocks = N // (16 * shape[0] * shape[1])
    splits = sorted({c.splits for c in shaped})  # (those whose x slice fits in shared memory)
    split = splits[0] if blocks >= sms else min(
        splits, key=lambda s: (abs(blocks * s * shape[0] - W4_WARPS_PER_SM * sms), s))
    slices = sorted(c.slices for c in shaped if c.splits == split)
    ns = K // 64 // split
    return W4GemvConfig(shape[0], shape[1], max([sl for sl in slices if ns // sl >= 8] or slices[:1]), shape[2], split)


def w4_gemv_supports(group_size: int, N: int, K: int) -> bool:
    """Whether the kernel takes an int4 linear of this group (a multiple of 64) and shape."""
    return group_size % 64 == 0 and K % group_size == 0 and w4_gemv_config(N, K) is not None


def w4_gemv_available(device: torch.device) -> bool:
    """CUDA C kernels compile here (NVRTC) and the device has bf16 tensor-core mma (sm_80+)."""
    from trtlm.runtime.kernels.nvrtc import nvrtc_available
    return (device.type == "cuda" and nvrtc_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


class W4GemmConfig(NamedTuple):
    """How :func:`w4_gemm` splits ``[N, K]``: as :class:`W4GemvConfig` (blocks of ``warps`` warps,
    each streaming ``tiles`` 16-row tiles through a ring of ``stages`` stages of ``slices``
    64-slices; ``splits`` blocks along K).  x comes in windows (:func:`_gemm_window`), not whole."""
    warps: int
    tiles: int
    slices: int
    stages: int
    splits: int


#: the most rows :func:`w4_gemm` computes (8 mma columns of 8 rows)
W4_GEMM_MAX_ROWS = 64
#: the most 16-byte pieces of an x window each thread loads (registers held during a window)
_WINDOW_PIECES = 8


def gemm_cols(rows: int) -> int:
    """The 8-row groups a GEMM launch is compiled for: 2, 4 or 8 (a kernel per power of two, so
    that the engine's batch sizes share a few kernels)."""
    return 1 << max(1, (rows - 1).bit_length() - 3)


def _gemm_window(cfg: W4GemmConfig, K: int, cols: int) -> int:
    """Columns of x per window: as many as :data:`_WINDOW_PIECES` pieces per thread hold (fewer
    where the block's K range is shorter), a multiple of the stage's depth that divides the range."""
    kb, depth = K // cfg.splits, 64 * cfg.slices
    want = max(depth, _WINDOW_PIECES * 8 * 32 * cfg.warps // (8 * cols))
    return max((xw for xw in range(depth, min(kb, want) + 1, depth) if kb % xw == 0), default=depth)


def _gemm_shared(cfg: W4GemmConfig, K: int, cols: int) -> int:
    """Bytes of dynamic shared memory: the warps' rings and x's two windows."""
    return cfg.warps * cfg.stages * cfg.tiles * cfg.slices * 576 + 2 * 8 * cols * (_gemm_window(cfg, K, cols) + 8) * 2


def _gemm_tiles(cfg: W4GemmConfig, N: int, K: int) -> bool:
    return K % (cfg.splits * 64 * cfg.slices) == 0 and N % (16 * cfg.tiles * cfg.warps) == 0


def w4_gemm_configs(N: int, K: int, cols: int = 8) -> list[W4GemmConfig]:
    """Every configuration that tiles ``[N, K]`` for ``8 * cols`` rows within sensible limits (the
    benchmark's sweep): at most 128 accumulators and :data:`_WINDOW_PIECES` pieces of x a thread
    (more would spill registers), and K split at most 16 ways (each split writes and reads back
    ``rows * N`` float32 partial sums)."""
    out = []
    for warps in (1, 2, 4, 8):
        for tiles in (1, 2, 4):
            for slices in (1, 2):
                for stages in (2, 3, 4):
                    for splits in range(1, 17):
                        cfg = W4GemmConfig(warps, tiles, slices, stages, splits)
                        if (_gemm_tiles(cfg, N, K) and tiles * cols * 4 <= 128 and tiles * slices <= 8
                                and cols * _gemm_window(cfg, K, cols) <= _WINDOW_PIECES * 32 * warps
                                and _gemm_shared(cfg, K, cols) <= _GEMV_SHARED_MAX):
                            out.append(cfg)
    return out


#: the GEMM's blocks: eight warps, each streaming its tiles two 64-slices a stage, three stages in
#: the ring (run 18's sweep at 16-64 rows: the best at every Mistral-7B shape, or within 8% of it)
W4_GEMM_DEFAULT = {"warps": 8, "slices": 2, "stages": 3}


@functools.lru_cache(maxsize=None)
def w4_gemm_config(N: int, K: int, cols: int = 8, sms: int = 132) -> W4GemmConfig | None:
    """The configuration for ``[N, K]`` at ``8 * cols`` rows on ``sms`` SMs: :data:`W4_GEMM_DEFAULT`,
    with two tiles a warp and K whole where that still gives about a block per SM (each block
    stages x once for twice the codes), else one tile and K split the way that gives nearest two
    blocks per SM (run 18: the best of 1-16 splits, or within 8%, at 16, 32 and 64 rows).  Where
    the shape allows none of that, the nearest configuration that tiles it."""
    cands = w4_gemm_configs(N, K, cols)
    warps, slices, stages = W4_GEMM_DEFAULT["warps"], W4_GEMM_DEFAULT["slices"], W4_GEMM_DEFAULT["stages"]
    whole = W4GemmConfig(warps, 2, slices, stages, 1)
    if whole in cands and N // (16 * 2 * warps) >= 0.75 * sms:
        return whole
    shaped = [c for c in cands if (c.warps, c.tiles, c.slices, c.stages) == (warps, 1, slices, stages)]
    if shaped:
        return min(shaped, key=lambda c: (abs(N // (16 * warps) * c.splits - 2 * sms), c.splits))
    return min(cands, key=lambda c: (sum(a != b for a, b in zip((c.warps, c.slices, c.stages), (warps, slices, stages))),
                                     abs(N // (16 * c.tiles * c.warps) * c.splits - 2 * sms), c.splits)) if cands else None


@functools.lru_cache(maxsize=None)
def _source(kind: str, cfg: tuple, group: int, x_bf16: bool, has_pre: bool, act: bool = False,
            cols: int = 1, window: int = 0) -> str:
    """The kernel's source for one variant (``kind``: "gemv" or "gemm"; configurations of the two
    kinds can be equal tuples, so the kind is part of the cache key; ``act``: the GEMV takes the
    SwiGLU's input; ``cols``, ``window``: the GEMM's 8-row groups and x window)."""
    fields = W4GemmConfig._fields if kind == "gemm" else W4GemvConfig._fields
    head = "".join(f"#define {k.upper()} {v}\n" for k, v in zip(fields, cfg))
    head += (f"#define MANY {int(kind == 'gemm')}\n#define GROUP {group}\n"
             f"#define X_BF16 {int(x_bf16)}\n#define HAS_PRE {int(has_pre)}\n#define HAS_ACT {int(act)}\n"
             f"#define COLS {cols}\n#define XW {window}\n")
    return head + _SOURCE


_counters: dict[torch.device, torch.Tensor] = {}


def _counter_buffer(device: torch.device, n: int) -> torch.Tensor:
    """The split-K counters (all zero between launches: the last block of a column resets its own).
    One buffer per device, shared by every linear: a launch waits for the one before to complete
    before it touches them (``griddepcontrol.wait``), and linears run in stream order."""
    buf = _counters.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _counters[device] = buf
    return buf


def _kernel(tiles: W4Tiles, dtype: torch.dtype, has_pre: bool, cfg: "W4GemvConfig | W4GemmConfig",
            act: bool = False, cols: int = 1):
    from trtlm.runtime.kernels.nvrtc import compile_kernel

    gemm = isinstance(cfg, W4GemmConfig)
    window = _gemm_window(cfg, tiles.in_features, cols) if gemm else 0
    src = _source("gemm" if gemm else "gemv", tuple(cfg), tiles.group_size, dtype == torch.bfloat16, has_pre, act,
                  cols if gemm else 1, window)
    return compile_kernel(src, "w4_gemm" if gemm else "w4_gemv", tiles.weight.device)


def prepare_w4_gemv(tiles: W4Tiles, dtype: torch.dtype, has_pre: bool, gemm_rows: int = 0,
                    swiglu: bool = False) -> None:
    """Compile the kernels (the GEMV; the GEMM's for up to ``gemm_rows`` rows; the GEMV that takes
    the SwiGLU's input with ``swiglu``) and allocate the counters now (load time, not inside a
    CUDA-graph capture)."""
    N, K = tiles.out_features, tiles.in_features
    sms = _sms(tiles.weight.device)
    _kernel(tiles, dtype, has_pre, w4_gemv_config(N, K, sms), swiglu)
    for cols in sorted({gemm_cols(r) for r in range(W4_GEMV_MAX_ROWS + 1, gemm_rows + 1)}):
        _kernel(tiles, dtype, has_pre, w4_gemm_config(N, K, cols, sms), cols=cols)
    _counter_buffer(tiles.weight.device, N // 16)


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _pdl(device: torch.device) -> bool:
    """Launch with programmatic dependent launch where the engine's other kernels do
    (:func:`trtlm.runtime.kernels.pdl.pdl_available`, which needs Triton; these kernels wait
    correctly either way)."""
    if not _has_triton():
        return False
    from trtlm.runtime.kernels.pdl import pdl_available
    return pdl_available(device)


@functools.lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernels read x in 16-byte pieces)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _launch(x: torch.Tensor, tiles: W4Tiles, prequant: torch.Tensor | None, cfg, max_rows: int,
            act: bool = False) -> torch.Tensor:
    K, N = tiles.in_features, tiles.out_features
    rows = x.shape[0]
    width = 2 * K if act else K
    if x.dim() != 2 or x.shape[1] != width or not 1 <= rows <= max_rows:
        raise ValueError(f"int4 product of [1..{max_rows}, {width}] inputs, not {tuple(x.shape)}")
    gemm = isinstance(cfg, W4GemmConfig)
    if not (_gemm_tiles if gemm else _tiles)(cfg, N, K):
        raise ValueError(f"config {cfg} does not tile [{N}, {K}]")
    cols = gemm_cols(rows) if gemm else 1
    kernel = _kernel(tiles, x.dtype, prequant is not None, cfg, act, cols)
    x = _aligned(x)
    pre = _aligned(prequant.reshape(-1).to(x.dtype)) if prequant is not None else None
    y = torch.empty(rows, N, dtype=x.dtype, device=x.device)
    partial = torch.empty(cfg.splits, rows, N, dtype=torch.float32, device=x.device) if cfg.splits > 1 else None
    counters = _counter_buffer(x.device, N // 16)
    shared = _gemm_shared(cfg, K, cols) if gemm else _gemv_shared(cfg, K, rows)
    kernel((N // (16 * cfg.tiles * cfg.warps), cfg.splits, 1), (32 * cfg.warps, 1, 1),
           [x, tiles.weight, tiles.scales, pre, partial, counters, y, N, K, rows], pdl=_pdl(x.device),
           shared=shared)
    return y


def w4_gemv(x: torch.Tensor, tiles: W4Tiles, prequant: torch.Tensor | None = None,
            config: W4GemvConfig | None = None, swiglu: bool = False) -> torch.Tensor:
    """``[rows, K] @ dequant(W)^T -> [rows, N]`` for up to :data:`W4_GEMV_MAX_ROWS` rows, in x's dtype
    (float16 or bfloat16); ``prequant``: AWQ's pre-quant scale ``[K]`` (x * prequant is rounded to
    x's dtype, as the other int4 paths round it).  ``swiglu``: x is the SwiGLU's input ``[rows, 2K]``
    = ``[a | g]`` and the product takes ``silu(a) * g``, computed as the kernel stages x (rounded as
    :func:`trtlm.runtime.kernels.fused.silu_mul` rounds it): one kernel instead of two."""
    cfg = config or w4_gemv_config(tiles.out_features, tiles.in_features, _sms(x.device))
    return _launch(x, tiles, prequant, cfg, W4_GEMV_MAX_ROWS, swiglu)


def w4_gemm(x: torch.Tensor, tiles: W4Tiles, prequant: torch.Tensor | None = None,
            config: W4GemmConfig | None = None) -> torch.Tensor:
    """The same product for up to :data:`W4_GEMM_MAX_ROWS` rows: each weight dequantized once in
    registers (``q * scale`` rounded to x's dtype, as the emulation rounds it) for every row."""
    cfg = config or w4_gemm_config(tiles.out_features, tiles.in_features, gemm_cols(x.shape[0]), _sms(x.device))
    if prequant is not None and x.shape[0] * (tiles.in_features // cfg.splits) >= _PREQUANT_ONCE:
        # every block scales its own windows: where a block's share is this large, scaling x once
        # first (the same rounding) is cheaper
        x, prequant = x * prequant.to(x.dtype), None
    return _launch(x, tiles, prequant, cfg, W4_GEMM_MAX_ROWS)


#: rows times a block's K range from which :func:`w4_gemm` applies AWQ's pre-quant scale to x in one
#: elementwise kernel first, instead of in every block (run 18: 28672x4096 at 64 rows, 76.4 against
#: 66.7 us; at 32 rows, and 4096x14336 split 8 ways at 64, the two were level or the kernel faster)
_PREQUANT_ONCE = 64 * 4096
