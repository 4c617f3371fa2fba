"""Run 17: the streamed int4 GEMV (cp.async ring) against run 16's GEMV and bf16 F.linear, one row
and eight, at Mistral-7B's shapes; a sweep around the default configuration.  Writes JSON to argv[1]."""
import importlib.util, json, sys, time
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
out_path = sys.argv[1]
sweep = len(sys.argv) > 2 and sys.argv[2] == "sweep"
sms = torch.cuda.get_device_properties(0).multi_processor_count
res = {}
g = torch.Generator("cuda").manual_seed(0)
t0 = time.monotonic()
for N, K in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    s = qf.int4_group_scales(w, 128); q = qf.quantize_int4(w, s, 128)
    tiles = w4.repack_w4_tiles(qf.pack_int4(q), s.t().contiguous(), 128)
    deq = (q.float().reshape(N, K // 128, 128) * s[..., None]).reshape(N, K)
    n = max(2, (256 << 20) // tiles.weight.nbytes)
    ws = [tiles] + [tiles._replace(weight=tiles.weight.clone()) for _ in range(n - 1)]
    w16 = deq.to(torch.bfloat16)
    w16s = [w16] + [w16.clone() for _ in range(max(2, (256 << 20) // w16.nbytes) - 1)]
    key = f"{N}x{K}"; r = res[key] = {"bytes": tiles.weight.nbytes + tiles.scales.nbytes, "configs": []}
    for rows in (1, 8):
        x = torch.randn(rows, K, device="cuda", generator=g).to(torch.bfloat16)
        ref = x.float() @ deq.t()
        def err(y): return ((y.float() - ref).abs().max() / ref.abs().max()).item()
        tb = time_op(lambda i: (lambda: F.linear(x, w16s[i % len(w16s)])), w16.nbytes, reps=3)
        to = time_op(lambda i: (lambda: old.w4_gemv(x, ws[i % len(ws)])), tiles.weight.nbytes, reps=3)
        eo = err(old.w4_gemv(x, tiles))
        cfg0 = w4.w4_gemv_config(N, K, sms)
        tn = time_op(lambda i: (lambda: w4.w4_gemv(x, ws[i % len(ws)])), tiles.weight.nbytes, reps=3)
        en = err(w4.w4_gemv(x, tiles))
        r[f"rows{rows}"] = {"bf16_us": tb, "run16_us": to, "new_us": tn, "new_cfg": tuple(cfg0), "err_run16": eo, "err_new": en}
        print(f"{key} rows {rows}: bf16 {tb:.1f} us  run16 {to:.1f} us  new {tuple(cfg0)} {tn:.1f} us "
              f"({r['bytes'] / tn / 1e6:.2f} TB/s)  err {eo:.1e}/{en:.1e}", flush=True)
        if not sweep or rows != 1:
            continue
        cands = []
        for copy in (2, 0):
            for warps in (8, 4):
                for tl in (1, 2):
                    for slices in (1, 2, 4):
                        for stages in (4, 8, 2):
                            if copy == 2 and tl * slices * stages > 16:
                                continue
                            for splits in range(1, 57):
                                c = w4.W4GemvConfig(warps, tl, slices, stages, splits, copy)
                                nb = N // (16 * tl * warps) * splits
                                if w4._tiles(c, N, K) and sms <= nb <= 8 * sms:
                                    cands.append(c)
        t_shape = time.monotonic()
        for c in cands:
            if time.monotonic() - t_shape > float(sys.argv[3] if len(sys.argv) > 3 else 60):
                break
            try:
                e = err(w4.w4_gemv(x, tiles, config=c))
                t = time_op(lambda i: (lambda: w4.w4_gemv(x, ws[i % len(ws)], config=c)), tiles.weight.nbytes, reps=3)
            except Exception as ex:
                print(f"   {tuple(c)} error {ex}"[:200]); continue
            r["configs"].append({"cfg": tuple(c), "us": t, "err": e, "blocks": N // (16 * c.tiles * c.warps) * c.splits})
            print(f"   {tuple(c)} blocks {N // (16 * c.tiles * c.warps) * c.splits:4d} {t:6.1f} us {r['bytes'] / t / 1e6:.2f} TB/s err {e:.1e}", flush=True)
    json.dump(res, open(out_path, "w"), indent=1)
    ws = w16s = None
    torch.cuda.empty_cache()
