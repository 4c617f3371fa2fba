"""Run 17: how fast can the H200 read 58.7 MB (28672x4096 int4) in the patterns a GEMV can use?
mode 0 "tile-major": warp w streams its own contiguous region (as W4Tiles [N/16][K/64] is read now);
mode 1 "lockstep": at step j warp w reads 512-byte chunk j * warps + w (concurrent warps read
adjacent memory).  Plain 16-byte loads, UNROLL independent loads in flight per lane.  Writes JSON."""
import json, sys
import torch
sys.path.insert(0, "bench")
from quant_kernels_bench import time_op
from trtlm.runtime.kernels.nvrtc import compile_kernel

SRC = r"""
extern "C" __global__ void rd(const uint4* __restrict__ w, unsigned* __restrict__ out, int chunks, int mode) {
  const int lane = threadIdx.x & 31, gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int nw = (gridDim.x * blockDim.x) >> 5, per = chunks / nw;
  unsigned acc = 0;
  for (int j0 = 0; j0 < per; j0 += UNROLL) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int j = j0 + u;
      const long long c = mode == 0 ? (long long)gw * per + j : (long long)j * nw + gw;
      v[u] = j < per ? __ldg(w + c * 32 + lane) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x12345678u) out[0] = acc;
}
"""
res = {}
nbytes = 28672 * 4096 // 2
bufs = [torch.randint(0, 2**31, (nbytes // 4,), dtype=torch.int32, device="cuda") for _ in range(4)]
out = torch.zeros(1, dtype=torch.int32, device="cuda")
chunks = nbytes // 512
sms = torch.cuda.get_device_properties(0).multi_processor_count
for unroll in (4, 8, 16):
    k = compile_kernel(f"#define UNROLL {unroll}\n" + SRC, "rd", torch.device("cuda"))
    for warps_per_block, blocks_per_sm in ((4, 2), (4, 4), (8, 4), (8, 8), (16, 4)):
        nw = warps_per_block * blocks_per_sm * sms
        # (chunks divisible by the warp count: trim to a multiple)
        for mode in (0, 1):
            def call(i, mode=mode, k=k, wpb=warps_per_block, bps=blocks_per_sm):
                return lambda: k((bps * sms, 1, 1), (32 * wpb, 1, 1), [bufs[i % 4], out, chunks - chunks % nw, mode])
            us = time_op(call, nbytes, reps=3)
            key = f"unroll{unroll} warps{warps_per_block} bps{blocks_per_sm} mode{mode}"
            res[key] = {"us": us, "TBps": (chunks - chunks % nw) * 512 / us / 1e6}
            print(f"{key}: {us:.1f} us {res[key]['TBps']:.2f} TB/s", flush=True)
us = time_op(lambda i: (lambda: bufs[i % 4].sum()), nbytes, reps=3)
res["torch.sum int32"] = {"us": us, "TBps": nbytes / us / 1e6}
print(f"torch.sum int32: {us:.1f} us {nbytes / us / 1e6:.2f} TB/s")
json.dump(res, open(sys.argv[1], "w"), indent=1)
