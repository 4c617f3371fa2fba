"""Run 18: where the int4 GEMM's time goes at 64 rows.  Each probe removes one part of the kernel
(its output is then wrong; only the time matters): "no_xstage" never refreshes x's window after the
first, "no_barrier" also drops the barrier per window, "no_dequant" feeds the raw codes to the mma,
"no_ldsm" feeds registers instead of ldmatrix, "mma_only" all of these.  Mistral-7B's shapes, the
configuration the engine uses.  JSON to argv[1]."""
import json, sys
import torch
sys.path.insert(0, "bench")
from quant_kernels_bench import time_op
from trtlm.quant import formats as qf
from trtlm.quant import w4_gemv as w4

BASE = w4._SOURCE
LOAD = "    if (wi + 1 < windows) load_x(wi + 1);\n"
STORE = "    if (wi + 1 < windows) store_x(wi + 1);\n"
BAR = STORE + "    __syncthreads();\n"
DEQ = "a[h] = fma2(fma2(pair(q >> (4 * h)), ONE2, NEG_OFF2), S[t][h & 1], NEG_ZERO2);"
i = BASE.index('            asm volatile("ldmatrix'); j = BASE.index("\n", BASE.index('"r"(smem_addr(xb +', i)) + 1
LDSM = BASE[i:j]
FAKE = "            { b[np][0] = lane + k; b[np][1] = lane ^ k; b[np][2] = lane * k; b[np][3] = lane - k; }\n"
for s in (LOAD, STORE, BAR, DEQ, LDSM):
    assert BASE.count(s) == 1, s
PROBES = {"base": BASE, "no_xstage": BASE.replace(LOAD, "").replace(STORE, ""),
          "no_barrier": BASE.replace(LOAD, "").replace(BAR, ""),
          "no_dequant": BASE.replace(DEQ, "a[h] = pair(q >> (4 * h));"),
          "no_ldsm": BASE.replace(LDSM, FAKE),
          "mma_only": BASE.replace(LOAD, "").replace(BAR, "").replace(DEQ, "a[h] = pair(q >> (4 * h));").replace(LDSM, FAKE)}
sms = torch.cuda.get_device_properties(0).multi_processor_count
res = {}
g = torch.Generator("cuda").manual_seed(0)
for N, K in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    s = qf.int4_group_scales(w, 128); q = qf.quantize_int4(w, s, 128)
    tiles = w4.repack_w4_tiles(qf.pack_int4(q), s.t().contiguous(), 128)
    ws = [tiles] + [tiles._replace(weight=tiles.weight.clone()) for _ in range(max(2, (256 << 20) // tiles.weight.nbytes) - 1)]
    pre = (torch.rand(K, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    key = f"{N}x{K}"; r = res[key] = {}
    for rows in (16, 64):
        x = torch.randn(rows, K, device="cuda", generator=g).to(torch.bfloat16)
        line = f"{key} rows {rows} {tuple(w4.w4_gemm_config(N, K, w4.gemm_cols(rows), sms))}:"
        for name, src in PROBES.items():
            w4._SOURCE = src; w4._source.cache_clear()
            r[f"{name}_{rows}"] = t = time_op(lambda i: (lambda: w4.w4_gemm(x, ws[i % len(ws)], pre)), tiles.weight.nbytes, reps=3)
            line += f"  {name} {t:.1f}"
        print(line, flush=True)
    w4._SOURCE = BASE; w4._source.cache_clear()
    json.dump(res, open(sys.argv[1], "w"), indent=1)
    ws = None
    torch.cuda.empty_cache()
