"""Run 17: the streamed int4 GEMV with its chosen configurations against run 16's GEMV and bf16
F.linear at 1, 2, 4 and 8 rows (Mistral-7B's shapes), and at 8 rows a few alternatives.  JSON to argv[1]."""
import importlib.util, json, sys
import torch
import torch.nn.functional as F
sys.path.insert(0, "bench")
from quant_kernels_bench import time_op
from trtlm.quant import formats as qf
from trtlm.quant import w4_gemv as w4

# run 16's GEMV, for the same-run comparison: the calls carried a copy of it, made with
#   git show 574cee8:core/src/trtlm/quant/w4_gemv.py > bench/results/h200_engine/run17/w4_gemv_run16.py
spec = importlib.util.spec_from_file_location("w4_old", "bench/results/h200_engine/run17/w4_gemv_run16.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
sms = torch.cuda.get_device_properties(0).multi_processor_count
res = {}
g = torch.Generator("cuda").manual_seed(0)
for N, K in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    s = qf.int4_group_scales(w, 128); q = qf.quantize_int4(w, s, 128)
    tiles = w4.repack_w4_tiles(qf.pack_int4(q), s.t().contiguous(), 128)
    deq = (q.float().reshape(N, K // 128, 128) * s[..., None]).reshape(N, K)
    ws = [tiles] + [tiles._replace(weight=tiles.weight.clone()) for _ in range(max(2, (256 << 20) // tiles.weight.nbytes) - 1)]
    w16 = deq.to(torch.bfloat16)
    w16s = [w16] + [w16.clone() for _ in range(max(2, (256 << 20) // w16.nbytes) - 1)]
    key = f"{N}x{K}"; r = res[key] = {"bytes": tiles.weight.nbytes + tiles.scales.nbytes, "config": tuple(w4.w4_gemv_config(N, K, sms))}
    for rows in (1, 2, 4, 8):
        x = torch.randn(rows, K, device="cuda", generator=g).to(torch.bfloat16)
        ref = x.float() @ deq.t()
        err = ((w4.w4_gemv(x, tiles).float() - ref).abs().max() / ref.abs().max()).item()
        tb = time_op(lambda i: (lambda: F.linear(x, w16s[i % len(w16s)])), w16.nbytes, reps=3)
        to = time_op(lambda i: (lambda: old.w4_gemv(x, ws[i % len(ws)])), tiles.weight.nbytes, reps=3)
        tn = time_op(lambda i: (lambda: w4.w4_gemv(x, ws[i % len(ws)])), tiles.weight.nbytes, reps=3)
        r[rows] = {"bf16_us": tb, "run16_us": to, "run17_us": tn, "err": err}
        print(f"{key} rows {rows}: bf16 {tb:.1f}  run16 {to:.1f}  run17 {r['config']} {tn:.1f} us "
              f"({r['bytes'] / tn / 1e6:.2f} TB/s)  x{to / tn:.2f} run16  err {err:.1e}", flush=True)
        if rows == 8:
            alts = {}
            for c in {w4.W4GemvConfig(4, 2, 2, 4, sp) for sp in (1, 2, 4, 8)} | {w4.W4GemvConfig(8, 1, 4, 4, sp) for sp in (2, 4)} \
                    | {w4.W4GemvConfig(4, 2, 1, 4, sp) for sp in (4, 8, 16)}:
                if c in w4.w4_configs(N, K):
                    alts[str(tuple(c))] = time_op(lambda i: (lambda: w4.w4_gemv(x, ws[i % len(ws)], config=c)), tiles.weight.nbytes, reps=3)
            r["rows8_alternatives"] = alts
            print("   rows 8:", " ".join(f"{k} {v:.1f}" for k, v in sorted(alts.items(), key=lambda kv: kv[1])), flush=True)
    json.dump(res, open(sys.argv[1], "w"), indent=1)
    ws = w16s = None
    torch.cuda.empty_cache()
