# run 16, call 7: int4 at 9..16 rows takes w4_gemm (grid ~ one block per SM), no tinygemm copy;
# GPU tests; 8/12/16 rows: w4_gemv / w4_gemm / tinygemm; trtlm bench at batch 1, 16, 64
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 280 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_quant_kernels.py tests/test_gpu.py > $OUT/gpu_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/gpu_tests.txt | tail -15
timeout 100 python3 - <<'PY' 2>&1 | tee $OUT/rows.txt
import sys, torch
sys.path.insert(0, "bench")
from quant_kernels_bench import time_op
from trtlm.quant import formats as qf, kernels as qk
from trtlm.quant.w4_gemv import w4_gemv, w4_gemm, repack_w4_tiles, w4_gemm_config
g = torch.Generator("cuda").manual_seed(0)
for N, K in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    s = qf.int4_group_scales(w, 128); q = qf.quantize_int4(w, s, 128); packed = qf.pack_int4(q)
    tiles = repack_w4_tiles(packed, s.t().contiguous(), 128)
    packed_tg = qk.repack_int4pack(packed, s)
    n = max(1, (256 << 20) // tiles.weight.nbytes)
    ws = [tiles] + [tiles._replace(weight=tiles.weight.clone()) for _ in range(n - 1)]
    tg = [packed_tg] + [(packed_tg[0].clone(), packed_tg[1]) for _ in range(n - 1)]
    for rows in (8, 12, 16):
        x = torch.randn(rows, K, device="cuda", generator=g).to(torch.bfloat16)
        tm = time_op(lambda i: (lambda: w4_gemm(x, ws[i % len(ws)])), tiles.weight.nbytes, reps=3)
        tt = time_op(lambda i: (lambda: qk.int4pack_mm(x, *tg[i % len(tg)], 128, None)), tiles.weight.nbytes, reps=3)
        tv = time_op(lambda i: (lambda: w4_gemv(x, ws[i % len(ws)])), tiles.weight.nbytes, reps=3) if rows <= 8 else float("nan")
        print(f"{N}x{K} rows {rows}: w4_gemv {tv:.1f} us  w4_gemm {tuple(w4_gemm_config(N, K))} {tm:.1f} us  tinygemm {tt:.1f} us", flush=True)
PY
B="trtlm bench --dummy-weights --dtype bfloat16 --device cuda --json --family mistral --preset 7b --mode latency --input-len 128 --output-len 128 --reps 2"
for q in none int4-awq int4-wo; do
  extra=(); [[ $q != none ]] && extra=(--quant "$q")
  echo "== $q"; timeout 150 $B "${extra[@]}" --batch-size 1,16,64 --output "$OUT/quant_mistral_7b_$q.json" 2>&1 | grep "latency batch"
done
