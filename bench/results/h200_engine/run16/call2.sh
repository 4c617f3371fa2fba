# run 16, call 2: the tensor-core int4 GEMV (w4_gemv): correctness at 1/3/8 rows (bf16, fp16, prequant),
# rows 1/4/8 against tinygemm, the one-row config sweep, and the engine step (bf16, int4-awq, int4-wo)
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
python3 - <<'PY'
import sys, torch
sys.path.insert(0, "bench")
from quant_kernels_bench import time_op
from trtlm.quant import formats as qf, kernels as qk
from trtlm.quant.w4_gemv import w4_gemv, repack_w4_tiles, w4_gemv_config
g = torch.Generator("cuda").manual_seed(0)
for N, K in [(4096, 4096), (28672, 4096), (4096, 14336)]:
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    s = qf.int4_group_scales(w, 128); q = qf.quantize_int4(w, s, 128); packed = qf.pack_int4(q)
    tiles = repack_w4_tiles(packed, s.t().contiguous(), 128)
    deq = (q.float().reshape(N, K // 128, 128) * s[..., None]).reshape(N, K)
    p = torch.rand(K, device="cuda", generator=g) + 0.5
    for dt in (torch.bfloat16, torch.float16):
        for rows in (1, 3, 8):
            x = torch.randn(rows, K, device="cuda", generator=g).to(dt)
            for pre in (None, p.to(dt)):
                xs = (x.float() * pre.float()).to(dt) if pre is not None else x
                ref = xs.float() @ deq.t()
                y = w4_gemv(x, tiles, pre)
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                same = all(torch.equal(y, w4_gemv(x, tiles, pre)) for _ in range(3))
                print(f"{N}x{K} {str(dt)[6:]} rows {rows} pre {pre is not None}: rel err {err:.2e} repeatable {same}")
    packed_tg = qk.repack_int4pack(packed, s)
    ws = [tiles] + [tiles._replace(weight=tiles.weight.clone()) for _ in range(max(1, (256 << 20) // tiles.weight.nbytes) - 1)]
    tg = [packed_tg] + [(packed_tg[0].clone(), packed_tg[1]) for _ in range(len(ws) - 1)]
    for rows in (1, 2, 4, 8):
        x = torch.randn(rows, K, device="cuda", generator=g).to(torch.bfloat16)
        t_w4 = time_op(lambda i: (lambda: w4_gemv(x, ws[i % len(ws)])), tiles.weight.nbytes, reps=3)
        t_tg = time_op(lambda i: (lambda: qk.int4pack_mm(x, *tg[i % len(tg)], 128, None)), tiles.weight.nbytes, reps=3)
        print(f"  {N}x{K} rows {rows}: w4_gemv {t_w4:.1f} us ({tiles.weight.nbytes / t_w4 / 1e6:.2f} TB/s)  tinygemm {t_tg:.1f} us  x{t_tg / t_w4:.2f}")
PY
timeout 150 python3 bench/quant_kernels_bench.py --gemv --gemv-formats int4-awq --out $OUT/gemv.json --budget-s 120 2>&1 | grep -v "^ *$"
timeout 220 python3 bench/step_anatomy.py --quants none,int4-awq,int4-wo --gemv-variants '{"tinygemm": {"kernels": {"W4_GEMV": false}}}' --out $OUT/anatomy.json 2>&1 | grep "step "
