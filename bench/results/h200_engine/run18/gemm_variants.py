"""Run 18: source variants of the int4 GEMM at 16, 32 and 64 rows (Mistral-7B's shapes), each over
warps 8, tiles 1-2, slices 1-2, three stages, every split: "base" (the committed source),
"lb1" (__launch_bounds__(threads, 1): ptxas may use more registers, so the ldmatrix of a k-step
need not wait for the previous mma's to free its registers), "old_finish" (the split-K hand-over as
run 17 wrote it).  Also the GEMV at 1 and 8 rows against run 17's.  JSON to argv[1]."""
import concurrent.futures as cf, importlib.util, json, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, "bench")
from quant_kernels_bench import time_op
from trtlm.quant import formats as qf
from trtlm.quant import w4_gemv as w4
from trtlm.runtime.kernels import nvrtc

# run 17's kernels, for the same-call comparison (not tracked; made with
#   git show 2332960:core/src/trtlm/quant/w4_gemv.py > bench/results/h200_engine/run18/w4_gemv_run17.py)
spec = importlib.util.spec_from_file_location("w4_old", "bench/results/h200_engine/run18/w4_gemv_run17.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
sms = torch.cuda.get_device_properties(0).multi_processor_count
arch = "".join(map(str, torch.cuda.get_device_capability(0)))
BASE = w4._SOURCE
NEW_FINISH = BASE[BASE.index("  if (last) {  /* four outputs"):BASE.index("    if (threadIdx.x == 0) counters[blockIdx.x] = 0u;")]
OLD_FINISH = """  if (last) {
    const int n0 = blockIdx.x * width;
    for (int i = threadIdx.x; i < rows * width; i += blockDim.x) {
      const int r = i / width, n = n0 + i % width;
      float v = 0.f;
      for (int sp = 0; sp < SPLITS; ++sp) v += __ldcg(partial + ((size_t)sp * rows + r) * N + n);
      y[(size_t)r * N + n] = from_f32(v);
    }
"""
VARIANTS = {"base": BASE,
            "lb1": BASE.replace("__launch_bounds__(WARPS * 32)\nw4_gemm(", "__launch_bounds__(WARPS * 32, 1)\nw4_gemm("),
            "old_finish": BASE.replace(NEW_FINISH, OLD_FINISH)}
assert all(v != BASE for k, v in VARIANTS.items() if k != "base")

def use(variant):
    w4._SOURCE = VARIANTS[variant]
    w4._source.cache_clear()

cubins = {}
real = nvrtc._compile_cubin
nvrtc._compile_cubin = lambda src, name, a: cubins[src, name] if (src, name) in cubins else real(src, name, a)

shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
ROWS = (16, 32, 64)
def cfgs(N, K, cols):
    return [c for c in w4.w4_gemm_configs(N, K, cols) if c.warps == 8 and c.tiles <= 2 and c.stages == 3]
jobs = set()
for v in VARIANTS:
    use(v)
    for N, K in shapes:
        for rows in ROWS:
            cols = w4.gemm_cols(rows)
            for c in cfgs(N, K, cols):
                jobs.add((w4._source("gemm", tuple(c), 128, True, True, False, cols, w4._gemm_window(c, K, cols)), "w4_gemm"))
    for N, K in shapes:
        jobs.add((w4._source("gemv", tuple(w4.w4_gemv_config(N, K, sms)), 128, True, True, False, 1, 0), "w4_gemv"))
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
    use("base")
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
        ref = xs.float() @ w16.float().t()
        tb = time_op(lambda i: (lambda: F.linear(xs, w16s[i % len(w16s)])), w16.nbytes, reps=3)
        r[rows] = {"bf16_us": tb}
        line = f"{key} rows {rows}: bf16 {tb:.1f}"
        for v in VARIANTS:
            use(v)
            times = {}
            for c in cfgs(N, K, cols):
                times[str(tuple(c))] = time_op(lambda i: (lambda: w4.w4_gemm(x, ws[i % len(ws)], pre, config=c)), nb, reps=2)
            y = w4.w4_gemm(x, tiles, pre, config=w4.W4GemmConfig(*eval(min(times, key=times.get))))
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            r[rows][v] = times
            best = min(times, key=times.get)
            line += f"  {v} {best} {times[best]:.1f} (x{tb / times[best]:.2f}, err {err:.0e})"
        print(line, flush=True)
        use("base")
    json.dump(res, open(sys.argv[1], "w"), indent=1)
    ws = w16s = None
    torch.cuda.empty_cache()
