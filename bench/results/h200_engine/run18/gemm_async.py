"""Run 18: the GEMM with x's windows copied by cp.async (in the ring's commit groups) against the
same GEMM staging x through registers (call 4's kernel, from a copy of its module:
``git show 6f2e6ae:core/src/trtlm/quant/w4_gemv.py > bench/results/h200_engine/run18/w4_gemv_call4.py``),
at 16, 32 and 64 rows, Mistral-7B's shapes, window sizes 8, 16 and 32 KB, over splits, tiles 1-2
and stages 2-3 (eight warps, two slices a stage).  JSON to argv[1]."""
import concurrent.futures as cf, importlib.util, json, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, "bench")
from quant_kernels_bench import time_op
from trtlm.quant import formats as qf
from trtlm.quant import w4_gemv as w4
from trtlm.runtime.kernels import nvrtc

spec = importlib.util.spec_from_file_location("w4_call4", "bench/results/h200_engine/run18/w4_gemv_call4.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
sms = torch.cuda.get_device_properties(0).multi_processor_count
arch = "".join(map(str, torch.cuda.get_device_capability(0)))
cubins = {}
real = nvrtc._compile_cubin
nvrtc._compile_cubin = lambda src, name, a: cubins[src, name] if (src, name) in cubins else real(src, name, a)
shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
ROWS = (16, 32, 64)
WINDOWS = (8 << 10, 16 << 10, 32 << 10)
def cfgs(N, K, cols):
    return [c for c in w4.w4_gemm_configs(N, K, cols) if c.warps == 8 and c.slices == 2 and c.tiles <= 2 and c.stages in (2, 3)]
jobs = set()
for wb in WINDOWS:
    w4._WINDOW_BYTES = wb
    for N, K in shapes:
        for rows in ROWS:
            cols = w4.gemm_cols(rows)
            for c in cfgs(N, K, cols):
                jobs.add((w4._source("gemm", tuple(c), 128, True, True, False, cols, w4._gemm_window(c, K, cols)), "w4_gemm"))
t = time.time()
with cf.ThreadPoolExecutor(16) as ex:
    for j, c in zip(list(jobs), ex.map(lambda j: real(j[0], j[1], arch), list(jobs))):
        cubins[j] = c
print(f"compiled {len(jobs)} kernels in {time.time() - t:.1f} s", flush=True)
res = {}
g = torch.Generator("cuda").manual_seed(0)
for N, K in shapes:
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    s = qf.int4_group_scales(w, 128); q = qf.quantize_int4(w, s, 128)
    tiles = w4.repack_w4_tiles(qf.pack_int4(q), s.t().contiguous(), 128)
    deq = (q.float().reshape(N, K // 128, 128) * s[..., None]).reshape(N, K)
    ws = [tiles] + [tiles._replace(weight=tiles.weight.clone()) for _ in range(max(2, (256 << 20) // tiles.weight.nbytes) - 1)]
    w16 = deq.to(torch.bfloat16)
    w16s = [w16] + [w16.clone() for _ in range(max(2, (256 << 20) // w16.nbytes) - 1)]
    pre = (torch.rand(K, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    key = f"{N}x{K}"; r = res[key] = {}
    nb = tiles.weight.nbytes
    for rows in ROWS:
        cols = w4.gemm_cols(rows)
        x = torch.randn(rows, K, device="cuda", generator=g).to(torch.bfloat16)
        xs = (x.float() * pre.float()).to(torch.bfloat16)
        ref = xs.float() @ w16.float().t()
        tb = time_op(lambda i: (lambda: F.linear(xs, w16s[i % len(w16s)])), w16.nbytes, reps=3)
        to = time_op(lambda i: (lambda: old.w4_gemm(x, ws[i % len(ws)], pre)), nb, reps=3)
        r[rows] = rr = {"bf16_us": tb, "call4_us": to, "call4_config": tuple(old.w4_gemm_config(N, K, cols, sms))}
        line = f"{key} rows {rows}: bf16 {tb:.1f}  call4 {to:.1f}"
        for wb in WINDOWS:
            w4._WINDOW_BYTES = wb
            times = {}
            for c in cfgs(N, K, cols):
                times[str(tuple(c))] = time_op(lambda i: (lambda: w4.w4_gemm(x, ws[i % len(ws)], pre, config=c)), nb, reps=2)
            best = min(times, key=times.get)
            y = w4.w4_gemm(x, tiles, pre, config=w4.W4GemmConfig(*eval(best)))
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            rule = str(tuple(w4.w4_gemm_config.__wrapped__(N, K, cols, sms)))
            rr[f"window{wb >> 10}k"] = times
            line += f"  |{wb >> 10}K best {best} {times[best]:.1f} rule {times.get(rule, float('nan')):.1f} err {err:.0e}"
        print(line, flush=True)
        w4._WINDOW_BYTES = 16 << 10
    json.dump(res, open(sys.argv[1], "w"), indent=1)
    ws = w16s = None
    torch.cuda.empty_cache()
