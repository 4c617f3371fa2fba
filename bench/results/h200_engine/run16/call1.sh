set -x
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
python3 - <<'PY'
import torch, time
from trtlm.runtime.kernels.nvrtc import nvrtc_available, _libs
print("nvrtc", nvrtc_available(), _libs())
from trtlm.quant import formats as qf, kernels as qk
from trtlm.quant.w4_gemv import w4_gemv, w4_gemv_config
for N, K in [(4096, 4096), (4096, 14336)]:
    w = torch.randn(N, K, device="cuda") * 0.02
    s = qf.int4_group_scales(w, 128); q = qf.quantize_int4(w, s, 128)
    mw = qk.repack_for_mm(qf.pack_int4(q), s, "int4", 128)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    deq = (q.float().reshape(N, K // 128, 128) * s[..., None]).reshape(N, K)
    ref = x.float() @ deq.t()
    t = time.time(); y = w4_gemv(x, mw); torch.cuda.synchronize(); print("first call", time.time() - t)
    print(N, K, w4_gemv_config(N, K), "max rel err", ((y.float() - ref).abs().max() / ref.abs().max()).item())
    for r in range(3):
        y2 = w4_gemv(x, mw); assert torch.equal(y, y2)
PY
timeout 240 python3 bench/quant_kernels_bench.py --gemv --gemv-formats int4-awq,int4-wo --out $OUT/gemv.json --budget-s 200 2>&1 | grep -v "^ *$"
timeout 200 python3 bench/step_anatomy.py --quants none,int4-awq,int4-wo --gemv-variants '{"tinygemm": {"kernels": {"W4_GEMV": false}}}' --out $OUT/anatomy.json 2>&1 | tail -30
