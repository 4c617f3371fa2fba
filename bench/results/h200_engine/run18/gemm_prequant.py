"""Run 18: what AWQ's pre-quant scale costs the int4 GEMM (each block scales its x windows) against
scaling x once before it (one elementwise kernel; the same rounding), at 16, 32 and 64 rows,
Mistral-7B's shapes, the engine's configurations.  JSON to argv[1]."""
import json, sys
import torch
sys.path.insert(0, "bench")
from quant_kernels_bench import time_op
from trtlm.quant import formats as qf
from trtlm.quant import w4_gemv as w4

res = {}
g = torch.Generator("cuda").manual_seed(0)
for N, K in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    s = qf.int4_group_scales(w, 128); q = qf.quantize_int4(w, s, 128)
    tiles = w4.repack_w4_tiles(qf.pack_int4(q), s.t().contiguous(), 128)
    ws = [tiles] + [tiles._replace(weight=tiles.weight.clone()) for _ in range(max(2, (256 << 20) // tiles.weight.nbytes) - 1)]
    pre = (torch.rand(K, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    key = f"{N}x{K}"; r = res[key] = {}
    nb = tiles.weight.nbytes
    for rows in (16, 32, 64):
        x = torch.randn(rows, K, device="cuda", generator=g).to(torch.bfloat16)
        assert torch.equal(w4.w4_gemm(x, tiles, pre), w4.w4_gemm(x * pre, tiles))  # (the same rounding)
        t_in = time_op(lambda i: (lambda: w4.w4_gemm(x, ws[i % len(ws)], pre)), nb, reps=3)
        t_none = time_op(lambda i: (lambda: w4.w4_gemm(x, ws[i % len(ws)])), nb, reps=3)
        t_once = time_op(lambda i: (lambda: w4.w4_gemm(x * pre, ws[i % len(ws)])), nb, reps=3)
        r[rows] = {"in_kernel_us": t_in, "no_prequant_us": t_none, "scaled_once_us": t_once}
        print(f"{key} rows {rows}: pre-quant scale in the kernel {t_in:.1f}  none {t_none:.1f}  x * pre first {t_once:.1f} us", flush=True)
    json.dump(res, open(sys.argv[1], "w"), indent=1)
    ws = None
    torch.cuda.empty_cache()
