"""Run 17: why does the int4 GEMV take twice as long at 8 rows as at 1 (28672x4096)?  Patched
variants of the kernel (timing only: their outputs are not checked), with and without PDL."""
import sys
import torch
sys.path.insert(0, "bench")
from quant_kernels_bench import time_op
from trtlm.quant import formats as qf
from trtlm.quant import w4_gemv as w4

N, K = 28672, 4096
g = torch.Generator("cuda").manual_seed(0)
w = torch.randn(N, K, device="cuda", generator=g) * 0.02
s = qf.int4_group_scales(w, 128)
tiles = w4.repack_w4_tiles(qf.pack_int4(qf.quantize_int4(w, s, 128)), s.t().contiguous(), 128)
ws = [tiles] + [tiles._replace(weight=tiles.weight.clone()) for _ in range(3)]
base = w4._SOURCE
patches = {"as is": [], "B columns of row 0 only": [("const bool has_row = gid < rows;", "const bool has_row = gid < 1;")],
           "x staged for row 0 only": [("const int pieces = rows * (KB / 8);", "const int pieces = (KB / 8);")],
           "no output of rows > 0": [("if (r < rows) put(partial, y, N, rows, r, n, acc[t][e]);", "if (r < 1) put(partial, y, N, rows, r, n, acc[t][e]);")]}
cfg = w4.w4_gemv_config(N, K)._replace(bulk=0)
for pdl in (True, False):
    w4._pdl = (lambda d: True) if pdl else (lambda d: False)
    for name, reps in patches.items():
        src = base
        for a, b in reps:
            assert a in src, a
            src = src.replace(a, b)
        w4._SOURCE = src
        w4._source.cache_clear()
        for rows in (1, 8):
            x = torch.randn(rows, K, device="cuda", generator=g).to(torch.bfloat16)
            us = time_op(lambda i: (lambda: w4.w4_gemv(x, ws[i % 4], config=cfg)), tiles.weight.nbytes, reps=3)
            print(f"pdl {int(pdl)} {name:26s} rows {rows}: {us:.1f} us", flush=True)
w4._SOURCE = base
w4._source.cache_clear()
