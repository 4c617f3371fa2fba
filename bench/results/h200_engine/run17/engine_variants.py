"""Run 17: the batch-1 int4-awq decode step (bench/step_anatomy.py) with the GEMV's configurations
varied in the engine itself, and with run 16's GEMV, since isolated kernel times (back-to-back
launches of one kernel) need not carry over to a step that interleaves small kernels."""
import importlib.util, json, sys
sys.path.insert(0, "bench")
import step_anatomy as sa
from trtlm.quant import runtime as qr
from trtlm.quant import w4_gemv as w4

# run 16's GEMV, for the same-run comparison: the calls carried a copy of it, made with
#   git show 574cee8:core/src/trtlm/quant/w4_gemv.py > bench/results/h200_engine/run17/w4_gemv_run16.py
spec = importlib.util.spec_from_file_location("w4_old", "bench/results/h200_engine/run17/w4_gemv_run16.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
C = w4.W4GemvConfig
MEASURED = dict(w4.W4_MEASURED)
VARIANTS = {
    "measured": ("new", MEASURED),
    "rule": ("new", {}),
    "deep prologue": ("new", {(6144, 4096): C(4, 2, 1, 8, 8), (4096, 4096): C(4, 2, 1, 8, 16),
                              (28672, 4096): C(8, 1, 2, 8, 1), (4096, 14336): C(4, 2, 2, 8, 28)}),
    "run16 kernel": ("old", MEASURED),
}
out = []
for name, (kernel, table) in VARIANTS.items():
    w4.W4_MEASURED.clear(); w4.W4_MEASURED.update(table); w4.w4_gemv_config.cache_clear()
    qr.w4_gemv = old.w4_gemv if kernel == "old" else w4.w4_gemv
    # (compile at load time, as the engine does, not during graph capture)
    qr.prepare_w4_gemv = (lambda *a, **k: (w4.prepare_w4_gemv(*a, **k), old.prepare_w4_gemv(*a, **k))) \
        if kernel == "old" else w4.prepare_w4_gemv
    for r in sa.anatomy(sys.argv[2] if len(sys.argv) > 2 else "int4-awq", 128, 128, ["on"]):
        r["variant"] = name
        p = r["profile"]
        print(f"{name:14s} step {r['step_ms']:.3f} ms  replay {r['replay_ms']:.3f} ms  linear {p['classes']['linear']['ms']:.3f}", flush=True)
        r.pop("kernel_paths", None)
        out.append(r)
    json.dump(out, open(sys.argv[1], "w"), indent=1)
