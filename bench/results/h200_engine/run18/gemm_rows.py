"""Run 18: the int4 GEMM streamed through the GEMV's ring (x in windows) against run 17's GEMM,
mixed_mm (the engine's path from 17 rows) and bf16 F.linear at 16, 32 and 64 rows, Mistral-7B's
shapes; a sweep of its configurations; and the GEMV after the refactor against run 17's at 1 and
8 rows.  JSON to argv[1]."""
import concurrent.futures as cf, importlib.util, json, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, "bench")
from quant_kernels_bench import time_op
from trtlm.quant import formats as qf, kernels as qk
from trtlm.quant import w4_gemv as w4
from trtlm.runtime.kernels import nvrtc

# run 17's kernels, for the same-call comparison (not tracked; made with
#   git show 2332960:core/src/trtlm/quant/w4_gemv.py > bench/results/h200_engine/run18/w4_gemv_run17.py)
spec = importlib.util.spec_from_file_location("w4_old", "bench/results/h200_engine/run18/w4_gemv_run17.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
sms = torch.cuda.get_device_properties(0).multi_processor_count
arch = "".join(map(str, torch.cuda.get_device_capability(0)))
SWEEP = len(sys.argv) > 2 and sys.argv[2] == "sweep"

# compile every kernel first, 16 at a time (NVRTC needs no CUDA context; loading does, later)
cubins = {}
real = nvrtc._compile_cubin
def cached(src, name, a):
    return cubins[src, name] if (src, name) in cubins else real(src, name, a)
nvrtc._compile_cubin = cached
def precompile(jobs):
    jobs = [j for j in set(jobs) if j not in cubins]
    t = time.time()
    with cf.ThreadPoolExecutor(16) as ex:
        for j, c in zip(jobs, ex.map(lambda j: real(j[0], j[1], arch), jobs)):
            cubins[j] = c
    print(f"compiled {len(jobs)} kernels in {time.time() - t:.1f} s", flush=True)

shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
ROWS = (16, 32, 64)
def sweep_cfgs(N, K, cols):
    """(at 16 and 64 rows: three stages, every other field)"""
    return [c for c in w4.w4_gemm_configs(N, K, cols) if c.tiles <= 2] if SWEEP and cols in (2, 8) else []
jobs = []
for N, K in shapes:
    for rows in ROWS:
        cols = w4.gemm_cols(rows)
        for c in [w4.w4_gemm_config(N, K, cols, sms)] + sweep_cfgs(N, K, cols):
            jobs.append((w4._source("gemm", tuple(c), 128, True, True, False, cols, w4._gemm_window(c, K, cols)), "w4_gemm"))
precompile(jobs)

res = {}
g = torch.Generator("cuda").manual_seed(0)
for N, K in shapes:
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    s = qf.int4_group_scales(w, 128); q = qf.quantize_int4(w, s, 128)
    packed = qf.pack_int4(q)
    tiles = w4.repack_w4_tiles(packed, s.t().contiguous(), 128)
    mm = qk.repack_for_mm(packed, s, "int4", 128)
    deq = (q.float().reshape(N, K // 128, 128) * s[..., None]).reshape(N, K)
    n_copies = max(2, (256 << 20) // tiles.weight.nbytes)
    ws = [tiles] + [tiles._replace(weight=tiles.weight.clone()) for _ in range(n_copies - 1)]
    mms = [mm] + [mm._replace(weight=mm.weight.clone()) if hasattr(mm, "_replace") else mm for _ in range(n_copies - 1)]
    w16 = deq.to(torch.bfloat16)
    w16s = [w16] + [w16.clone() for _ in range(max(2, (256 << 20) // w16.nbytes) - 1)]
    pre = (torch.rand(K, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    key = f"{N}x{K}"; r = res[key] = {"bytes": tiles.weight.nbytes + tiles.scales.nbytes}
    nb = tiles.weight.nbytes
    for rows in (1, 8):
        x = torch.randn(rows, K, device="cuda", generator=g).to(torch.bfloat16)
        to = time_op(lambda i: (lambda: old.w4_gemv(x, ws[i % len(ws)], pre)), nb, reps=3)
        tn = time_op(lambda i: (lambda: w4.w4_gemv(x, ws[i % len(ws)], pre)), nb, reps=3)
        r[f"gemv{rows}"] = {"run17_us": to, "run18_us": tn}
        print(f"{key} GEMV rows {rows}: run17 {to:.1f}  run18 {tn:.1f} us", flush=True)
    for rows in ROWS:
        cols = w4.gemm_cols(rows)
        x = torch.randn(rows, K, device="cuda", generator=g).to(torch.bfloat16)
        xs = (x.float() * pre.float()).to(torch.bfloat16)
        ref = xs.float() @ deq.to(torch.bfloat16).float().t()
        y = w4.w4_gemm(x, tiles, pre)
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        tb = time_op(lambda i: (lambda: F.linear(xs, w16s[i % len(w16s)])), w16.nbytes, reps=3)
        tm = time_op(lambda i: (lambda: qk.mixed_mm(xs, mms[i % len(mms)])), nb, reps=3)
        to = time_op(lambda i: (lambda: old.w4_gemm(x, ws[i % len(ws)], pre)), nb, reps=3)
        cfg = w4.w4_gemm_config(N, K, cols, sms)
        tn = time_op(lambda i: (lambda: w4.w4_gemm(x, ws[i % len(ws)], pre)), nb, reps=3)
        r[rows] = {"bf16_us": tb, "mixed_mm_us": tm, "run17_gemm_us": to, "run18_gemm_us": tn, "config": tuple(cfg), "err": err}
        print(f"{key} rows {rows}: bf16 {tb:.1f}  mixed_mm {tm:.1f}  run17 gemm {to:.1f}  run18 {tuple(cfg)} {tn:.1f} us "
              f"({r['bytes'] / tn / 1e6:.2f} TB/s, x{tb / tn:.2f} bf16)  err {err:.1e}", flush=True)
        if SWEEP and sweep_cfgs(N, K, cols):
            alts = {}
            for c in sweep_cfgs(N, K, cols):
                alts[str(tuple(c))] = time_op(lambda i: (lambda: w4.w4_gemm(x, ws[i % len(ws)], pre, config=c)), nb, reps=2)
            r[f"sweep{rows}"] = alts
            best = sorted(alts.items(), key=lambda kv: kv[1])[:6]
            print("   best:", " ".join(f"{k} {v:.1f}" for k, v in best), flush=True)
            top = min(alts, key=alts.get)
            c = w4.W4GemmConfig(*eval(top))
            for pieces in (2, 4, 16):  # the x window's size
                w4._WINDOW_PIECES = pieces
                if w4._gemm_shared(c, K, cols) <= w4._GEMV_SHARED_MAX:
                    r[f"pieces{pieces}_{rows}"] = t = time_op(lambda i: (lambda: w4.w4_gemm(x, ws[i % len(ws)], pre, config=c)), nb, reps=2)
                    print(f"   {top} window of {pieces} pieces/thread ({w4._gemm_window(c, K, cols)} columns): {t:.1f}", flush=True)
            w4._WINDOW_PIECES = 8
    json.dump(res, open(sys.argv[1], "w"), indent=1)
    ws = w16s = mms = None
    torch.cuda.empty_cache()
