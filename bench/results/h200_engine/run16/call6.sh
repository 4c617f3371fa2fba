# run 16, call 6: the tensor-core int4 GEMM (w4_gemm, 9..64 rows): GPU tests; a config sweep at
# 16/32/64 rows against bf16 F.linear and mixed_mm; trtlm bench at batch 1 and 64 (bf16, int4-awq, int4-wo)
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 200 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_quant_kernels.py -k "w4 or one_row or fast_kernel" > $OUT/gpu_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|Error" $OUT/gpu_tests.txt | tail -15
timeout 150 python3 - $OUT/gemm_sweep.json <<'PY' 2>&1 | tee $OUT/gemm_sweep.txt
import sys, json, torch, torch.nn.functional as F
sys.path.insert(0, "bench")
from quant_kernels_bench import time_op
from trtlm.quant import formats as qf, kernels as qk
from trtlm.quant.w4_gemv import w4_gemm, repack_w4_tiles, w4_gemm_config, w4_gemm_configs
g = torch.Generator("cuda").manual_seed(0)
res = []
for N, K in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    s = qf.int4_group_scales(w, 128); q = qf.quantize_int4(w, s, 128); packed = qf.pack_int4(q)
    tiles = repack_w4_tiles(packed, s.t().contiguous(), 128)
    mm = qk.repack_for_mm(packed, s, "int4", 128)
    n = max(1, (256 << 20) // tiles.weight.nbytes)
    ws = [tiles] + [tiles._replace(weight=tiles.weight.clone()) for _ in range(n - 1)]
    mms = [mm] + [mm._replace(weight=mm.weight.clone()) for _ in range(n - 1)]
    w16 = w.to(torch.bfloat16); w16s = [w16] + [w16.clone() for _ in range(max(1, (256 << 20) // w16.nbytes) - 1)]
    for rows in (16, 32, 64):
        x = torch.randn(rows, K, device="cuda", generator=g).to(torch.bfloat16)
        t16 = time_op(lambda i: (lambda: F.linear(x, w16s[i % len(w16s)])), w16.nbytes, reps=3)
        tmm = time_op(lambda i: (lambda: qk.mixed_mm(x, mms[i % len(mms)])), tiles.weight.nbytes, reps=3)
        best = None
        for cfg in [w4_gemm_config(N, K)] + [c for c in w4_gemm_configs(N, K) if c != w4_gemm_config(N, K)]:
            t = time_op(lambda i: (lambda: w4_gemm(x, ws[i % len(ws)], config=cfg)), tiles.weight.nbytes, reps=3)
            res.append({"N": N, "K": K, "rows": rows, "config": cfg._asdict(), "us": t, "bf16_us": t16, "mixed_mm_us": tmm})
            if best is None or t < best[1]:
                best = (cfg, t)
            if cfg == w4_gemm_config(N, K):
                default = t
        print(f"{N}x{K} rows {rows}: bf16 {t16:.1f} us  mixed_mm {tmm:.1f}  w4_gemm default {default:.1f} (x{t16 / default:.2f} bf16)  best {tuple(best[0])} {best[1]:.1f} (x{t16 / best[1]:.2f})", flush=True)
json.dump(res, open(sys.argv[1] if len(sys.argv) > 1 else "/dev/null", "w"))
PY
OUT=$OUT STAGE=quant QUANTS="none int4-awq int4-wo" MIXTRAL_QUANTS="" bash bench/gpu_engine.sh 2>&1 | grep "latency batch\|== quant"
